"""The W&B sink: what an offline W&B run holds after a training loop logged clusterability to it.

Real components only: W&B in offline mode (``WANDB_MODE=offline``, every W&B folder in a temporary
directory, nothing reaches the network), a tiny MLP trained for a few steps, the real tracker and
measurement. The run's ``.wandb`` record log and ``files/`` are read back with
:mod:`_wandb_offline`. W&B failures are real ones: the run's media folder blocked by a file, a run
finished too early.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from _wandb_offline import OfflineRun, find_run_dir, offline_wandb, read_offline_run
from torch import nn

from cluster_tracking.errors import ClusterTrackingWarning, SinkError
from cluster_tracking.integrations.wandb import (
    CLUSTER_TABLE_COLUMNS,
    INSTALL_HINT,
    PARTITION_ARTIFACT_TYPE,
    STEP_METRIC,
    SUMMARY_ARTIFACT_TYPE,
    WandbSink,
    image_caption,
)
from cluster_tracking.report import (
    METRIC_KEYS,
    STEP_ARTIFACTS,
    SUMMARY_ARTIFACTS,
    ClusterabilityReport,
)
from cluster_tracking.tracking.tracker import ClusterabilityTracker

FAST: dict[str, Any] = {"k": 3, "shuffles": 4, "n_jobs": 1, "seed": 3, "on_backlog": "queue"}


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An offline W&B environment in ``tmp_path``: no login, no network, no git, no stats."""
    with offline_wandb(tmp_path / "wandb-home", monkeypatch) as home:
        yield home


