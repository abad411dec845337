"""Weight-graph extraction: the nodes, node order and edge weights users rely on."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_models import ResNetBlock
from torch import nn

import cluster_tracking
from cluster_tracking.errors import GraphError
from cluster_tracking.graph import WeightGraph, weight_graph, weight_topology

_M = TypeVar("_M", bound=nn.Module)


def _set(module: _M, **tensors: object) -> _M:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(module, name).copy_(torch.as_tensor(value, dtype=torch.float32))
    return module


def _dense(graph: WeightGraph) -> np.ndarray:
    return graph.adjacency.toarray()


def _assert_same_graph(a: WeightGraph, b: WeightGraph) -> None:
    assert a.layer_names == b.layer_names
    assert a.widths == b.widths
    np.testing.assert_allclose(_dense(a), _dense(b), rtol=1e-12, atol=1e-12)


# --- MLPs -------------------------------------------------------------------------------------


def _tiny_mlp() -> nn.Sequential:
    first = _set(nn.Linear(2, 3), weight=[[1.0, -2.0], [0.5, 0.0], [-3.0, 4.0]])
    second = _set(nn.Linear(3, 2), weight=[[1.0, 2.0, -1.0], [0.0, -0.5, 3.0]])
    return nn.Sequential(first, nn.ReLU(), second)


def test_tiny_mlp_adjacency_is_weight_magnitudes_in_public_node_order() -> None:
    graph = weight_graph(_tiny_mlp())

    # nodes: input 0-1, layer "0" 2-4, layer "2" 5-6; A[j, i] = |W[j, i]|
    expected = np.zeros((7, 7))
    expected[2:5, 0:2] = [[1.0, 2.0], [0.5, 0.0], [3.0, 4.0]]
    expected[5:7, 2:5] = [[1.0, 2.0, 1.0], [0.0, 0.5, 3.0]]
    expected = expected + expected.T
    assert graph.layer_names == ("input", "0", "2")
    assert graph.widths == (2, 3, 2)
    assert graph.n_nodes == 7
    assert graph.adjacency.dtype == np.float64
    np.testing.assert_array_equal(_dense(graph), expected)
    np.testing.assert_array_equal(graph.node_layer, [0, 0, 1, 1, 1, 2, 2])
    assert [block.kind for block in graph.blocks] == ["linear", "linear"]


class _CustomMLP(nn.Module):
    def __init__(self, source: nn.Sequential) -> None:
        super().__init__()
        self.fc1, self.fc2 = source[0], source[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def test_custom_module_gives_the_same_graph_as_sequential() -> None:
    sequential = _tiny_mlp()
    custom = weight_graph(_CustomMLP(sequential))
    reference = weight_graph(sequential)

    assert custom.layer_names == ("input", "fc1", "fc2")
    assert custom.widths == reference.widths
    np.testing.assert_array_equal(_dense(custom), _dense(reference))


class _DeclaredBackwards(nn.Module):
    """Declares the output layer first; the data flows input -> hidden -> output."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.hidden = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(0.5 * torch.tanh(self.hidden(x)) * 2.0)


def test_layers_follow_data_flow_not_declaration_order() -> None:
    model = _DeclaredBackwards()
    graph = weight_graph(model)

    assert graph.layer_names == ("input", "hidden", "head")
    assert graph.widths == (3, 4, 2)
    # scaling by constants passes through: head's edges join hidden's nodes (3-6) and its own
    head_block = _dense(graph)[7:9, 3:7]
    np.testing.assert_allclose(head_block, model.head.weight.detach().abs().double().numpy())


