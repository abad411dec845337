"""Weight graphs of today's architectures, followed with torch.export: each rule on a model small
enough to write its graph by hand, and the same graph whichever route builds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph import WeightGraph, live_weights, weight_graph


def _dense(graph: WeightGraph) -> np.ndarray:
    return graph.adjacency.toarray()


def _symmetric(upper: np.ndarray) -> np.ndarray:
    return upper + upper.T


def _abs(module: nn.Module, name: str = "weight") -> np.ndarray:
    return getattr(module, name).detach().double().abs().numpy()


def _assert_same_graph(a: WeightGraph, b: WeightGraph) -> None:
    assert a.layer_names == b.layer_names
    assert a.widths == b.widths
    np.testing.assert_allclose(_dense(a), _dense(b), rtol=1e-12, atol=1e-12)


# --- a transformer block, by hand ----------------------------------------------------------------


class _Block(nn.Module):
    """Pre-LN attention (2 heads of 2) and a SwiGLU MLP on a 4-channel residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.q, self.k, self.v = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.o = nn.Linear(4, 4, bias=False)
        self.gate, self.up = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
        self.down = nn.Linear(6, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        h = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, 2, 2).transpose(1, 2)

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        scores = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        attended = (scores @ v).transpose(1, 2).reshape(batch, tokens, 4)
        x = x + self.o(attended)
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


def test_transformer_block_graph_is_the_hand_built_one() -> None:
    torch.manual_seed(0)
    block = _Block()
    with torch.no_grad():
        block.norm.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 3.0]))
    graph = weight_graph(block, example_inputs=torch.zeros(1, 3, 4))

    # Nodes: the stream s (4; o and down write into it), q (4), k (4), v (4), gate = up (6).
    assert graph.layer_names == ("input", "q", "k", "v", "gate")
    assert graph.widths == (4, 4, 4, 4, 6)
    assert graph.merged == {"o": "input", "up": "gate", "down": "input"}
    gamma = np.array([0.5, 2.0, 1.0, 3.0])
    s, q, k, v, g = (slice(a, a + w) for a, w in [(0, 4), (4, 4), (8, 4), (12, 4), (16, 6)])
    upper = np.zeros((22, 22))
    upper[q, s] = _abs(block.q) * gamma  # q and k hang off the stream they read (LN folded)
    upper[k, s] = _abs(block.k) * gamma
    upper[v, s] = _abs(block.v) * gamma
    upper[s, v] = _abs(block.o)  # v's unit i is the output projection's input unit i
    upper[g, s] = _abs(block.gate) + _abs(block.up)  # gate * up: one node per unit pair
    upper[s, g] = _abs(block.down)
    np.testing.assert_allclose(_dense(graph), _symmetric(upper), rtol=1e-12)


def test_live_weights_read_folded_norms_again() -> None:
    torch.manual_seed(1)
    block = _Block()
    example = torch.zeros(1, 3, 4)
    graph = weight_graph(block, example_inputs=example)
    with torch.no_grad():
        block.norm.weight.mul_(3.0)
        block.q.weight.add_(1.0)
    _assert_same_graph(
        graph.with_weights(live_weights(block, graph)),
        weight_graph(block, example_inputs=example),
    )