def start_run(root: Path) -> Any:
    return wandb.init(
        project="cluster-tracking-tests",
        dir=str(root),
        mode="offline",
        settings=wandb.Settings(
            x_disable_stats=True, x_disable_meta=True, console="off", disable_git=True
        ),
    )


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def train(
    model: nn.Module, tracker: ClusterabilityTracker, run: Any, steps: int
) -> dict[int, float]:
    """A plain loop that logs its own loss with explicit steps; returns the losses by step."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = {}
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses[step] = float(loss.detach())
        run.log({"train/loss": losses[step]}, step=step)
        tracker.step(model, step)
    return losses


def read_run(root: Path, run: Any) -> OfflineRun:
    return read_offline_run(find_run_dir(root, run.id))


def assert_metrics_match(offline: OfflineRun, reports: list[ClusterabilityReport]) -> None:
    """Every metric of every report is in the run once, at its ``clusterability/step``."""
    for key in METRIC_KEYS:
        expected = {
            report.step: report.metrics()[key] for report in reports if key in report.metrics()
        }
        assert offline.series(key, STEP_METRIC) == pytest.approx(expected), key


def test_metrics_table_images_artifacts_and_summary_land_in_the_run(
    wandb_dir: Path, tmp_path: Path
) -> None:
    run = start_run(wandb_dir)
    sink = WandbSink(spool_dir=tmp_path / "spool")  # the current wandb.run
    assert sink.run is run
    # no budget: every step draws its plots (under one, the first measurement may or may not,
    # as it is taken before or after close() begins: tests/test_tracker_budget.py)
    tracker = ClusterabilityTracker([sink], every_n_steps=3, max_overhead=None, **FAST)
    losses = train(tiny_mlp(), tracker, run, steps=10)
    tracker.close()
    assert sink.pending == 0
    run.finish()
    offline = read_run(wandb_dir, run)
    reports = tracker.reports
    steps = [0, 3, 6, 9]
    assert [report.step for report in reports] == steps

    # Own step metric; every measured step's metrics at it, once.
    assert offline.metric_definitions[STEP_METRIC] == ""
    assert offline.metric_definitions["clusterability/*"] == STEP_METRIC
    assert_metrics_match(offline, reports)
    # The loop's own rows at its own steps: none dropped, none moved.
    assert offline.series("train/loss", "_step") == pytest.approx(losses)
    assert offline.config["clusterability.k"] == 3
    assert offline.config["clusterability.seed"] == 3

    rows = {row[STEP_METRIC]: row for row in offline.rows_with("clusterability/ncut")}
    partitions = offline.artifacts_named(f"clusterability-partition-{run.id}")
    # versions on the default schedule (partition_every=10): the first step, and the last at the end
    assert [artifact.metadata["step"] for artifact in partitions] == [0, 9]
    versions = {artifact.metadata["step"]: artifact for artifact in partitions}
    for report in reports:
        folder = f"clusterability/step-{report.step}"
        artifact = versions.get(report.step)
        if artifact is not None:
            # A version is aliased by step and holds the report and both plots.
            assert artifact.type == PARTITION_ARTIFACT_TYPE
            assert set(artifact.aliases) == {f"step-{report.step}", "latest"}
            assert set(artifact.files) == {f"{folder}/{name}" for name in STEP_ARTIFACTS}
            assert artifact.metadata["ncut"] == pytest.approx(report.ncut)
            staged = ClusterabilityReport.from_json(
                artifact.files[f"{folder}/report.json"].read_text()
            )
            assert staged.step == report.step
            assert staged.partition.labels == report.partition.labels

        # The cluster table: one row per cluster, per-layer node counts.
        row = rows[report.step]
        table = json.loads((offline.files / row["clusterability/clusters"]["path"]).read_text())
        layers = [layer.name for layer in report.layers]
        assert table["columns"] == [*CLUSTER_TABLE_COLUMNS, *layers]
        assert len(table["data"]) == len(report.partition.clusters)
        for values, cluster in zip(table["data"], report.partition.clusters, strict=True):
            assert values[:2] == [cluster.cluster, cluster.size]
            assert values[2:5] == pytest.approx([cluster.cut, cluster.volume, cluster.ncut_term])
            assert values[5:] == [cluster.per_layer.get(name, 0) for name in layers]
        assert sum(sum(values[5:]) for values in table["data"]) == report.nodes.clustered

        # The plots in the row are the very PNGs of the artifact, captioned with their step.
        for name in ("adjacency", "cluster_matrix", "composition"):
            image = row[f"clusterability/{name}"]
            assert image["_type"] == "image-file"
            assert image["caption"] == f"measured at step {report.step}"
            logged = (offline.files / image["path"]).read_bytes()
            if artifact is not None:
                assert logged == artifact.files[f"{folder}/{name}.png"].read_bytes()

    # The end: summary artifact, native trajectory plot with the null band, summary fields.
    (summary_artifact,) = offline.artifacts_named(f"clusterability-summary-{run.id}")
    assert summary_artifact.type == SUMMARY_ARTIFACT_TYPE
    assert set(summary_artifact.files) == {f"clusterability/{name}" for name in SUMMARY_ARTIFACTS}
    summary_json = json.loads(summary_artifact.files["clusterability/summary.json"].read_text())
    assert summary_json["steps"] == steps
    (end_row,) = offline.rows_with("clusterability/trajectory_table")
    assert end_row["clusterability/trajectory_image"]["_type"] == "image-file"
    assert end_row["clusterability/report"]["_type"] == "html-file"
    chart = json.loads(
        (offline.files / end_row["clusterability/trajectory_table"]["path"]).read_text()
    )
    assert chart["columns"] == ["step", "lineKey", "lineVal"]
    lines: dict[str, dict[int, float]] = {}
    for step, line, value in chart["data"]:
        lines.setdefault(line, {})[step] = value
    band = {report.step: report.baseline for report in reports if report.baseline is not None}
    assert lines["ncut"] == pytest.approx({report.step: report.ncut for report in reports})
    assert lines["null mean"] == pytest.approx({s: b.mean for s, b in band.items()})
    assert lines["null mean - std"] == pytest.approx({s: b.mean - b.std for s, b in band.items()})
    assert lines["null mean + std"] == pytest.approx({s: b.mean + b.std for s, b in band.items()})
    assert "clusterability/trajectory" in offline.config["_wandb"]["visualize"]

    last = reports[-1]
    assert last.baseline is not None and last.baseline.z_score is not None
    assert offline.summary["clusterability/final_ncut"] == pytest.approx(last.ncut)
    assert offline.summary["clusterability/final_z_score"] == pytest.approx(last.baseline.z_score)
    assert offline.summary["clusterability/final_p_value"] == pytest.approx(last.baseline.p_value)
    assert offline.summary["clusterability/final_step"] == 9


IMAGES = ("adjacency", "cluster_matrix", "composition")


def test_a_row_measured_in_time_lands_at_its_own_wandb_step_with_its_images(
    wandb_dir: Path, tmp_path: Path
) -> None:
    """A loop slower than its measurements (here: it waits for each one): the metrics, images and
    cluster table of step s land in the loop's own W&B row of step s, beside its loss (under the
    default budget the first measurement logs its metrics before any plots: no images there)."""
    run = start_run(wandb_dir)
    sink = WandbSink(run, spool_dir=tmp_path / "spool", partition_every=1)
    tracker = ClusterabilityTracker([sink], every_n_steps=3, **FAST)
    model = tiny_mlp()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(11):  # due: 0, 3, 6, 9; the final weights of step 10 at close()
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        run.log({"train/loss": float(loss.detach())}, step=step)
        if tracker.step(model, step):
            assert tracker.flush(timeout=120)  # delivered while the row of `step` is open
    tracker.close()
    run.finish()

    offline = read_run(wandb_dir, run)
    assert [report.step for report in tracker.reports] == [0, 3, 6, 9, 10]
    rows = offline.rows_with("clusterability/ncut")
    assert [row[STEP_METRIC] for row in rows] == [0, 3, 6, 9, 10]
    versions = {
        artifact.metadata["step"]: artifact
        for artifact in offline.artifacts_named(f"clusterability-partition-{run.id}")
    }
    drawn = [report.step for report in tracker.reports if "plots" in report.timings]
    assert drawn == [3, 6, 9, 10]
    for row in rows:
        step = row[STEP_METRIC]
        # the W&B step of the row is the measured step: media panels show it there
        assert row["_step"] == step
        assert "train/loss" in row  # the loop's own row, not one of the sink's
        assert row["clusterability/clusters"]["_type"] == "table-file"
        if step not in drawn:
            assert not any(f"clusterability/{name}" in row for name in IMAGES)
            continue
        for name in IMAGES:
            image = row[f"clusterability/{name}"]
            assert image["caption"] == image_caption(step) == f"measured at step {step}"
            logged = (offline.files / image["path"]).read_bytes()
            staged = versions[step].files[f"clusterability/step-{step}/{name}.png"]
            assert logged == staged.read_bytes()
    # the summary row comes after the loop's last step
    (end_row,) = offline.rows_with("clusterability/trajectory_table")
    assert end_row["_step"] == 11
    assert offline.series("train/loss", "_step").keys() == set(range(11))


def test_rows_delivered_late_land_after_their_step_and_name_it(
    wandb_dir: Path, tmp_path: Path
) -> None:
    """Measurements delivered after training (the sink was held until the loop ended): each row
    lands at a W&B step of its own, after the loop's last one, with the images of the step it
    measured; the loop's rows are all there."""

    class HeldSink(WandbSink):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.release = threading.Event()

        def log_report(self, report: ClusterabilityReport, step: int, artifacts: Any) -> None:
            assert self.release.wait(120), "test never released the sink"
            super().log_report(report, step, artifacts)

    run = start_run(wandb_dir)
    sink = HeldSink(run, spool_dir=tmp_path / "spool")
    # no budget: every step draws its plots (under one, the first may or may not, as it is
    # taken before or after close() begins)
    tracker = ClusterabilityTracker([sink], every_n_steps=3, max_overhead=None, **FAST)
    losses = train(tiny_mlp(), tracker, run, steps=10)  # due: 0, 3, 6, 9
    sink.release.set()
    tracker.close()
    run.finish()

    offline = read_run(wandb_dir, run)
    rows = offline.rows_with("clusterability/ncut")
    assert [row[STEP_METRIC] for row in rows] == [0, 3, 6, 9]
    # the first joins the loop's last open row (step 9), the others follow, one W&B step each
    assert [row["_step"] for row in rows] == [9, 10, 11, 12]
    for row in rows:
        for name in IMAGES:
            assert row[f"clusterability/{name}"]["caption"] == image_caption(row[STEP_METRIC])
    assert_metrics_match(offline, tracker.reports)
    assert offline.series("train/loss", "_step") == pytest.approx(losses)