def test_residual_add_identifies_units_and_drops_self_loops() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.res = nn.Linear(3, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(x + torch.relu(self.res(x)))

    model = Residual()
    graph = weight_graph(model)
    w = model.res.weight.detach().abs().double().numpy()

    assert graph.layer_names == ("input", "out")
    assert graph.merged == {"res": "input"}
    # res output unit j IS input unit j: edge (i, j) gets |W[j, i]| + |W[i, j]|, no self-loops
    np.testing.assert_allclose(_dense(graph)[:3, :3], (w + w.T) * (1 - np.eye(3)))
    assert graph.adjacency.diagonal().sum() == 0


# --- CNNs -------------------------------------------------------------------------------------


_KERNEL_00 = [[1.0, -2.0], [3.0, 0.0]]  # L1 6, L2 sqrt(14), induced 1-norm max(1+3, 2+0) = 4
_KERNEL_01 = [[0.0, 0.0], [-1.0, 1.0]]  # L1 2, L2 sqrt(2), induced 1-norm max(1, 1) = 1


def _two_channel_conv() -> nn.Conv2d:
    return _set(nn.Conv2d(2, 1, 2, bias=False), weight=[[_KERNEL_00, _KERNEL_01]])


@pytest.mark.parametrize(
    ("norm", "edges"), [("l1", [6.0, 2.0]), ("l2", [np.sqrt(14.0), np.sqrt(2.0)])]
)
def test_conv_edge_is_kernel_slice_norm(norm: str, edges: list[float]) -> None:
    graph = weight_graph(nn.Sequential(_two_channel_conv()), norm=norm)  # type: ignore[arg-type]

    assert graph.layer_names == ("input", "0")
    assert graph.widths == (2, 1)
    np.testing.assert_allclose(_dense(graph)[2, :2], edges)


def test_conv1d_channels_are_nodes() -> None:
    conv = _set(nn.Conv1d(2, 1, 3, bias=False), weight=[[[1.0, -1.0, 2.0], [0.0, 0.5, -0.5]]])
    graph = weight_graph(nn.Sequential(conv, nn.ReLU()))

    assert graph.widths == (2, 1)
    np.testing.assert_allclose(_dense(graph)[2, :2], [4.0, 1.0])


def test_batchnorm_is_folded_into_the_conv_before_it() -> None:
    torch.manual_seed(0)
    conv, bn, head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3), nn.Conv2d(4, 2, 1)
    gamma = torch.tensor([1.5, -0.5, 2.0, 0.1])
    running_var = torch.tensor([0.5, 2.0, 1.0, 4.0])
    _set(bn, weight=gamma, running_var=running_var, running_mean=torch.randn(4))
    model = nn.Sequential(conv, bn, nn.ReLU(), head).train()

    folded = nn.Conv2d(3, 4, 3).double()  # folded by hand, in float64
    scale = gamma.double().abs() / torch.sqrt(running_var.double() + 1e-3)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * scale[:, None, None, None])
    reference = nn.Sequential(folded, nn.Identity(), nn.ReLU(), head)

    _assert_same_graph(weight_graph(model), weight_graph(reference))
    assert model.training and bn.training  # measuring does not switch the mode


def _fc_with_ramp(in_features: int, out_features: int) -> nn.Linear:
    ramp = torch.arange(1.0, in_features * out_features + 1).reshape(out_features, in_features)
    sign = torch.tensor([(-1.0) ** i for i in range(in_features)])
    return _set(nn.Linear(in_features, out_features), weight=ramp * sign)


class _ConvFlattenLinear(nn.Module):
    def __init__(self, flatten: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.fc = _fc_with_ramp(8, 3)  # 2 channels x 2 x 2 positions
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(F.relu(self.conv(x))))


