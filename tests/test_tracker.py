"""The training hook: schedules, snapshots, backlog policy, failure handling, local sink output.

Real components only: real models trained for a few steps, the real measurement, a real
:class:`LocalDirectorySink`. Sinks that fail or block are small classes written here, standing in
for a tracking server that misbehaves.
"""

from __future__ import annotations

import copy
import json
import threading
import warnings
from pathlib import Path
from typing import Any, Literal

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from cluster_tracking.errors import ClusterTrackingWarning, ConfigError
from cluster_tracking.measure import measure
from cluster_tracking.report import (
    METRIC_KEYS,
    SCHEMA_VERSION,
    SKIPPED_STEPS_METRIC,
    ClusterabilityReport,
    logged_metrics,
    summary_document,
)
from cluster_tracking.tracking.sinks import LocalDirectorySink, Sink
from cluster_tracking.tracking.tracker import ClusterabilityTracker
from cluster_tracking.viz.plots import adjacency_figure, block_average, cluster_order

MEASURE: dict[str, Any] = {"k": 3, "shuffles": 4}
FAST: dict[str, Any] = {**MEASURE, "worker": "thread"}  # no worker process to start
PROCESS: dict[str, Any] = {**MEASURE, "worker": "process"}  # the default


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


class Trainer:
    """A few SGD steps on a fixed synthetic batch: enough to move the weights."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.model = model
        self.x = torch.randn(64, 8, generator=generator)
        self.y = torch.randint(0, 4, (64,), generator=generator)
        self.optimiser = torch.optim.SGD(model.parameters(), lr=0.5)

    def step(self) -> float:
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        return float(loss.detach())


class GatedTracker(ClusterabilityTracker):
    """A tracker whose measurements wait for ``gate``: a measurement as slow as the test wants."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _measure(self, snapshot: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        return super()._measure(snapshot)


class RaisingSink:
    """A sink whose every method fails, like a platform that is down."""

    def log_params(self, params: Any) -> None:
        raise RuntimeError("params endpoint down")

    def log_report(self, report: Any, step: int, artifacts: Any) -> None:
        raise RuntimeError(f"cannot log step {step}")

    def log_summary(self, reports: Any, artifacts: Any) -> None:
        raise RuntimeError("summary endpoint down")

    def close(self) -> None:
        raise RuntimeError("close failed")