def test_failing_wandb_spools_keeps_training_and_delivers_each_step_once(
    wandb_dir: Path, tmp_path: Path
) -> None:
    run = start_run(wandb_dir)
    blocker = Path(run.dir) / "media" / "images"  # W&B cannot copy images: run.log raises
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    spool = tmp_path / "spool"
    sink = WandbSink(run, spool_dir=spool, retries=2, backoff=0.01)
    # no budget: every measurement draws its plots, whose images W&B cannot copy
    tracker = ClusterabilityTracker([sink], every_n_steps=2, max_overhead=None, **FAST)
    with pytest.warns(ClusterTrackingWarning, match="spooled to") as caught:
        losses = train(tiny_mlp(), tracker, run, steps=6)
        assert tracker.flush(timeout=120)
    assert len(losses) == 6, "training went on"
    assert len([w for w in caught if "spooled to" in str(w.message)]) == 1, "one warning per outage"
    assert sink.pending == 3  # the reports of steps 0, 2, 4 wait in the spool
    assert len(list(sink.spool.path.glob("clusterability/step-*/report.json"))) == 3

    blocker.unlink()  # W&B works again: the summary call delivers everything, in order
    gc.collect()  # the model train() dropped: torch holds a bare loop's model in cycles too
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClusterTrackingWarning)
        tracker.close()
    assert sink.pending == 0
    # delivered items left the spool: no outbox line, no step folder
    assert (sink.spool.path / "outbox.jsonl").read_text() == ""
    assert list(sink.spool.path.glob("clusterability/step-*")) == []
    run.finish()

    offline = read_run(wandb_dir, run)
    reports = tracker.reports
    # the due steps (the model is gone by close(): measure_final has nothing to measure)
    assert [report.step for report in reports] == [0, 2, 4]
    assert_metrics_match(offline, reports)  # series() fails on a step logged twice
    assert offline.series("train/loss", "_step") == pytest.approx(losses)
    partitions = offline.artifacts_named(f"clusterability-partition-{run.id}")
    assert [artifact.metadata["step"] for artifact in partitions] == [0, 4]
    assert offline.summary["clusterability/final_step"] == 4