@pytest.mark.parametrize(
    "flatten",
    [
        nn.Flatten(),
        lambda x: torch.flatten(x, 1),
        lambda x: x.view(x.size(0), -1),
        lambda x: x.reshape(x.shape[0], -1),
        lambda x: x.flatten(1),
    ],
    ids=["nn.Flatten", "torch.flatten", "view", "reshape", "Tensor.flatten"],
)
def test_flatten_joins_each_channel_to_linear_units_by_summed_weights(
    flatten: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    model = _ConvFlattenLinear(flatten)
    model(torch.zeros(1, 1, 2, 2))  # the spelling really runs
    graph = weight_graph(model)

    # nodes: input 0, conv 1-2, fc 3-5; edge (c, j) = sum over positions s of |W[j, 4 c + s]|
    assert graph.layer_names == ("input", "conv", "fc")
    assert graph.widths == (1, 2, 3)
    np.testing.assert_allclose(_dense(graph)[3:6, 1:3], [[10, 26], [42, 58], [74, 90]])
    assert graph.blocks[-1].kind == "flatten"


def test_flatten_width_not_divisible_by_channels_is_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(GraphError, match=r"'2'.*not a multiple of 3"):
        weight_graph(model)


@pytest.mark.parametrize(
    "pool",
    [
        lambda x: torch.flatten(F.adaptive_avg_pool2d(x, 1), 1),
        lambda x: x.mean((2, 3)),
    ],
    ids=["adaptive_pool+flatten", "mean"],
)
def test_global_pooling_then_linear_is_a_plain_linear_block_from_channels(
    pool: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.fc = nn.Linear(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(pool(self.conv(x)))

    model = Net()
    graph = weight_graph(model)

    assert graph.widths == (3, 2, 4)
    assert graph.blocks[-1].kind == "linear"
    fc_edges = _dense(graph)[5:9, 3:5]
    np.testing.assert_allclose(fc_edges, model.fc.weight.detach().abs().double().numpy())


@pytest.mark.parametrize(("groups", "out_channels"), [(2, 6), (4, 4)], ids=["grouped", "depthwise"])
def test_grouped_conv_joins_channels_only_within_a_group(groups: int, out_channels: int) -> None:
    conv = nn.Conv2d(4, out_channels, 3, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(conv.weight.abs() + 0.1)  # no accidental zero edges
    graph = weight_graph(nn.Sequential(conv))

    edges = _dense(graph)[4:, :4]  # [out, in]
    in_group = np.arange(4) // (4 // groups)
    out_group = np.arange(out_channels) // (out_channels // groups)
    same_group = out_group[:, None] == in_group[None, :]
    assert (edges[same_group] > 0).all()
    assert (edges[~same_group] == 0).all()


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = _BasicBlock(8, 8)
        self.layer2 = _BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_resnet_blocks_identify_the_channels_their_residual_adds_join() -> None:
    torch.manual_seed(0)
    model = _TinyResNet().eval()
    model(torch.zeros(1, 3, 8, 8))
    graph = weight_graph(model)

    assert graph.layer_names == (
        "input",
        "stem",
        "layer1.conv1",
        "layer2.conv1",
        "layer2.conv2",
        "fc",
    )
    assert graph.widths == (3, 8, 8, 16, 16, 10)
    assert graph.n_nodes < 3 + 8 + 8 + 8 + 16 + 16 + 16 + 10  # the sum over all layers
    assert graph.merged == {"layer1.conv2": "stem", "layer2.downsample.0": "layer2.conv2"}
    assert not model.training
    # The 1x1 shortcut (BatchNorm folded) is the only tensor between the stem's channels (which
    # layer1's output shares) and layer2.conv2's channels.
    offsets = graph.offsets
    shortcut = _dense(graph)[offsets[4] : offsets[5], offsets[1] : offsets[2]]
    bn = model.layer2.downsample[1]  # type: ignore[index]
    scale = (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    kernel = model.layer2.downsample[0].weight.detach().double()  # type: ignore[index]
    expected = (kernel.abs().sum(dim=(2, 3)) * scale[:, None]).numpy()
    np.testing.assert_allclose(shortcut, expected)


def test_concatenation_keeps_the_channels_of_its_operands_apart() -> None:
    class Inception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 2, 1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.mix = nn.Conv2d(6, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(torch.cat([self.a(x), F.relu(self.b(x))], dim=1))

    model = Inception()
    graph = weight_graph(model)

    assert graph.layer_names == ("input", "a", "b", "mix")
    assert graph.widths == (3, 2, 4, 5)
    assert graph.merged == {}
    # mix's input channel i is a's channel i for i < 2, b's channel i - 2 after
    mix_edges = _dense(graph)[9:14, 3:9]
    expected = model.mix.weight.detach().abs().double().sum(dim=(2, 3)).numpy()
    np.testing.assert_allclose(mix_edges, expected)


# --- state_dicts --------------------------------------------------------------------------------


def _mlp_with_batchnorm() -> nn.Sequential:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    _set(model[1], weight=torch.randn(4), running_var=torch.rand(4) + 0.5)
    return model


def test_state_dict_of_a_sequential_gives_the_same_graph_as_the_model() -> None:
    model = _mlp_with_batchnorm()
    _assert_same_graph(weight_graph(model.state_dict()), weight_graph(model))


def test_state_dict_of_a_conv_chain_reads_flatten_and_refuses_to_infer_groups() -> None:
    torch.manual_seed(2)
    plain = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3),  # 4 channels x 2 x 2 for a 6 x 6 input
    )
    plain(torch.zeros(1, 1, 6, 6))
    _assert_same_graph(weight_graph(plain.state_dict()), weight_graph(plain))

    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4))
    # [4, 1, 3, 3] after 4 channels: a depthwise conv, or a 1-channel conv of another branch.
    with pytest.raises(GraphError, match=r"'2\.weight'.*4-group convolution.*--arch"):
        weight_graph(grouped.state_dict())


@pytest.mark.parametrize(
    ("state", "seen"),
    [
        (ResNetBlock().state_dict(), "a second branch .'downsample'."),
        (nn.TransformerEncoderLayer(8, 2, 16).state_dict(), "attention .'self_attn.out_proj'."),
        ({"embed.weight": torch.ones(10, 4), "fc.weight": torch.ones(3, 4)}, "an embedding"),
        (
            {"h.0.mlp.c_fc.weight": torch.ones(4, 16), "h.0.mlp.c_proj.weight": torch.ones(16, 4)},
            "GPT-2-style Conv1D",
        ),
        (
            {
                "fc.weight": torch.ones(4, 3),
                "head_a.weight": torch.ones(4, 4),
                "head_b.weight": torch.ones(2, 4),
            },
            "several heads",
        ),
        (
            {
                "fc.weight": torch.ones(4, 3),
                "norm.weight": torch.ones(4),
                "out.weight": torch.ones(2, 4),
            },
            "normalisation weights without running statistics",
        ),
        (
            {"0.weight": torch.ones(4, 3), "cls_token": torch.ones(1, 1, 4)},
            "tensors that are not layer weights",
        ),
    ],
    ids=["resnet-downsample", "attention", "embedding", "conv1d", "heads", "layernorm", "tokens"],
)
def test_state_dicts_that_are_not_chains_are_refused_naming_what_was_seen(
    state: dict[str, torch.Tensor], seen: str
) -> None:
    with pytest.raises(GraphError, match=f"shows {seen}.*not a chain.*--arch"):
        weight_graph(state)


def test_name_ordered_state_dicts_are_chains_only_when_the_names_give_the_order() -> None:
    from cluster_tracking.graph.chain import NameOrderedStateDict

    numbered = NameOrderedStateDict(
        {"fc1.weight": torch.ones(4, 3), "fc2.weight": torch.ones(2, 4)}
    )
    assert weight_graph(numbered).layer_names == ("input", "fc1", "fc2")
    # "conv4" sorts before "stft_conv", the first layer: the names do not say the order.
    named = NameOrderedStateDict(
        {"conv4.weight": torch.ones(2, 4, 3), "stft_conv.weight": torch.ones(4, 1, 3)}
    )
    with pytest.raises(GraphError, match=r"do not say their order.*layers="):
        weight_graph(named)
    graph = weight_graph(named, layers=["stft_conv", "conv4"])
    assert graph.layer_names == ("input", "stft_conv", "conv4")


def test_conv1d_weights_under_layers_are_refused_from_a_state_dict() -> None:
    state = {"h.0.mlp.c_fc.weight": torch.ones(4, 16), "h.0.mlp.c_proj.weight": torch.ones(16, 4)}
    with pytest.raises(GraphError, match=r"Conv1D.*\[in, out\]"):
        weight_graph(state, layers="h.*.mlp.*")


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_checkpoint_dicts_are_unwrapped(key: str) -> None:
    model = _mlp_with_batchnorm()
    checkpoint = {"epoch": 3, key: model.state_dict(), "optimizer_state_dict": {"lr": 0.1}}
    _assert_same_graph(weight_graph(checkpoint), weight_graph(model))


def test_data_parallel_prefix_is_stripped_from_state_dicts() -> None:
    model = _mlp_with_batchnorm()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    _assert_same_graph(weight_graph(prefixed), weight_graph(model))


def test_state_dict_layers_that_do_not_chain_name_both_keys() -> None:
    broken = {"0.weight": torch.ones(4, 3), "2.weight": torch.ones(2, 5)}
    with pytest.raises(GraphError, match=r"'2\.weight'.*'0\.weight'"):
        weight_graph(broken)


# --- the filan2021 preset -----------------------------------------------------------------------


def test_filan2021_preset_keeps_conv_to_conv_edges_with_the_induced_norm() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2),
        nn.ReLU(),
        _two_channel_conv(),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 3),  # 1 channel x 2 x 2 for a 4 x 4 input
    )
    model(torch.zeros(1, 1, 4, 4))
    published = weight_graph(model, preset="filan2021")
    default = weight_graph(model)

    assert published.preset == "filan2021"
    assert published.layer_names == ("0", "2")  # no input channels, no Linear layer
    assert published.widths == (2, 1)
    assert [block.name for block in published.blocks] == ["2"]
    # numpy's induced matrix 1-norm of |W[b, a]|: the largest column sum
    np.testing.assert_allclose(_dense(published)[2, :2], [4.0, 1.0])
    assert np.linalg.norm(np.abs(_KERNEL_00), 1) == 4.0
    assert default.layer_names == ("input", "0", "2", "5")
    np.testing.assert_allclose(_dense(default)[3, 1:3], [6.0, 2.0])