class BlockingSink(LocalDirectorySink):
    """A sink whose ``log_report`` hangs until released, like a server that stopped answering."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = threading.Event()
        self.blocked = threading.Event()

    def log_report(self, report: Any, step: int, artifacts: Any) -> None:
        self.blocked.set()
        assert self.release.wait(120), "test never released the sink"
        super().log_report(report, step, artifacts)


def test_every_n_steps_measures_steps_divisible_by_n(tmp_path: Path) -> None:
    sink = LocalDirectorySink(tmp_path)
    trainer = Trainer(tiny_mlp())
    tracker = ClusterabilityTracker(
        [sink], every_n_steps=3, on_backlog="queue", plots=False, **FAST
    )
    taken = []
    for step in range(11):
        trainer.step()
        taken.append(tracker.step(trainer.model, step))
    tracker.close()

    assert [step for step, yes in enumerate(taken) if yes] == [0, 3, 6, 9]
    # the due steps, and at close() the final weights (step 10, measure_final=True by default)
    assert [report.step for report in tracker.reports] == [0, 3, 6, 9, 10]
    assert [report.step for report in sink.read_reports()] == [0, 3, 6, 9, 10]
    for step in (0, 3, 6, 9, 10):
        saved = (tmp_path / f"clusterability/step-{step}/report.json").read_text()
        assert ClusterabilityReport.from_json(saved).step == step
    assert tracker.skipped_steps == [] and tracker.failed_steps == []


def test_epochs_and_explicit_checkpoints(tmp_path: Path) -> None:
    trainer = Trainer(tiny_mlp())
    tracker = ClusterabilityTracker(
        [LocalDirectorySink(tmp_path)], every_n_epochs=2, on_backlog="queue", plots=False, **FAST
    )
    measured_epochs = []
    for epoch in range(5):
        trainer.step()
        if tracker.epoch_end(trainer.model, epoch, step=(epoch + 1) * 10):
            measured_epochs.append(epoch)
    assert measured_epochs == [1, 3]  # after the 2nd and the 4th epoch
    assert tracker.checkpoint(trainer.model, 45)
    assert not tracker.checkpoint(trainer.model, 20), "a step is measured at most once"
    assert not tracker.step(trainer.model, 0), "no every_n_steps: step() never measures"
    tracker.close()
    assert [report.step for report in tracker.reports] == [20, 40, 45]

    by_epoch = ClusterabilityTracker(every_n_epochs=1, plots=False, **FAST)
    by_epoch.epoch_end(trainer.model, 0)  # no step given: logged at the epoch number
    by_epoch.close()
    assert [report.step for report in by_epoch.reports] == [0]


def test_report_is_the_snapshot_of_its_step_and_reruns_reproduce(tmp_path: Path) -> None:
    def run(
        worker: Literal["process", "thread"],
    ) -> tuple[list[ClusterabilityReport], dict[int, nn.Module], ClusterabilityTracker]:
        trainer = Trainer(tiny_mlp(seed=1))
        tracker = ClusterabilityTracker(
            every_n_steps=4, seed=7, on_backlog="queue", plots=False, worker=worker, **MEASURE
        )
        copies = {}
        for step in range(9):
            trainer.step()
            if tracker.step(trainer.model, step):
                copies[step] = copy.deepcopy(trainer.model)
        tracker.close()
        return tracker.reports, copies, tracker

    reports, copies, tracker = run("process")
    assert [report.step for report in reports] == [0, 4, 8]
    for report in reports:
        assert report.step is not None
        # The weights measured are the ones at the step, not the later ones the loop went on to.
        expected = measure(
            copies[report.step], seed=tracker.seed_for(report.step), n_jobs=1, **MEASURE
        )
        assert report.ncut == pytest.approx(expected.ncut, rel=1e-12)
        assert report.baseline is not None and expected.baseline is not None
        assert report.baseline.ncuts == pytest.approx(expected.baseline.ncuts, rel=1e-12)
        assert report.config["seed"] == tracker.seed_for(report.step)
        assert report.config["tracker_seed"] == 7
    assert len({tracker.seed_for(step) for step in (0, 4, 8)}) == 3

    rerun, _, _ = run("thread")  # a rerun, and the same numbers in the training process
    assert [r.to_dict()["baseline"] for r in rerun] == [r.to_dict()["baseline"] for r in reports]
    assert [r.ncut for r in rerun] == [r.ncut for r in reports]


def test_the_model_is_traced_once_and_later_snapshots_only_copy_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The training thread's stall at a due step after the first is the weight copy alone: the
    torch.fx trace of the first step is reused while the parameter shapes stay the same."""
    traces: list[int] = []
    trace = torch.fx.Tracer.trace

    def counting_trace(self: torch.fx.Tracer, *args: Any, **kwargs: Any) -> Any:
        traces.append(1)
        return trace(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counting_trace)
    trainer = Trainer(tiny_mlp(seed=2))
    tracker = ClusterabilityTracker(every_n_steps=1, on_backlog="queue", plots=False, **FAST)
    for step in range(4):
        trainer.step()
        tracker.step(trainer.model, step)
    trainer.model[4] = nn.Linear(16, 6)  # a new shape: traced again
    tracker.step(trainer.model, 4)
    tracker.close()
    assert len(traces) == 2
    assert [report.step for report in tracker.reports] == [0, 1, 2, 3, 4]
    assert [report.nodes.total for report in tracker.reports] == [44] * 4 + [46]