@pytest.mark.slow
def test_wandb_and_mlflow_sinks_on_one_tracker_both_get_every_step(
    wandb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from cluster_tracking.integrations.mlflow import MlflowSink

    monkeypatch.chdir(tmp_path)  # whatever MLflow writes relative to the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("both", artifact_location=(tmp_path / "mlartifacts").as_uri())
    mlflow_sink = MlflowSink(tracking_uri=uri, experiment_name="both", spool_dir=tmp_path / "ml")
    run = start_run(wandb_dir)
    wandb_sink = WandbSink(run, spool_dir=tmp_path / "wb")
    tracker = ClusterabilityTracker([mlflow_sink, wandb_sink], every_n_steps=2, plots=False, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClusterTrackingWarning)
        train(tiny_mlp(), tracker, run, steps=7)
        tracker.close()
    run.finish()

    reports = tracker.reports
    assert [report.step for report in reports] == [0, 2, 4, 6]
    assert_metrics_match(read_run(wandb_dir, run), reports)
    for key in METRIC_KEYS:
        history = client.get_metric_history(mlflow_sink.run_id, key)
        logged = {metric.step: metric.value for metric in history}
        assert logged == pytest.approx({r.step: r.metrics()[key] for r in reports}), key
    assert client.get_run(mlflow_sink.run_id).info.status == "FINISHED"


def test_run_finished_before_the_tracker_warns_and_keeps_the_data(
    wandb_dir: Path, tmp_path: Path
) -> None:
    run = start_run(wandb_dir)
    with pytest.raises(SinkError, match="W&B artifact names are"):
        WandbSink(run, artifact_name="partition of step/0")
    sink = WandbSink(run, spool_dir=tmp_path / "spool", retries=1)
    tracker = ClusterabilityTracker([sink], every_n_steps=2, plots=False, **FAST)
    train(tiny_mlp(), tracker, run, steps=3)
    assert tracker.flush(timeout=120)
    run.finish()  # too early: the summary cannot reach the run any more
    with pytest.warns(ClusterTrackingWarning) as caught:
        tracker.close()
    messages = [str(warning.message) for warning in caught]
    assert any("Call tracker.close() before run.finish()" in text for text in messages)
    assert any(f"kept in {sink.spool.path}" in text for text in messages)
    assert sink.pending == 1
    assert (sink.spool.path / "clusterability" / "summary.json").exists()


def test_no_run_is_a_clear_error(wandb_dir: Path) -> None:
    assert wandb.run is None
    with pytest.raises(SinkError, match=r"call wandb.init\(\) first or pass run="):
        WandbSink()


def test_missing_wandb_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SinkError, match=r"pip install 'cluster-tracking\[wandb\]'"):
        WandbSink()
    assert "cluster-tracking[wandb]" in INSTALL_HINT