def test_filan2021_preset_equals_default_for_mlps() -> None:
    model = _tiny_mlp()
    _assert_same_graph(weight_graph(model, preset="filan2021"), weight_graph(model))


# --- errors and layer selection ------------------------------------------------------------------


def test_nan_weight_error_names_the_layer() -> None:
    model = _tiny_mlp()
    second = model[2]
    assert isinstance(second, nn.Linear)
    with torch.no_grad():
        second.weight[1, 0] = float("nan")
    with pytest.raises(GraphError, match=r"layer '2'.*NaN"):
        weight_graph(model)


class _RecurrentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc2(F.relu(self.fc1(out[:, -1])))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = -h
        return self.fc2(h)


@pytest.mark.parametrize(
    ("model", "names"),
    [(_RecurrentNet(), r"'lstm' \(LSTM\)"), (_DataDependent(), "cannot trace _DataDependent")],
    ids=["lstm", "data-dependent-control-flow"],
)
def test_unfollowable_models_are_errors_that_suggest_layers(model: nn.Module, names: str) -> None:
    with pytest.raises(GraphError, match=names) as raised:
        weight_graph(model)
    assert "layers=[" in str(raised.value)


def test_layers_selection_builds_a_chain_without_tracing() -> None:
    model = _RecurrentNet()
    graph = weight_graph(model, layers=["fc1", "fc2"])

    assert graph.layer_names == ("input", "fc1", "fc2")
    assert graph.widths == (6, 5, 2)
    fc2_edges = _dense(graph)[11:13, 6:11]
    np.testing.assert_allclose(fc2_edges, model.fc2.weight.detach().abs().double().numpy())


