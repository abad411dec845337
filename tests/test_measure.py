"""measure() and its report: the invariances a user relies on, and the JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import cluster_tracking as ct


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)
    )


def test_report_fields_are_consistent() -> None:
    model = mlp()
    report = ct.measure(model, k=5, shuffles=0, seed=0)
    graph = ct.weight_graph(model)
    assert report.baseline is None
    assert report.k == 5
    assert report.nodes.total == 16 + 32 + 32 + 8 == graph.n_nodes
    assert report.nodes.removed == 0 and report.nodes.clustered == report.nodes.total
    assert [layer.width for layer in report.layers] == [16, 32, 32, 8]
    labels = np.array(report.partition.labels)
    assert ct.ncut(graph, labels) == pytest.approx(report.ncut)
    assert sum(c.ncut_term for c in report.partition.clusters) == pytest.approx(report.ncut)
    assert sum(c.size for c in report.partition.clusters) == report.nodes.clustered
    assert report.ave_in_out == pytest.approx((1 - report.ncut / 5) / (2 * report.ncut / 5))
    for cluster in report.partition.clusters:
        assert sum(cluster.per_layer.values()) == cluster.size
        assert cluster.ncut_term == pytest.approx(cluster.cut / cluster.volume)
    joined = [label for name in graph.layer_names for label in report.partition.by_layer[name]]
    assert joined == report.partition.labels
    assert len(report.eigenvalues) == 5 and report.eigenvalues[0] == pytest.approx(0, abs=1e-9)
    assert {"graph", "partition", "baseline", "total"} <= set(report.timings)
    assert report.config["seed"] == 0 and report.versions["torch"] == torch.__version__


def test_json_round_trip_is_exact_and_strict() -> None:
    report = ct.measure(mlp(), k=4, shuffles=5, seed=1, n_jobs=1)
    text = report.to_json()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["schema_version"] == 1
    again = ct.ClusterabilityReport.from_json(text)
    assert again == report
    assert again.to_json() == text


def test_json_from_a_newer_schema_is_refused_clearly() -> None:
    data = json.loads(ct.measure(mlp(), k=4, shuffles=0, seed=0).to_json())
    data["schema_version"] = 99
    with pytest.raises(ct.SourceError, match="Upgrade cluster-tracking"):
        ct.ClusterabilityReport.from_json(json.dumps(data))
    with pytest.raises(ct.SourceError, match="not valid JSON"):
        ct.ClusterabilityReport.from_json("{")


def test_permuting_hidden_units_does_not_change_the_ncut() -> None:
    """A functionally identical network (hidden units reordered) is just as clusterable."""
    model = mlp(3)
    permuted = mlp(3)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        permuted[0].weight.copy_(model[0].weight[order])
        permuted[0].bias.copy_(model[0].bias[order])
        permuted[2].weight.copy_(model[2].weight[:, order])
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), permuted(x))
    ncuts = [
        ct.measure(m, k=6, shuffles=0, seed=s).ncut for m in (model, permuted) for s in range(3)
    ]
    original, shuffled = np.array(ncuts[:3]), np.array(ncuts[3:])
    # clustering noise only: the best of a few seeds agrees closely
    assert shuffled.min() == pytest.approx(original.min(), rel=0.01)


def test_scaling_all_weights_does_not_change_the_ncut() -> None:
    model = mlp(4)
    scaled = mlp(4)
    with torch.no_grad():
        for parameter in scaled.parameters():
            parameter.mul_(7.5)
    first = ct.measure(model, k=6, shuffles=0, seed=0)
    second = ct.measure(scaled, k=6, shuffles=0, seed=0)
    assert second.ncut == pytest.approx(first.ncut, rel=1e-9)
    assert second.partition.labels == first.partition.labels


def test_conv_batchnorm_model_measures_like_its_folded_equivalent() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(-2, 2)
            bn.running_var.uniform_(0.5, 3)
    model = model.double().eval()  # the hand-folded reference is exact in float64
    folded = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).double()
    with torch.no_grad():
        for conv, bn, target in ((model[0], model[1], folded[0]), (model[3], model[4], folded[2])):
            scale = bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
            target.weight.copy_(conv.weight * scale[:, None, None, None])
    first = ct.measure(model, k=4, shuffles=0, seed=0)
    second = ct.measure(folded, k=4, shuffles=0, seed=0)
    assert first.ncut == pytest.approx(second.ncut, rel=1e-9)
    assert first.partition.labels == second.partition.labels


def test_state_dict_measures_like_the_model() -> None:
    model = mlp(5)
    from_model = ct.measure(model, k=4, shuffles=4, seed=2, n_jobs=1)
    from_weights = ct.measure(model.state_dict(), k=4, shuffles=4, seed=2, n_jobs=1)
    assert from_weights.ncut == from_model.ncut
    assert from_weights.baseline == from_model.baseline


def test_settings_are_validated_once_before_the_graph_is_built() -> None:
    """MeasureConfig refuses a bad setting with its message, before any work on the model: an
    object that is no model at all is never looked at when a setting is wrong."""
    from cluster_tracking.config import MeasureConfig

    not_a_model = object()
    cases = [
        ({"k": "many"}, "k must be an integer, a list of integers or 'auto', got 'many'"),
        ({"k": []}, "k is an empty list"),
        ({"k": [3, 4, 3]}, r"k lists a value twice: \[3, 4, 3\]"),
        ({"shuffles": 1}, "at least 2 networks"),
        ({"shuffle": "rows"}, "unknown null model 'rows'"),
        ({"preset": "paper"}, "preset must be 'default' or 'filan2021'"),
        ({"seed": -1}, "seed must be a non-negative integer or None"),
        ({"scheduler": "tcp://127.0.0.1:1"}, r"scheduler is only used with backend='dask'"),
    ]
    for options, message in cases:
        with pytest.raises(ct.ConfigError, match=message):
            ct.measure(not_a_model, **options)  # type: ignore[arg-type]
        with pytest.raises(ct.ConfigError, match=message):
            MeasureConfig(**options)
    # without a null model a scheduler is unused, as before: no error
    MeasureConfig(shuffles=0, scheduler="tcp://127.0.0.1:1")


def test_a_config_is_resolved_and_frozen() -> None:
    import dataclasses

    from cluster_tracking.config import MeasureConfig

    config = MeasureConfig(k=[4, 6], seed=None, layers=["0", "2"], n_jobs=None)
    assert config.k == (4, 6) and config.sweep
    assert isinstance(config.seed, int) and config.seed >= 0  # drawn, and recorded
    assert config.layers_list() == ["0", "2"] and config.jobs == 1
    assert not config.uses_worker_processes
    assert MeasureConfig(n_jobs=3).jobs == 3 and MeasureConfig(n_jobs=3).uses_worker_processes
    assert not MeasureConfig(n_jobs=3, shuffle="random_init").uses_worker_processes
    assert MeasureConfig(backend="dask").jobs == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k = 3  # type: ignore[misc]


def test_a_sweep_of_k_returns_one_report_per_k_with_the_config_recorded() -> None:
    reports = ct.measure(mlp(6), k=[3, 5], shuffles=0, seed=4, layers=["0", "2", "4"])
    assert [report.k for report in reports] == [3, 5]
    for report in reports:
        assert report.config["k"] == report.k and report.config["seed"] == 4
        assert report.config["layers"] == ["0", "2", "4"]
        assert report.config["backend"] == "loky" and report.config["method"] == "layer"
