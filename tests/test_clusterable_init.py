"""Clusterable initialisation (Filan et al. 2021, promoting clusterability): which weights are
scaled by how much, the unchanged expected scale, the planted modules, and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph import weight_graph
from cluster_tracking.promote.clusterable_init import clusterable_init_, module_assignment
from cluster_tracking.spectral.cuts import ncut


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )


class _SmallCNN(nn.Module):
    """Conv + BatchNorm, a grouped conv, and a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, groups=4)
        self.fc = nn.Linear(12 * 2 * 2, 10)
        self.out = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.out(F.relu(self.fc(x.flatten(1))))


def _cnn(seed: int = 0) -> _SmallCNN:
    torch.manual_seed(seed)
    return _SmallCNN()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _up(modules: int, down_weight: float) -> float:
    return 1 + (1 - down_weight) * (modules - 1)


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_each_weight_is_scaled_by_up_within_and_by_d_between_modules(make: object) -> None:
    assert callable(make)
    model = make()
    before = _weights(model)
    graph = weight_graph(model)
    labels = module_assignment(graph, 5, seed=3)

    clusterable_init_(model, modules=5, down_weight=0.4, seed=3)

    up, down = _up(5, 0.4), 0.4
    after = _weights(model)
    for block in graph.blocks:
        ratio = (after[f"{block.name}.weight"] / before[f"{block.name}.weight"]).numpy()
        n_out, n_in = ratio.shape[:2]
        rows, cols = np.meshgrid(np.arange(n_out), np.arange(n_in), indexing="ij")  # W[b, a]
        if block.kind == "flatten":  # flattened input a comes from channel a // S
            src = block.src[cols // (n_in // len(block.src))]
        elif block.kind == "conv":  # output channel b of group g reads channel g * n_in + a
            src = block.src[(rows // (n_out // block.groups)) * n_in + cols]
        else:
            src = block.src[cols]
        same = labels[block.dst[rows]] == labels[src]
        expected = np.where(same, up, down).reshape(ratio.shape[:2] + (1,) * (ratio.ndim - 2))
        np.testing.assert_allclose(ratio, np.broadcast_to(expected, ratio.shape), rtol=1e-5)
    for name, value in before.items():  # biases and BatchNorm untouched
        if not name.endswith("weight") or name.startswith("bn"):
            torch.testing.assert_close(after[name], value)


def test_the_expected_weight_scale_is_unchanged() -> None:
    ratios = []
    for seed in range(8):
        model = _mlp(seed)
        before = torch.cat([p.detach().abs().flatten() for p in model.parameters() if p.ndim > 1])
        clusterable_init_(model, modules=8, down_weight=0.5, seed=seed)
        after = torch.cat([p.detach().abs().flatten() for p in model.parameters() if p.ndim > 1])
        ratios.append(float(after.mean() / before.mean()))
    # E[factor] = up / m + d (m - 1) / m = 1 for every weight
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.02)


def test_weight_mass_concentrates_within_the_planted_modules() -> None:
    model = _mlp()
    clusterable_init_(model, modules=6, down_weight=0.3, seed=1)
    graph = weight_graph(model)
    labels = module_assignment(graph, 6, seed=1)

    adjacency = graph.adjacency.tocoo()
    within = labels[adjacency.row] == labels[adjacency.col]
    mass_within = adjacency.data[within].sum() / adjacency.data.sum()
    assert within.mean() < 0.25  # about 1 / m of the entries
    assert mass_within > 2 * within.mean()  # about up / m of the mass
    # ... so the planted partition has a lower n-cut than the same partition before the init
    assert ncut(graph, labels) < 0.8 * ncut(weight_graph(_mlp()), labels)


def test_output_units_get_modules_of_their_own() -> None:
    labels = module_assignment(weight_graph(_mlp()), 10, seed=0)
    outputs = labels[-8:]
    assert len(set(outputs.tolist())) == 8


def test_a_seed_makes_it_deterministic() -> None:
    first = _weights(clusterable_init_(_cnn(), modules=4, down_weight=0.5, seed=7))
    again = _weights(clusterable_init_(_cnn(), modules=4, down_weight=0.5, seed=7))
    other = _weights(clusterable_init_(_cnn(), modules=4, down_weight=0.5, seed=8))
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
    assert any(not torch.equal(other[name], first[name]) for name in first)


def test_one_module_or_no_down_weighting_changes_nothing() -> None:
    for modules, down_weight in ((1, 0.2), (6, 1.0)):
        model = _mlp()
        before = _weights(model)
        assert clusterable_init_(model, modules=modules, down_weight=down_weight) is model
        for name, value in _weights(model).items():
            torch.testing.assert_close(value, before[name])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modules": 0}, "modules must be"),
        ({"down_weight": 1.5}, "down_weight must be"),
        ({"down_weight": -0.1}, "down_weight must be"),
    ],
)
def test_bad_arguments_raise_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        clusterable_init_(_mlp(), **kwargs)  # type: ignore[arg-type]