@pytest.mark.parametrize("layers", [None, ["0", "2", "4"]], ids=["traced", "layers"])
def test_the_training_model_is_not_touched(layers: list[str] | None) -> None:
    trainer = Trainer(tiny_mlp())
    trainer.step()
    parameters = list(trainer.model.parameters())
    before = [p.detach().clone() for p in parameters]
    grads = [p.grad.clone() for p in parameters if p.grad is not None]
    tracker = ClusterabilityTracker(every_n_steps=1, layers=layers, plots=False, **FAST)
    tracker.step(trainer.model, 0)
    tracker.close()

    assert len(tracker.reports) == 1
    assert list(trainer.model.parameters()) == parameters  # same objects
    assert all(p.requires_grad for p in parameters)
    assert all(torch.equal(p, b) for p, b in zip(parameters, before, strict=True))
    assert all(
        torch.equal(p.grad, g) for p, g in zip(parameters, grads, strict=True) if p.grad is not None
    )
    assert trainer.model.training


@pytest.mark.parametrize("layers", [None, ["0", "2", "4"]], ids=["traced", "layers"])
def test_a_model_that_changes_shape_is_measured_as_it_is(layers: list[str] | None) -> None:
    model = tiny_mlp()
    tracker = ClusterabilityTracker(
        every_n_steps=1, layers=layers, on_backlog="queue", plots=False, **FAST
    )
    tracker.step(model, 0)
    model[4] = nn.Linear(16, 6)  # a wider head, as when growing or editing a network
    tracker.step(model, 1)
    tracker.step(model, 2)  # the same new shape again (the CPU copy of the structure is reused)
    tracker.step({k: v.clone() for k, v in model.state_dict().items()}, 3)  # a bare state_dict
    tracker.close()
    widths = {report.step: [layer.width for layer in report.layers] for report in tracker.reports}
    new = [8, 16, 16, 6]
    assert widths == {0: [8, 16, 16, 4], 1: new, 2: new, 3: new}