def test_nothing_is_left_outside_wandb_dir_and_versions_follow_the_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"  # W&B's shared folders, outside WANDB_DIR
    extra = {"WANDB_DATA_DIR": str(data), "WANDB_CACHE_DIR": str(cache)}
    with offline_wandb(tmp_path / "wandb-home", monkeypatch, extra) as home:
        run = start_run(home)
        sink = WandbSink(run, spool_dir=tmp_path / "spool", partition_every=5)
        tracker = ClusterabilityTracker([sink], every_n_steps=1, **FAST)
        train(tiny_mlp(), tracker, run, steps=12)
        tracker.close()
        run.finish()
        # (wandb-core writes its own debug log to the cache folder, tracker or not)
        shared = [data, cache / "artifacts"]
        left = [path for folder in shared for path in folder.rglob("*") if path.is_file()]
        assert left == [], "W&B files outside WANDB_DIR after finish()"
        offline = read_run(home, run)
    assert [report.step for report in tracker.reports] == list(range(12))
    partitions = offline.artifacts_named(f"clusterability-partition-{run.id}")
    # measurements 0, 5 and 10 on the schedule, and the last (step 11) at the end
    assert [artifact.metadata["step"] for artifact in partitions] == [0, 5, 10, 11]
    for artifact in partitions:
        folder = f"clusterability/step-{artifact.metadata['step']}"
        assert set(artifact.files) == {f"{folder}/{name}" for name in STEP_ARTIFACTS}
        for path in artifact.files.values():
            assert home in path.parents  # staged inside WANDB_DIR, readable by `wandb sync`
        report = ClusterabilityReport.from_json(artifact.files[f"{folder}/report.json"].read_text())
        assert report.step == artifact.metadata["step"]
    (summary,) = offline.artifacts_named(f"clusterability-summary-{run.id}")
    assert set(summary.files) == {f"clusterability/{name}" for name in SUMMARY_ARTIFACTS}
