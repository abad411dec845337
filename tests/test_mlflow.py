"""The MLflow sink against a real ``mlflow server`` on loopback (SQLite store, served artifacts).

What a user of the MLflow UI relies on: the metric histories equal the reports step by step, every
artifact exists and parses, nothing is lost or logged twice when the server goes away mid-training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import mlflow
import pytest
import torch
from _servers import DelayingProxy, MlflowServer
from mlflow import MlflowClient
from torch import nn

from cluster_tracking.errors import ClusterTrackingWarning, SinkError
from cluster_tracking.report import METRIC_KEYS, ClusterabilityReport
from cluster_tracking.tracking.tracker import ClusterabilityTracker

REPO = Path(__file__).resolve().parents[1]
# Measuring in a thread: these tests are about the sink; one test keeps the default process.
FAST: dict[str, Any] = {"k": 3, "shuffles": 4, "worker": "thread"}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The session's server, up, and the fluent API pointed at it for the test."""
    mlflow_server.start()  # a no-op unless an earlier test left it stopped
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.uri)
    yield mlflow_server
    mlflow.set_tracking_uri(previous)
    mlflow_server.start()


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


class Trainer:
    def __init__(self, model: nn.Module) -> None:
        generator = torch.Generator().manual_seed(0)
        self.model = model
        self.x = torch.randn(64, 8, generator=generator)
        self.y = torch.randint(0, 4, (64,), generator=generator)
        self.optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
        self.losses: list[float] = []

    def step(self) -> None:
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        self.losses.append(float(loss.detach()))


def metric_steps(client: MlflowClient, run_id: str) -> dict[str, Counter[int]]:
    """How many times each step was logged, for every clusterability metric."""
    return {
        key: Counter(m.step for m in client.get_metric_history(run_id, key)) for key in METRIC_KEYS
    }