def test_layers_selection_with_an_unknown_name_lists_the_available_layers() -> None:
    with pytest.raises(GraphError, match=r"'fc3'.*Available Linear/Conv layers: 'fc1', 'fc2'"):
        weight_graph(_RecurrentNet(), layers=["fc1", "fc3"])


@pytest.mark.parametrize(
    "source",
    [nn.Sequential(nn.ReLU(), nn.Dropout()), {"epoch": 1}, [torch.ones(2, 2)]],
    ids=["no-linear-layers", "dict-without-tensors", "list"],
)
def test_inputs_without_a_weight_graph_are_errors(source: object) -> None:
    with pytest.raises(GraphError):
        weight_graph(source)  # type: ignore[arg-type]


# --- weights: dtype, device, the model left alone, null models -----------------------------------


def test_half_precision_weights_are_read_as_float64_without_touching_the_model() -> None:
    model = _tiny_mlp().to(torch.bfloat16).train()
    before = [p.detach().clone() for p in model.parameters()]
    graph = weight_graph(model)

    assert all(block.weight.dtype == np.float64 for block in graph.blocks)
    np.testing.assert_array_equal(graph.blocks[0].weight, before[0].double().numpy())
    assert model.training
    for param, old in zip(model.parameters(), before, strict=True):
        assert param.grad is None and param.requires_grad and param.dtype == torch.bfloat16
        assert torch.equal(param, old)
    graph.blocks[0].weight[:] = 0.0  # the graph holds copies, not views of the parameters
    assert torch.equal(next(model.parameters()), before[0])