def test_layers_snapshots_measure_the_weights_of_their_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With layers=[...] the training thread builds the graph at the first due step only (no
    tracing); no graph is built in a thread of the training process later, where it would hold
    the GIL that training needs: later steps copy the weights, and the child process rebuilds."""
    import cluster_tracking.tracking.measuring as measuring_module
    import cluster_tracking.tracking.snapshots as snapshots_module

    built: list[str] = []
    # the measuring thread builds graphs with weight_graph, the training thread's snapshots
    # trace with weight_topology
    for module, name in ((measuring_module, "weight_graph"), (snapshots_module, "weight_topology")):
        real = getattr(module, name)

        def counting(*args: Any, real: Any = real, **kwargs: Any) -> Any:
            built.append(threading.current_thread().name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    trainer = Trainer(tiny_mlp(seed=3))
    tracker = ClusterabilityTracker(
        every_n_steps=2, layers=["0", "2", "4"], on_backlog="queue", plots=False, **FAST
    )
    copies = {}
    for step in range(5):
        trainer.step()
        if tracker.step(trainer.model, step):
            copies[step] = copy.deepcopy(trainer.model)
    tracker.close()
    assert built == [threading.main_thread().name]
    assert [report.step for report in tracker.reports] == [0, 2, 4]
    for report in tracker.reports:
        assert report.step is not None
        expected = measure(
            copies[report.step], seed=tracker.seed_for(report.step), n_jobs=1, **MEASURE
        )
        assert report.ncut == pytest.approx(expected.ncut, rel=1e-12)


def test_training_runs_while_measurements_run_in_the_background() -> None:
    """torch.fx tracing patches nn.Module.__call__ process-wide: it must never overlap with the
    training thread's forward passes, which would then fail inside the tracer."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    errors: list[BaseException] = []
    tracker = ClusterabilityTracker(every_n_steps=5, on_backlog="queue", plots=False, **PROCESS)

    def train() -> None:
        try:
            for step in range(60):
                loss = nn.functional.cross_entropy(model(x), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                tracker.step(model, step)
        except BaseException as error:  # reported below
            errors.append(error)

    worker = threading.Thread(target=train)
    worker.start()
    worker.join(300)
    tracker.close()
    assert errors == []
    # every due step, and the final weights of step 59 at close() (measure_final)
    assert [report.step for report in tracker.reports] == [*range(0, 60, 5), 59]
    assert all(report.config["worker"] == "process" for report in tracker.reports)
    child = tracker._worker
    assert child is not None and child._process.poll() == 0  # the worker process has exited


def test_the_newest_due_step_replaces_the_waiting_one(tmp_path: Path) -> None:
    """Measuring cannot keep up: the dashboard follows training instead of freezing at its start."""
    sink = LocalDirectorySink(tmp_path)
    tracker = GatedTracker([sink], every_n_steps=1, max_pending=1, **FAST)
    trainer = Trainer(tiny_mlp())
    with pytest.warns(ClusterTrackingWarning, match="cannot keep up") as caught:
        assert tracker.step(trainer.model, 0)
        assert tracker.entered.wait(60)  # step 0 is being measured
        assert tracker.step(trainer.model, 1)  # waits: one pending snapshot is allowed
        for step in (2, 3, 4):
            trainer.step()
            assert tracker.step(trainer.model, step)  # replaces the waiting one; never blocks
        weights_at_4 = copy.deepcopy(trainer.model)
        tracker.gate.set()
        tracker.close()
    keep_up = [w for w in caught if "cannot keep up" in str(w.message)]
    assert len(keep_up) == 1  # said once, naming the knobs
    for knob in ("max_overhead", "every_n_steps", "shuffles", "plots"):
        assert knob in str(keep_up[0].message)

    assert [report.step for report in tracker.reports] == [0, 4]
    assert tracker.skipped_steps == [1, 2, 3]
    last = tracker.reports[-1]
    expected = measure(weights_at_4, seed=tracker.seed_for(4), n_jobs=1, **MEASURE)
    assert last.ncut == pytest.approx(expected.ncut, rel=1e-12)  # the weights of step 4
    summary = json.loads((tmp_path / "clusterability/summary.json").read_text())
    assert summary["steps"] == [0, 4]
    assert summary["skipped_steps"] == [1, 2, 3]
    assert "Skipped steps" in (tmp_path / "clusterability/report.html").read_text()


def test_skipped_steps_are_logged_as_a_metric_with_each_measurement(tmp_path: Path) -> None:
    tracker = GatedTracker(every_n_steps=1, max_pending=1, plots=False, **FAST)
    trainer = Trainer(tiny_mlp())
    with pytest.warns(ClusterTrackingWarning, match="cannot keep up"):
        tracker.step(trainer.model, 0)
        assert tracker.entered.wait(60)
        for step in range(1, 6):  # 1..4 are replaced in turn; 5 waits
            trainer.step()
            tracker.step(trainer.model, step)
        tracker.gate.set()
        tracker.close()
    first, last = tracker.reports
    assert logged_metrics(first)[SKIPPED_STEPS_METRIC] == 0  # none skipped when 0 was measured
    assert logged_metrics(last)[SKIPPED_STEPS_METRIC] == 4
    assert set(logged_metrics(last)) == {*METRIC_KEYS, SKIPPED_STEPS_METRIC}


def test_an_explicit_checkpoint_is_never_dropped_and_retakes_a_skipped_step() -> None:
    tracker = GatedTracker(every_n_steps=1, max_pending=1, plots=False, **FAST)
    trainer = Trainer(tiny_mlp())
    with pytest.warns(ClusterTrackingWarning, match="cannot keep up"):
        assert tracker.step(trainer.model, 0)
        assert tracker.entered.wait(60)
        assert tracker.step(trainer.model, 1)
        trainer.step()
        assert tracker.step(trainer.model, 2)  # replaces the waiting step 1
    assert tracker.skipped_steps == [1]
    assert tracker.checkpoint(trainer.model, 1)  # the saved weights are measured all the same
    assert tracker.checkpoint(trainer.model, 3)  # and a checkpoint waits rather than skip
    assert not tracker.checkpoint(trainer.model, 3)  # a step is still measured once
    tracker.gate.set()
    tracker.close()
    assert [report.step for report in tracker.reports] == [0, 1, 2, 3]
    assert tracker.skipped_steps == []


def test_queue_policy_measures_every_step(tmp_path: Path) -> None:
    tracker = GatedTracker(every_n_steps=1, on_backlog="queue", plots=False, **FAST)
    trainer = Trainer(tiny_mlp())
    for step in range(5):
        trainer.step()
        assert tracker.step(trainer.model, step)
    tracker.gate.set()
    tracker.close()
    assert [report.step for report in tracker.reports] == [0, 1, 2, 3, 4]
    assert tracker.skipped_steps == []


def test_max_pending_bounds_the_queue_and_the_last_due_step_is_measured() -> None:
    tracker = GatedTracker(every_n_steps=1, on_backlog="queue", max_pending=2, plots=False, **FAST)
    trainer = Trainer(tiny_mlp())
    with pytest.warns(ClusterTrackingWarning, match="cannot keep up"):
        tracker.step(trainer.model, 0)
        assert tracker.entered.wait(60)  # step 0 is being measured; the rest wait
        for step in range(1, 40):
            trainer.step()
            assert tracker.step(trainer.model, step)
            assert len(tracker._pending) <= 2  # never more than max_pending copies of the weights
    tracker.gate.set()
    tracker.close()
    # the first waiting step keeps its place in the queue; the newest takes the other one
    assert [report.step for report in tracker.reports] == [0, 1, 39]
    assert tracker.skipped_steps == list(range(2, 39))


def test_a_failing_measurement_warns_and_training_goes_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # 9 nodes: k=12 is too many
    trainer_loss = []
    sink = LocalDirectorySink(tmp_path)
    tracker = ClusterabilityTracker(  # the error comes back from the worker process
        [sink], every_n_steps=1, k=12, shuffles=4, on_backlog="queue", worker="process"
    )
    with pytest.warns(ClusterTrackingWarning, match=r"measurement at step \d failed") as caught:
        for step in range(3):
            trainer_loss.append(float(model(torch.ones(1, 4)).sum().detach()))
            tracker.step(model, step)
        tracker.close()
    assert len([w for w in caught if "k=12 clusters" in str(w.message)]) == 3
    assert len(trainer_loss) == 3
    assert tracker.failed_steps == [0, 1, 2]
    assert tracker.reports == []
    summary = json.loads((tmp_path / "clusterability/summary.json").read_text())
    assert summary["failed_steps"] == [0, 1, 2]


def test_a_model_that_cannot_be_copied_warns_and_returns(tmp_path: Path) -> None:
    tracker = ClusterabilityTracker(every_n_steps=1, **FAST)
    with pytest.warns(ClusterTrackingWarning, match="could not snapshot"):
        assert not tracker.step(["not", "a", "model"], 0)  # type: ignore[arg-type]
    with pytest.warns(ClusterTrackingWarning, match="not an integer"):
        assert not tracker.step(tiny_mlp(), -5)
    tracker.close()
    assert tracker.failed_steps == [0]


def test_a_raising_sink_does_not_stop_training_or_the_other_sinks(tmp_path: Path) -> None:
    good = LocalDirectorySink(tmp_path)
    trainer = Trainer(tiny_mlp())
    tracker = ClusterabilityTracker(
        [RaisingSink(), good], every_n_steps=2, on_backlog="queue", **FAST
    )
    with pytest.warns(ClusterTrackingWarning) as caught:
        for step in range(5):
            trainer.step()
            tracker.step(trainer.model, step)
        tracker.close()  # never raises, even though the sink's close() does
    messages = " ".join(str(w.message) for w in caught)
    assert "cannot log step 0" in messages and "close failed" in messages
    assert [report.step for report in good.read_reports()] == [0, 2, 4]
    assert (tmp_path / "clusterability/report.html").exists()


def test_a_blocked_sink_does_not_stall_training(tmp_path: Path) -> None:
    sink = BlockingSink(tmp_path)
    trainer = Trainer(tiny_mlp())
    tracker = ClusterabilityTracker([sink], every_n_steps=2, on_backlog="queue", **FAST)
    finished = threading.Event()

    def train() -> None:
        for step in range(20):
            trainer.step()
            tracker.step(trainer.model, step)
            if step == 0:  # go on only once the sink hangs on step 0's report
                assert sink.blocked.wait(60)
        finished.set()

    worker = threading.Thread(target=train)
    worker.start()
    worker.join(120)  # generous: only a hang (step() waiting for the sink) gets near it
    assert finished.is_set(), "training waited for a blocked sink"
    assert sink.blocked.is_set() and not sink.release.is_set()  # training ended while blocked
    sink.release.set()
    tracker.close()
    # every due step, and the final weights of step 19 at close() (measure_final)
    assert [report.step for report in sink.read_reports()] == [*range(0, 20, 2), 19]


def test_while_the_sinks_are_behind_new_reports_come_without_plots(tmp_path: Path) -> None:
    sink = BlockingSink(tmp_path)
    trainer = Trainer(tiny_mlp())
    tracker = ClusterabilityTracker(
        [sink], every_n_steps=1, on_backlog="queue", max_overhead=None, **FAST
    )
    with pytest.warns(ClusterTrackingWarning, match="sinks are slower"):
        tracker.step(trainer.model, 0)
        assert sink.blocked.wait(60)  # the sink hangs on step 0's report
        for step in range(1, 13):
            trainer.step()
            tracker.step(trainer.model, step)
        for _ in range(600):  # wait until all 12 are measured and waiting for the sink
            if tracker._log_queue.qsize() >= 12:
                break
            threading.Event().wait(0.1)
        sink.release.set()
        tracker.close()
    assert [report.step for report in sink.read_reports()] == list(range(13))
    with_plots = [
        step
        for step in range(13)
        if (tmp_path / f"clusterability/step-{step}/adjacency.png").exists()
    ]
    assert with_plots == list(range(9))  # 0, then 1-8 while fewer than 8 waited
    for step in range(13):  # every report.json is there
        assert (tmp_path / f"clusterability/step-{step}/report.json").exists()


def test_context_manager_closes_and_close_is_idempotent(tmp_path: Path) -> None:
    trainer = Trainer(tiny_mlp())
    with ClusterabilityTracker([LocalDirectorySink(tmp_path)], every_n_steps=1, **FAST) as tracker:
        trainer.step()
        tracker.step(trainer.model, 0)
    assert tracker.closed
    assert [report.step for report in tracker.reports] == [0]
    assert (tmp_path / "clusterability/summary.json").exists()
    tracker.close()  # a second close is a no-op
    with pytest.warns(ClusterTrackingWarning, match="closed"):
        assert not tracker.step(trainer.model, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not tracker.step(trainer.model, 2)  # warned once only

    with pytest.raises(KeyError), ClusterabilityTracker(every_n_steps=1, **FAST) as failing:
        failing.step(trainer.model, 0)
        raise KeyError("training crashed")
    assert failing.closed and [report.step for report in failing.reports] == [0]


def test_other_ranks_do_nothing(tmp_path: Path) -> None:
    sink = LocalDirectorySink(tmp_path / "rank1")
    tracker = ClusterabilityTracker([sink], every_n_steps=1, rank=1, **FAST)
    assert not tracker.step(tiny_mlp(), 0)
    assert not tracker.checkpoint(tiny_mlp(), 5)
    tracker.close()
    assert tracker.reports == []
    assert list((tmp_path / "rank1").iterdir()) == []


def test_local_directory_sink_layout(tmp_path: Path) -> None:
    sink = LocalDirectorySink(tmp_path)
    trainer = Trainer(tiny_mlp())
    # no budget: every step draws its plots (under one, the first measurement may or may not,
    # as it is taken before or after close() begins: tests/test_tracker_budget.py)
    with ClusterabilityTracker(
        [sink], every_n_steps=3, on_backlog="queue", max_overhead=None, **PROCESS
    ) as tracker:
        for step in range(7):
            trainer.step()
            tracker.step(trainer.model, step)

    params = json.loads((tmp_path / "params.json").read_text())
    assert params["clusterability.k"] == 3
    assert params["clusterability.shuffles"] == 4
    assert params["clusterability.method"] == "layer"
    assert params["clusterability.seed"] == 0
    assert "clusterability.version" in params

    lines = [json.loads(line) for line in (tmp_path / "reports.jsonl").read_text().splitlines()]
    assert [line["config"].pop("run_id") for line in lines] == [sink.run_id] * len(lines)
    assert lines == [report.to_dict() for report in tracker.reports]
    for report in tracker.reports:
        folder = tmp_path / f"clusterability/step-{report.step}"
        assert ClusterabilityReport.from_json((folder / "report.json").read_text()).to_dict() == (
            report.to_dict()
        )
        for name in ("adjacency.png", "composition.png"):
            image = matplotlib.image.imread(folder / name)
            assert image.ndim == 3 and min(image.shape[:2]) > 100
        assert set(report.metrics()) == set(METRIC_KEYS)

    summary = json.loads((tmp_path / "clusterability/summary.json").read_text())
    assert summary["steps"] == [0, 3, 6]
    assert [entry["step"] for entry in summary["trajectory"]] == [0, 3, 6]
    assert summary["trajectory"][0]["ncut"] == tracker.reports[0].ncut
    assert [ClusterabilityReport.from_dict(r).step for r in summary["reports"]] == [0, 3, 6]
    assert matplotlib.image.imread(tmp_path / "clusterability/trajectory.png").ndim == 3
    assert (tmp_path / "clusterability/report.html").read_text().startswith("<!DOCTYPE html>")


def test_settings_are_checked_before_training() -> None:
    for bad in (
        {"k": 1},
        {"shuffles": 1},
        {"shuffles": -2},
        {"shuffle": "rows"},
        {"every_n_steps": 0},
        {"every_n_epochs": -1},
        {"on_backlog": "drop"},
        {"max_pending": 0},
        {"seed": -1},
        {"norm": "l3"},
        {"preset": "paper"},
        {"layers": [3]},  # names are strings ("0|2" and globs are fine)
        {"shuffle": "random_init"},  # traces re-initialised copies: needs layers=[...]
    ):
        with pytest.raises(ConfigError):
            ClusterabilityTracker(**bad)
    with pytest.raises(ConfigError, match="log_report"):
        ClusterabilityTracker([object()])  # type: ignore[list-item]
    assert isinstance(LocalDirectorySink, type) and issubclass(LocalDirectorySink, Sink)


def test_heat_map_orders_by_cluster_and_stays_small() -> None:
    assert cluster_order([2, 0, -1, 1, 0]).tolist() == [1, 4, 3, 0]
    dense = np.arange(16.0).reshape(4, 4)
    assert block_average(dense, 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]

    import matplotlib.pyplot as plt

    figures_before = plt.get_fignums()
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(300, 700), nn.ReLU(), nn.Linear(700, 300))  # 1300 nodes
    report = measure(wide, k=4, shuffles=0, seed=0)
    from cluster_tracking.graph import weight_graph

    figure = adjacency_figure(weight_graph(wide), report.partition.labels, max_pixels=600)
    shown = figure.axes[0].images[0].get_array()
    assert shown is not None and max(shown.shape) <= 600
    assert plt.get_fignums() == figures_before  # no pyplot figure was created


def test_random_init_null_with_layers() -> None:
    tracker = ClusterabilityTracker(
        layers=["0", "2", "4"], shuffle="random_init", k=3, shuffles=3, plots=False, worker="thread"
    )
    tracker.checkpoint(tiny_mlp(), 0)
    tracker.close()
    (report,) = tracker.reports
    assert report.baseline is not None and report.baseline.method == "random_init"
    assert report.baseline.n == 3


def test_a_worker_process_that_cannot_start_falls_back_to_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cluster_tracking.parallel.child as worker_module

    monkeypatch.setattr(worker_module, "_WORKER_BOOTSTRAP", "import sys; sys.exit(3)")
    tracker = ClusterabilityTracker(every_n_steps=1, plots=False, **PROCESS)
    with pytest.warns(ClusterTrackingWarning, match="worker process failed"):
        tracker.step(tiny_mlp(), 0)
        tracker.close()
    (report,) = tracker.reports
    assert report.config["worker"] == "thread"


def test_close_with_a_timeout_gives_up_with_a_warning() -> None:
    tracker = GatedTracker(every_n_steps=1, plots=False, **FAST)
    tracker.step(tiny_mlp(), 0)
    assert tracker.entered.wait(60)
    with pytest.warns(ClusterTrackingWarning, match="gave up waiting"):
        tracker.close(timeout=0.2)  # the measurement is stuck: close returns anyway
    assert tracker.closed
    tracker.gate.set()  # let the background thread finish


class _DataDependent(nn.Module):
    """A forward that branches on its input's values: no tracer can follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x if x.sum() > 0 else -x)


def test_a_model_the_graph_cannot_follow_warns_once_per_tracker() -> None:
    model = _DataDependent()
    tracker = ClusterabilityTracker(every_n_steps=1, **FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measured = [tracker.step(model, step) for step in range(5)]
        tracker.close()
    ours = [w for w in caught if issubclass(w.category, ClusterTrackingWarning)]
    assert measured == [False] * 5
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "torch.fx cannot trace" in str(ours[0].message)
    assert "example_inputs=" in str(ours[0].message)


def test_a_timed_out_close_leaves_no_worker_process_and_no_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(300, 600), nn.ReLU(), nn.Linear(600, 600), nn.ReLU())
    tracker = ClusterabilityTracker(
        every_n_steps=1, k=8, shuffles=500, plots=False, worker="process"
    )
    tracker.step(wide, 0)  # hundreds of spectral clusterings: far longer than the timeout
    for _ in range(600):  # wait until the worker process is up and measuring
        child = tracker._worker
        if child is not None and child._ready.is_set():
            break
        threading.Event().wait(0.1)
    assert child is not None and child.running()
    with pytest.warns(ClusterTrackingWarning, match="gave up waiting") as caught:
        tracker.close(timeout=0.5)
    assert "worker process was ended" in str(caught[0].message)
    assert child._process.poll() is not None  # ended and reaped by close(), not orphaned
    assert tracker.reports == []
    threading.Event().wait(1.0)  # anything the child or the threads would still print
    assert "Traceback" not in capfd.readouterr().err


def test_measure_final_measures_the_weights_of_the_last_step_at_close(tmp_path: Path) -> None:
    """On by default: the final value logged is the final model's, not the last due step's."""
    sink = LocalDirectorySink(tmp_path)
    trainer = Trainer(tiny_mlp())
    tracker = ClusterabilityTracker(
        [sink], every_n_steps=4, on_backlog="queue", plots=False, **FAST
    )
    assert tracker.measure_final
    for step in range(11):
        trainer.step()
        tracker.step(trainer.model, step)
    final_weights = copy.deepcopy(trainer.model)
    tracker.close()

    assert [report.step for report in tracker.reports] == [0, 4, 8, 10]
    assert json.loads((tmp_path / "clusterability" / "summary.json").read_text())["steps"][-1] == 10
    expected = measure(final_weights, seed=tracker.seed_for(10), n_jobs=1, **MEASURE)
    assert tracker.reports[-1].ncut == pytest.approx(expected.ncut, rel=1e-12)

    # measure_final=False: the schedule's due steps only
    off = ClusterabilityTracker(
        every_n_steps=4, on_backlog="queue", plots=False, measure_final=False, **FAST
    )
    for step in range(11):
        trainer.step()
        off.step(trainer.model, step)
    off.close()
    assert [report.step for report in off.reports] == [0, 4, 8]


def test_summary_json_is_the_report_packages_summary_document(tmp_path: Path) -> None:
    """``clusterability/summary.json`` is exactly :func:`summary_document` (schema v1): the one
    definition of the summary a dashboard reads, whatever process writes it."""
    trainer = Trainer(tiny_mlp(seed=4))
    sink = LocalDirectorySink(tmp_path)
    tracker = ClusterabilityTracker(
        sinks=[sink], every_n_steps=2, plots=False, on_backlog="queue", max_overhead=None, **FAST
    )
    for step in range(5):
        trainer.step()
        tracker.step(trainer.model, step)
    tracker.close()
    written = json.loads((tmp_path / "clusterability/summary.json").read_text())
    expected = summary_document(
        tracker.reports, tracker.params, tracker.skipped_steps, tracker.failed_steps
    )
    assert written == json.loads(json.dumps(expected))
    assert written["schema_version"] == SCHEMA_VERSION == 1
    assert [point["step"] for point in written["trajectory"]] == [0, 2, 4]