def assert_run_matches(
    client: MlflowClient, run_id: str, reports: list[ClusterabilityReport], tmp_path: Path
) -> None:
    """The run holds exactly the reports: metrics step by step, every artifact readable, the
    plots of every step that drew them (all but the first under a budget, which logs its
    metrics first), the last step's among them."""
    steps = [report.step for report in reports]
    for key in METRIC_KEYS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == steps, f"{key}: one entry per measured step"
        logged = {m.step: m.value for m in history}
        assert logged == {report.step: report.metrics()[key] for report in reports}

    local = Path(client.download_artifacts(run_id, "clusterability", str(tmp_path)))
    for report in reports:
        folder = local / f"step-{report.step}"
        saved = ClusterabilityReport.from_json((folder / "report.json").read_text())
        assert saved.to_dict() == report.to_dict()
        drawn = "plots" in report.timings
        for name in ("adjacency.png", "composition.png"):
            assert (folder / name).exists() == drawn
            if drawn:
                assert matplotlib.image.imread(folder / name).ndim == 3
    assert "plots" in reports[-1].timings
    summary = json.loads((local / "summary.json").read_text())
    assert summary["steps"] == steps
    assert [ClusterabilityReport.from_dict(r).ncut for r in summary["reports"]] == [
        r.ncut for r in reports
    ]
    assert matplotlib.image.imread(local / "trajectory.png").ndim == 3
    html = (local / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and 'id="trajectory"' in html


def test_tracker_logs_every_measured_step_to_the_active_run(
    server: MlflowServer, tmp_path: Path
) -> None:
    trainer = Trainer(tiny_mlp())
    with mlflow.start_run() as run:
        from cluster_tracking.integrations.mlflow import MlflowSink

        sink = MlflowSink(spool_dir=tmp_path / "spool")
        assert sink.run_id == run.info.run_id and sink.tracking_uri == server.uri
        tracker = ClusterabilityTracker(
            [sink],
            every_n_steps=3,
            on_backlog="queue",
            k=3,
            shuffles=4,  # default worker
        )
        for step in range(10):
            trainer.step()
            tracker.step(trainer.model, step)
        tracker.close()

    client = MlflowClient(server.uri)
    assert [report.step for report in tracker.reports] == [0, 3, 6, 9]
    assert_run_matches(client, run.info.run_id, tracker.reports, tmp_path / "download")
    params = client.get_run(run.info.run_id).data.params
    assert params["clusterability.k"] == "3"
    assert params["clusterability.shuffles"] == "4"
    assert params["clusterability.method"] == "layer"
    assert params["clusterability.seed"] == "0"
    assert params["clusterability.version"]
    assert sink.pending == 0


def test_sink_without_a_run_creates_one_and_finishes_it(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from cluster_tracking.integrations.mlflow import MlflowSink

    mlflow_server.start()
    sink = MlflowSink(
        tracking_uri=mlflow_server.uri,
        experiment_name="cluster-tracking-tests",
        run_name="created-by-the-sink",
        spool_dir=tmp_path / "spool",
    )
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(sink.run_id).info.status == "RUNNING"
    with ClusterabilityTracker([sink], **FAST) as tracker:
        tracker.checkpoint(tiny_mlp(), 7)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "created-by-the-sink"
    assert client.get_experiment(run.info.experiment_id).name == "cluster-tracking-tests"
    assert_run_matches(client, sink.run_id, tracker.reports, tmp_path / "download")


@pytest.mark.slow
def test_server_outage_mid_training_loses_nothing_and_logs_nothing_twice(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster_tracking.integrations.mlflow import MlflowSink

    # A request caught mid-flight by the outage would otherwise retry inside MLflow's client for
    # minutes (its default); with one retry it fails fast and the sink's own retry/spool handles it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    server = mlflow_server
    server.start()
    client = MlflowClient(server.uri)
    run_id = client.create_run("0", run_name="outage").info.run_id
    sink = MlflowSink(run_id, tracking_uri=server.uri, spool_dir=tmp_path, retries=2, backoff=0.2)
    trainer = Trainer(tiny_mlp())
    tracker = ClusterabilityTracker([sink], every_n_steps=2, on_backlog="queue", **FAST)
    try:
        with pytest.warns(ClusterTrackingWarning, match="unreachable"):
            for step in range(16):
                trainer.step()
                tracker.step(trainer.model, step)
                if step == 5:
                    server.stop()  # the server dies in the middle of training (returns when down)
                if step == 8:
                    assert tracker.flush(120)  # steps 6 and 8 were measured with the server down
                    assert sink.pending > 0, "with the server down, reports wait in the spool"
                    server.start()  # same port, same SQLite store and artifact folder
            tracker.close()
    finally:
        server.start()

    assert len(trainer.losses) == 16  # training never stopped
    assert sink.pending == 0
    measured = [report.step for report in tracker.reports]
    assert measured == [*range(0, 16, 2), 15]  # 15: the final weights, measured at close()
    counts = metric_steps(client, run_id)
    for key in METRIC_KEYS:
        assert counts[key] == Counter(measured), f"{key}: each step exactly once"
    assert_run_matches(client, run_id, tracker.reports, tmp_path / "download")
    record = json.loads((tmp_path / run_id / "delivered.json").read_text())
    assert record["attempted"] == [] and record["dropped"] == []


@pytest.mark.slow
def test_a_spool_left_behind_is_delivered_by_a_later_sink(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from cluster_tracking.integrations.mlflow import MlflowSink

    server = mlflow_server
    server.start()
    client = MlflowClient(server.uri)
    run_id = client.create_run("0", run_name="offline").info.run_id
    server.stop()
    try:
        sink = MlflowSink(run_id, tracking_uri=server.uri, spool_dir=tmp_path, retries=1)
        trainer = Trainer(tiny_mlp())
        with pytest.warns(ClusterTrackingWarning) as caught:
            with ClusterabilityTracker(
                [sink], every_n_steps=2, on_backlog="queue", **FAST
            ) as tracker:
                for step in range(5):
                    trainer.step()
                    tracker.step(trainer.model, step)
        messages = [str(warning.message) for warning in caught]
        assert any("unreachable" in message for message in messages)
        assert any(f"kept in {tmp_path / run_id}" in message for message in messages)
        assert sink.pending > 0
        assert (tmp_path / run_id / "outbox.jsonl").exists()
    finally:
        server.start()

    # A later process (e.g. after the job ended) delivers what the first one spooled.
    later = MlflowSink(run_id, tracking_uri=server.uri, spool_dir=tmp_path)
    assert later.pending == sink.pending
    later.close()
    assert later.pending == 0
    for key, counts in metric_steps(client, run_id).items():
        assert counts == Counter(r.step for r in tracker.reports), key
    assert_run_matches(client, run_id, tracker.reports, tmp_path / "download")


def test_a_send_of_unknown_outcome_is_checked_before_resending(
    server: MlflowServer, tmp_path: Path
) -> None:
    from cluster_tracking.integrations.mlflow import MlflowSink

    class LostAnswerSink(MlflowSink):
        """The server stores the first metrics batch, but its answer never arrives."""

        lost = False

        def _send_metrics(self, keys: Any) -> None:
            super()._send_metrics(keys)
            if not self.lost:
                self.lost = True
                raise ConnectionError("connection reset before the answer")

    client = MlflowClient(server.uri)
    run_id = client.create_run("0").info.run_id
    sink = LostAnswerSink(run_id, tracking_uri=server.uri, spool_dir=tmp_path, backoff=0.01)
    with ClusterabilityTracker([sink], **FAST) as tracker:
        tracker.checkpoint(tiny_mlp(), 3)
    assert sink.lost and sink.pending == 0
    # the retry found the metrics on the server and did not send them again
    assert metric_steps(client, run_id)["clusterability/ncut"] == Counter({3: 1})


def test_delivered_items_leave_the_spool_at_once(server: MlflowServer, tmp_path: Path) -> None:
    from cluster_tracking.integrations.mlflow import MlflowSink

    client = MlflowClient(server.uri)
    run_id = client.create_run("0").info.run_id
    sink = MlflowSink(run_id, tracking_uri=server.uri, spool_dir=tmp_path)
    spool = tmp_path / run_id
    trainer = Trainer(tiny_mlp())
    tracker = ClusterabilityTracker([sink], every_n_steps=2, on_backlog="queue", **FAST)
    for step in range(9):
        trainer.step()
        tracker.step(trainer.model, step)
        if step % 4 == 0:
            assert tracker.flush(60) and sink.flush(60)
            # everything so far is on the server, and nothing of it is left in the spool
            assert sink.pending == 0
            assert list(spool.glob("clusterability/step-*/*")) == []
            assert (spool / "outbox.jsonl").read_text() == ""
            record = json.loads((spool / "delivered.json").read_text())
            assert record["done"] == [] and record["next_seq"] == 1 + step // 2 + 1
    tracker.close()
    assert sink.pending == 0
    assert_run_matches(client, run_id, tracker.reports, tmp_path / "download")
    assert [m.value for m in client.get_metric_history(run_id, "clusterability/skipped_steps")] == [
        0.0
    ] * 5


@pytest.mark.slow
def test_a_server_answering_in_two_seconds_gets_everything_once(
    server: MlflowServer, tmp_path: Path
) -> None:
    from cluster_tracking.integrations.mlflow import MlflowSink

    client = MlflowClient(server.uri)
    run_id = client.create_run("0").info.run_id
    with DelayingProxy(server.port, delay=2.0) as proxy:
        # close_timeout bounds the time without an answer, not the whole close(): the backlog
        # at close() takes several 2-s requests in turn, and all of it arrives
        sink = MlflowSink(run_id, tracking_uri=proxy.uri, spool_dir=tmp_path, close_timeout=6.0)
        trainer = Trainer(tiny_mlp())
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClusterTrackingWarning)  # slow is not unreachable
            with ClusterabilityTracker(
                [sink], every_n_steps=2, on_backlog="queue", **FAST
            ) as tracker:
                for step in range(8):
                    trainer.step()
                    tracker.step(trainer.model, step)
        assert all("/health" not in line for line in proxy.request_lines), (
            proxy.request_lines
        )  # never probed
        batches = [line for line in proxy.request_lines if line.endswith("/runs/log-batch")]
    assert sink.pending == 0
    # steps 0, 2, 4, 6 and the final weights of step 7 (measure_final)
    assert [report.step for report in tracker.reports] == [0, 2, 4, 6, 7]
    # params once, and the metrics of the 5 measurements in at most 5 requests (a backlog in one)
    assert 2 <= len(batches) <= 6
    params = client.get_run(run_id).data.params
    assert params["clusterability.k"] == "3"
    counts = metric_steps(client, run_id)
    for key in METRIC_KEYS:
        assert counts[key] == Counter(r.step for r in tracker.reports), key
    assert_run_matches(client, run_id, tracker.reports, tmp_path / "download")


@pytest.mark.slow
def test_example_script_runs_as_written(server: MlflowServer, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "mlflow_training_loop.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split("MLflow run ", 1)[1].split()[0]
    printed = [int(line.split()[1]) for line in result.stdout.splitlines() if line[:5] == "step "]
    assert printed[0] == 0 and set(printed) <= set(range(0, 301, 50))  # some may be skipped
    client = MlflowClient(server.uri)
    history = client.get_metric_history(run_id, "clusterability/ncut")
    assert sorted(m.step for m in history) == printed
    assert not (tmp_path / "mlflow.db").exists(), "MLFLOW_TRACKING_URI was honoured"


def test_missing_mlflow_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster_tracking.integrations.mlflow import MlflowSink

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when absent
    with pytest.raises(SinkError, match=r"pip install 'cluster-tracking\[mlflow\]'"):
        MlflowSink()


def test_the_core_does_not_import_mlflow() -> None:
    code = (
        "import sys, cluster_tracking, cluster_tracking.tracking.tracker, "
        "cluster_tracking.tracking.sinks, cluster_tracking.viz.plots, "
        "cluster_tracking.viz.html_report, cluster_tracking.integrations.mlflow"
        "\nassert 'mlflow' not in sys.modules, 'mlflow was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_importing_the_platform_sinks_loads_no_torch_and_no_platform() -> None:
    """``import cluster_tracking.integrations.mlflow`` (and ``.wandb``) is cheap: torch, mlflow
    and wandb are imported when a sink is created (or its rank is asked), never at import."""
    code = (
        "import sys, cluster_tracking.integrations.mlflow, cluster_tracking.integrations.wandb"
        "\nloaded = [name for name in ('torch', 'mlflow', 'wandb') if name in sys.modules]"
        "\nassert not loaded, f'imported at import time: {loaded}'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