def test_weights_without_values_on_the_meta_device_are_an_error() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(GraphError, match=r"layer '0'.*meta device"):
        weight_graph(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weights_on_a_gpu_give_the_same_graph_as_on_the_cpu() -> None:
    model = _tiny_mlp()
    reference = weight_graph(model)
    _assert_same_graph(weight_graph(model.to("cuda", torch.float16)), reference)


def test_with_weights_roundtrip_reproduces_the_graph() -> None:
    torch.manual_seed(3)
    graph = weight_graph(_TinyResNet().eval())

    same = graph.with_weights(graph.weights())
    _assert_same_graph(same, graph)
    assert same.merged == graph.merged

    rng = np.random.default_rng(0)
    shuffled = graph.with_weights(
        [rng.permutation(w.ravel()).reshape(w.shape) for w in graph.weights()]
    )
    assert shuffled.adjacency.shape == graph.adjacency.shape
    assert not np.allclose(_dense(shuffled), _dense(graph))
    with pytest.raises(GraphError, match="shape"):
        graph.with_weights([w.ravel() for w in graph.weights()])


class _SharedLayerTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.shared(F.relu(self.shared(F.relu(self.inp(x)))))))


@pytest.mark.parametrize(
    "build",
    [_TinyResNet, lambda: _ConvFlattenLinear(nn.Flatten()), _SharedLayerTwice],
    ids=["resnet-bn-residual", "conv-flatten-linear", "layer-called-twice"],
)
def test_live_weights_rebuild_the_graph_of_the_trained_model_without_tracing(
    build: Callable[[], nn.Module],
) -> None:
    """What the tracker does after its first due step: the traced topology, weights read again."""
    from cluster_tracking.graph import live_weights

    torch.manual_seed(4)
    model = build()
    first = weight_graph(model)
    with torch.no_grad():  # "training": every parameter and BatchNorm statistic moves
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_var is not None
                module.running_var.mul_(torch.rand_like(module.running_var) + 0.5)
    again = first.with_weights(live_weights(model, first))
    _assert_same_graph(again, weight_graph(model))
    assert not np.allclose(_dense(again), _dense(first))
    # the tracker's first due step: the topology alone, its adjacency assembled elsewhere
    topology = weight_topology(model)
    assert topology.adjacency.nnz == 0
    _assert_same_graph(topology.with_weights(live_weights(model, topology)), weight_graph(model))


def test_live_weights_of_a_changed_model_is_an_error() -> None:
    from cluster_tracking.graph import live_weights

    graph = weight_graph(_SharedLayerTwice())
    wider = _SharedLayerTwice()
    wider.out = nn.Linear(8, 5)
    with pytest.raises(GraphError, match="shape"):
        live_weights(wider, graph)


def test_masks_quantized_integers_and_all_zero_weights_are_refused() -> None:
    with pytest.raises(GraphError, match=r"torch\.bool values \(a mask\)"):
        weight_graph({"0.weight": torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(GraphError, match=r"torch\.int8 values \(quantized weights without"):
        weight_graph({"0.weight": torch.ones(3, 2, dtype=torch.int8)})
    zero = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    for layer in (zero[0], zero[2]):
        nn.init.zeros_(layer.weight)
    with pytest.raises(GraphError, match=r"Every weight .* is zero"):
        weight_graph(zero)


# --- layering ---------------------------------------------------------------------------------


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_graph_imports_nothing_of_the_layers_above_it() -> None:
    """graph/ is below spectral/ and everything that partitions or measures: its block-by-block
    linear algebra (edge pieces, degrees, the Dask block holders) lives in graph/ itself, so data
    flows one way and the graph's types load without the partition code."""
    package = Path(cluster_tracking.__file__).parent
    above = ("spectral", "nulls", "measure", "viz", "promote", "tracking", "integrations", "cli")
    for path in sorted((package / "graph").glob("*.py")):
        upward = {
            module
            for module in _imported_modules(path)
            if module.startswith(tuple(f"cluster_tracking.{name}" for name in above))
        }
        assert not upward, f"{path.name} imports {sorted(upward)}"


def test_torch_free_graph_modules_import_no_torch() -> None:
    """The graph's types, its edge pieces, the Dask block holders and the memory-mapped reader
    (what a Dask worker or the tracker's child imports) load without torch, in a fresh
    interpreter."""
    modules = ["types", "edges", "remote", "mapped", "numbering", "features"]
    code = (
        "import sys\n"
        + "".join(f"import cluster_tracking.graph.{name}\n" for name in modules)
        + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
