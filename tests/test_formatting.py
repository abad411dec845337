"""Numbers a person reads (report.py's helpers), the k x k cluster matrix, and run ids of the
local sink."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cluster_tracking as ct
from cluster_tracking.report import (
    MISSING,
    Baseline,
    format_diff,
    format_ncut,
    format_null,
    format_p,
    format_z,
    p_at_floor,
)
from cluster_tracking.tracking.sinks import LocalDirectorySink
from cluster_tracking.viz.plots import cluster_matrix, cluster_matrix_figure, png_bytes


def baseline(*, n: int = 20, p_value: float = 1 / 21, mean: float = 10.7) -> Baseline:
    return Baseline(
        method="layer",
        n=n,
        mean=mean,
        std=0.008595,
        z_score=-9.6321,
        p_value=p_value,
        percentile=0.0,
        diff=10.515 - mean,
        rel_diff=(10.515 - mean) / mean,
        degenerate=False,
        ncuts=[],
    )


def test_an_ncut_and_its_null_read_with_the_same_three_decimals() -> None:
    assert format_ncut(10.7) == "10.700"
    assert format_null(baseline()) == "10.700 ± 0.009"
    assert format_z(-9.6321) == "-9.63" and format_z(0.4) == "+0.40"
    assert format_diff(baseline()) == "-0.185 (-1.73%)"
    assert format_diff(baseline(mean=10.5)) == "+0.015 (+0.14%)"


def test_missing_numbers_are_a_dash_never_nan() -> None:
    assert format_ncut(None) == format_ncut(math.nan) == format_z(math.inf) == MISSING
    assert format_null(None) == format_diff(None) == format_p(None) == MISSING


def test_p_says_when_it_sits_at_its_floor() -> None:
    floor = baseline()
    assert p_at_floor(floor)
    assert format_p(floor) == "0.048 (floor)"
    assert format_p(floor, long=True) == "0.048 (the floor for 20 shuffles)"
    above = baseline(p_value=3 / 21)
    assert not p_at_floor(above)
    assert format_p(above) == format_p(above, long=True) == "0.143"


def test_the_cluster_matrix_rows_sum_to_one_and_its_trace_gives_the_ncut() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 6)
    )
    report = ct.measure(model, k=5, shuffles=0, seed=0)
    graph = ct.weight_graph(model)
    matrix = cluster_matrix(graph, report.partition.labels)
    assert matrix.shape == (5, 5)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    assert 5 - np.trace(matrix) == pytest.approx(report.ncut, rel=1e-9)
    for cluster in report.partition.clusters:  # off-diagonal share = the cluster's n-cut term
        row = matrix[cluster.cluster]
        assert row.sum() - row[cluster.cluster] == pytest.approx(cluster.ncut_term, rel=1e-9)
    assert png_bytes(cluster_matrix_figure(matrix)).startswith(b"\x89PNG")


def test_each_local_sink_run_has_an_id_in_its_report_lines(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    report = ct.measure(model, k=2, shuffles=0, seed=0)
    first, second = LocalDirectorySink(tmp_path), LocalDirectorySink(tmp_path)
    assert first.run_id != second.run_id
    first.log_params({"k": 2})
    first.log_report(report, 0, {})
    first.log_report(report, 5, {})
    second.log_params({"k": 2})
    second.log_report(report, 0, {})
    assert len(first.read_reports()) == 3
    assert [r.step for r in first.read_reports(first.run_id)] == [0, 5]
    assert [r.step for r in first.read_reports(second.run_id)] == [0]
    assert {r.config["run_id"] for r in first.read_reports()} == {first.run_id, second.run_id}
    assert report.config.get("run_id") is None  # the caller's report is not changed
    named = LocalDirectorySink(tmp_path / "named", run_id="my-run")
    named.log_params({"k": 2})
    assert (tmp_path / "named" / "params.json").read_text().count('"run_id": "my-run"') == 1