class _LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 3)
        self.gamma = nn.Parameter(torch.tensor([0.1, -2.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc2(torch.relu(self.fc1(x)))


def test_a_per_unit_scale_after_a_layer_folds_into_its_output_rows() -> None:
    model = _LayerScale()
    graph = weight_graph(model, example_inputs=torch.zeros(2, 3))
    assert graph.layer_names == ("input", "fc1")
    upper = np.zeros((8, 8))
    upper[3:8, 0:3] = _abs(model.fc1)
    upper[0:3, 3:8] = _abs(model.fc2) * _abs(model, "gamma")[:, None]
    np.testing.assert_allclose(_dense(graph), _symmetric(upper), rtol=1e-12)


# --- reshapes that move the channel axis ---------------------------------------------------------


class _PermutedFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(2 * 2 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))  # [B, H, W, C] order


def test_a_flatten_after_a_permute_attributes_columns_to_their_channels() -> None:
    model = _PermutedFlatten()
    graph = weight_graph(model, example_inputs=torch.zeros(1, 1, 2, 3))
    # Column (h * 3 + w) * 2 + c comes from channel c.
    fc = _abs(model.fc)
    upper = np.zeros((6, 6))
    upper[1:3, 0:1] = _abs(model.conv).reshape(2, 1)
    upper[3:6, 1] = fc[:, 0::2].sum(axis=1)
    upper[3:6, 2] = fc[:, 1::2].sum(axis=1)
    np.testing.assert_allclose(_dense(graph), _symmetric(upper), rtol=1e-12)


class _PatchEmbedding(nn.Module):
    """A ViT's patch embedding: a strided conv, patches to tokens, channels last."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 4, 2, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [B, patches, 4]
        return self.fc(tokens).mean(1)


def test_patch_embedding_tokens_carry_the_conv_channels() -> None:
    model = _PatchEmbedding()
    graph = weight_graph(model, example_inputs=torch.zeros(1, 3, 4, 4))
    assert graph.layer_names == ("input", "patch", "fc")
    upper = np.zeros((9, 9))
    upper[3:7, 0:3] = _abs(model.patch).sum(axis=(2, 3))
    upper[7:9, 3:7] = _abs(model.fc)
    np.testing.assert_allclose(_dense(graph), _symmetric(upper), rtol=1e-12)


class _Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.tokens, self.channels = nn.Linear(3, 4), nn.Linear(5, 5), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 5 tokens, 3]
        h = self.embed(x)
        h = h + self.tokens(h.transpose(1, 2)).transpose(1, 2)
        return self.channels(h)


def test_token_mixing_mixes_positions_and_adds_no_edges() -> None:
    model = _Mixer()
    graph = weight_graph(model, example_inputs=torch.zeros(1, 5, 3))
    assert graph.layer_names == ("input", "embed", "channels")
    assert [block.name for block in graph.blocks] == ["embed", "channels"]


class _ChannelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        batch, _, height, width = y.shape
        y = y.view(batch, 2, 2, height, width).transpose(1, 2).reshape(batch, 4, height, width)
        return self.b(y)


def test_channel_shuffle_is_a_permutation_of_channels() -> None:
    model = _ChannelShuffle()
    graph = weight_graph(model, example_inputs=torch.zeros(1, 1, 2, 2))
    # b's input channel j is a's channel [0, 2, 1, 3][j].
    b = _abs(model.b).reshape(2, 4)
    upper = np.zeros((7, 7))
    upper[1:5, 0] = _abs(model.a).reshape(4)
    upper[5:7, 1 + np.array([0, 2, 1, 3])] = b
    np.testing.assert_allclose(_dense(graph), _symmetric(upper), rtol=1e-12)


# --- layers fx cannot follow --------------------------------------------------------------------


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 2, batch_first=True)
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize(("cell", "gates"), [(nn.LSTM, 4), (nn.GRU, 3)])
def test_recurrent_layers_join_input_and_hidden_units_with_summed_gate_weights(
    cell: type[nn.Module], gates: int
) -> None:
    model = _Recurrent(cell)
    graph = weight_graph(model, example_inputs=torch.zeros(1, 4, 3))
    assert graph.layer_names == ("input", "rnn.l0", "fc")
    w_ih = _abs(model.rnn, "weight_ih_l0").reshape(gates, 2, 3).sum(axis=0)
    w_hh = _abs(model.rnn, "weight_hh_l0").reshape(gates, 2, 2).sum(axis=0)
    upper = np.zeros((6, 6))
    upper[3:5, 0:3] = w_ih
    hidden = w_hh.copy()
    np.fill_diagonal(hidden, 0.0)  # a unit's weight to itself is a self-loop, dropped
    upper[3:5, 3:5] = np.triu(hidden) + np.tril(hidden).T  # both directions of a hidden pair
    upper[5:6, 3:5] = _abs(model.fc)
    np.testing.assert_allclose(_dense(graph), _symmetric(upper), rtol=1e-12)


class _UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 2, 3, padding=1)
        self.down = nn.Conv2d(2, 3, 2, stride=2)
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.enc(x))
        return self.out(torch.cat([skip, self.up(F.relu(self.down(skip)))], dim=1))


def test_transposed_convolutions_and_skip_concatenations() -> None:
    model = _UNet()
    graph = weight_graph(model, example_inputs=torch.zeros(1, 1, 4, 4))
    assert graph.layer_names == ("input", "enc", "down", "up", "out")
    assert graph.widths == (1, 2, 3, 2, 1)
    upper = np.zeros((9, 9))
    upper[1:3, 0:1] = _abs(model.enc).sum(axis=(2, 3))
    upper[3:6, 1:3] = _abs(model.down).sum(axis=(2, 3))
    upper[6:8, 3:6] = _abs(model.up).sum(axis=(2, 3)).T  # stored [in, out, *kernel]
    out = _abs(model.out).reshape(1, 4)
    upper[8, 1:3], upper[8, 6:8] = out[0, :2], out[0, 2:]
    np.testing.assert_allclose(_dense(graph), _symmetric(upper), rtol=1e-12)


def test_multihead_attention_and_transformer_encoders() -> None:
    torch.manual_seed(2)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    graph = weight_graph(encoder, example_inputs=torch.zeros(1, 5, 8))
    # The stream (8) and, per layer, q/k/v of the fused in-projection (24) and the MLP (16).
    assert graph.widths == (8, 24, 16, 24, 16)
    assert graph.merged["layers.0.linear2"] == "input"
    _assert_same_graph(
        graph.with_weights(live_weights(encoder, graph)),
        weight_graph(encoder, example_inputs=torch.zeros(1, 5, 8)),
    )


def test_embeddings_start_the_stream_and_are_blocks_on_request() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    tokens = torch.zeros(1, 5, dtype=torch.long)
    plain = weight_graph(model, example_inputs=tokens)
    assert plain.layer_names == ("0", "1") and plain.widths == (4, 3)
    full = weight_graph(model, example_inputs=tokens, include_embeddings=True)
    assert full.layer_names == ("0.index", "0", "1") and full.widths == (10, 4, 3)
    np.testing.assert_allclose(_dense(full)[10:14, 0:10], _abs(model[0]).T, rtol=1e-12)


class _DropPath(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, device=x.device) > 0.1
        return x * keep / 0.9


def test_stochastic_depth_and_dropout_pass_units_through() -> None:
    model = nn.Sequential(nn.Linear(3, 4), _DropPath(), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    graph = weight_graph(model, example_inputs=torch.zeros(2, 3))
    assert graph.layer_names == ("input", "0", "3")
    np.testing.assert_array_equal(
        _dense(graph), _dense(weight_graph(nn.Sequential(model[0], model[3])))
    )
    assert model.training  # the model's mode is left as it was


# --- the same graph by every route ---------------------------------------------------------------


class _ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.fc = nn.Conv2d(8, 16, 3, stride=2), nn.Linear(16 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = y + self.b2(self.c2(y))
        return self.fc(torch.flatten(F.relu(self.c3(y)), 1))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.fc = (
            nn.Conv2d(3, 4, 1),
            nn.Conv2d(3, 5, 1),
            nn.Conv2d(9, 6, 1),
            nn.Linear(6, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "example"),
    [
        (nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)), (2, 5)),
        (_ResNetLike(), (1, 3, 8, 8)),
        (_Concat(), (1, 3, 8, 8)),
        (
            nn.Sequential(
                nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, groups=3), nn.Flatten(), nn.Linear(96, 2)
            ),
            (1, 3, 8, 8),
        ),
    ],
    ids=["mlp-batchnorm", "resnet", "concat", "depthwise-flatten"],
)
def test_torch_fx_and_torch_export_give_the_same_graph(
    model: nn.Module, example: tuple[int, ...]
) -> None:
    torch.manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 2.0)
            module.running_var.uniform_(0.5, 2.0)
    _assert_same_graph(
        weight_graph(model), weight_graph(model, example_inputs=torch.zeros(example))
    )


# --- refusals ------------------------------------------------------------------------------------


class _ChannelCumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.cumsum(self.fc1(x), dim=-1))


def test_an_op_that_mixes_units_without_weights_is_refused_naming_the_node() -> None:
    with pytest.raises(GraphError, match=r"cumsum \(fx node 'cumsum'.*layers="):
        weight_graph(_ChannelCumsum(), example_inputs=torch.zeros(2, 3))


def test_a_model_fx_cannot_follow_is_an_error_that_names_example_inputs() -> None:
    with pytest.raises(GraphError, match=r"layer 'rnn' \(LSTM\).*example_inputs="):
        weight_graph(_Recurrent(nn.LSTM))


def test_example_inputs_the_model_rejects_are_an_error_naming_the_cause() -> None:
    with pytest.raises(GraphError, match=r"torch.export cannot trace Sequential.*example_inputs="):
        weight_graph(nn.Sequential(nn.Linear(3, 2)), example_inputs=torch.zeros(2, 7))


class _EinsumAttention(nn.Module):
    def __init__(self, einsum: bool) -> None:
        super().__init__()
        self.einsum = einsum
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.einsum:
            scores = torch.einsum("bid,bjd->bij", q, k).softmax(-1)
            return x + self.o(torch.einsum("bij,bjd->bid", scores, v))
        return x + self.o((q @ k.transpose(1, 2)).softmax(-1) @ v)


def test_attention_written_with_einsum_gives_the_matmul_graph() -> None:
    torch.manual_seed(4)
    with_einsum, with_matmul = _EinsumAttention(True), _EinsumAttention(False)
    with_matmul.load_state_dict(with_einsum.state_dict())
    example = torch.zeros(1, 3, 4)
    _assert_same_graph(
        weight_graph(with_einsum, example_inputs=example),
        weight_graph(with_matmul, example_inputs=example),
    )


def test_in_place_activations_and_dropout_pass_units_through() -> None:
    model = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Dropout(0.1, inplace=True), nn.Linear(5, 2)
    )
    _assert_same_graph(weight_graph(model, example_inputs=torch.zeros(2, 4)), weight_graph(model))


class _ReshapedScale(nn.Module):
    """timm ConvNeXt's LayerScale: ``x.mul(gamma.reshape(1, -1, 1, 1))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.tensor([5.0, -1.0, 2.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mul(self.gamma.reshape(1, -1, 1, 1))


class _OffsetNorm(nn.Module):
    """Gemma's RMSNorm scales by ``1 + weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.weight = nn.Parameter(torch.tensor([6.0, -3.0, 0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h * (1.0 + self.weight))


def test_scales_read_through_reshapes_and_offsets_fold_with_their_values() -> None:
    model = _ReshapedScale()
    graph = weight_graph(model, example_inputs=torch.zeros(1, 3, 2, 2))
    expected = _abs(model.conv).reshape(4, 3) * np.abs(_abs(model, "gamma"))[:, None]
    np.testing.assert_allclose(_dense(graph)[3:7, 0:3], expected, rtol=1e-6)

    offset = _OffsetNorm()
    graph = weight_graph(offset, example_inputs=torch.zeros(2, 3))
    factor = np.abs(1.0 + offset.weight.detach().double().numpy())
    np.testing.assert_allclose(_dense(graph)[7:9, 3:7], _abs(offset.fc2) * factor, rtol=1e-6)
    with torch.no_grad():
        offset.weight.mul_(2.0)
    again = graph.with_weights(live_weights(offset, graph))
    _assert_same_graph(again, weight_graph(offset, example_inputs=torch.zeros(2, 3)))


class _NormThenAdd(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.fc1, self.norm, self.fc2 = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)
        nn.init.constant_(self.norm.weight, 7.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.norm(h) + h if self.norm_first else h + self.norm(h))


@pytest.mark.parametrize("norm_first", [True, False])
def test_a_norm_added_to_another_tensor_is_not_folded_whatever_the_operand_order(
    norm_first: bool,
) -> None:
    model = _NormThenAdd(norm_first)
    graph = weight_graph(model, example_inputs=torch.zeros(2, 3))
    np.testing.assert_allclose(_dense(graph)[7:9, 3:7], _abs(model.fc2), rtol=1e-12)


class _NormIntoGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.rnn = nn.Linear(3, 4), nn.LayerNorm(4), nn.GRU(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.norm(self.fc(x)))[0]


def test_a_norm_the_graph_cannot_fold_is_refused_not_dropped() -> None:
    with pytest.raises(GraphError, match="normalised tensor"):
        weight_graph(_NormIntoGRU(), example_inputs=torch.zeros(5, 1, 3))


class _OffsetNormThenView(nn.Module):
    """A ``1 + weight`` norm whose output is reshaped before the layer reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.weight = nn.Parameter(torch.tensor([6.0, -3.0, 0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)) * (1.0 + self.weight)  # not read by fc1's rows: relu between
        return self.fc2(h.view(2, 1, 4).reshape(2, 4))


def test_an_offset_scale_keeps_its_offset_through_a_reshape() -> None:
    model = _OffsetNormThenView()
    graph = weight_graph(model, example_inputs=torch.zeros(2, 3))
    factor = np.abs(1.0 + model.weight.detach().double().numpy())
    np.testing.assert_allclose(_dense(graph)[7:9, 3:7], _abs(model.fc2) * factor, rtol=1e-6)
