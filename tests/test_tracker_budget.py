"""The tracker's budget while its worker process starts: due steps that arrive meanwhile replace the
waiting one, the start is a one-off outside the budget, and the first measurement under a budget
(behind or not) logs metrics before it draws.

Real components: a real worker process, a real model, the real measurement and
:class:`LocalDirectorySink`; the only stand-in is a gate that holds the worker's start for as
long as the test wants (a start on a busy machine takes seconds).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cluster_tracking.errors import ClusterTrackingWarning
from cluster_tracking.parallel.child import WorkerProcess
from cluster_tracking.parallel.throttle import can_throttle
from cluster_tracking.tracking.sinks import LocalDirectorySink
from cluster_tracking.tracking.tracker import ClusterabilityTracker

SETTINGS: dict[str, Any] = {"k": 3, "shuffles": 4, "worker": "process", "every_n_steps": 1}


class SlowStartTracker(ClusterabilityTracker):
    """A tracker whose worker process starts only once ``gate`` opens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.starting = threading.Event()

    def _start_worker(self) -> WorkerProcess:
        self.starting.set()
        assert self.gate.wait(60), "test gate never opened"
        return super()._start_worker()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def nudge(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)


def wait_for_reports(tracker: ClusterabilityTracker, count: int) -> None:
    deadline = time.monotonic() + 120
    while len(tracker._reports) < count:
        assert time.monotonic() < deadline, "no report came"
        time.sleep(0.02)


def test_due_steps_replace_the_waiting_one_while_the_worker_starts(tmp_path: Path) -> None:
    """The worker starts before the first snapshot is taken, so the first measurement is of the
    newest weights, not of the step that was due when the tracker began."""
    model = mlp()
    tracker = SlowStartTracker(
        [LocalDirectorySink(tmp_path)], max_pending=1, plots=False, **SETTINGS
    )
    with pytest.warns(ClusterTrackingWarning, match="cannot keep up"):
        assert tracker.step(model, 0)
        assert tracker.starting.wait(60)  # step 0 waits while the worker starts
        for step in (1, 2, 3):
            nudge(model)
            assert tracker.step(model, step)  # newest wins; never blocks
        tracker.gate.set()
        tracker.close()
    assert [report.step for report in tracker.reports] == [3]
    assert tracker.skipped_steps == [0, 1, 2]
    assert tracker.reports[0].config["worker"] == "process"


@pytest.mark.skipif(not can_throttle(), reason="the throttle needs Linux")
def test_a_throttled_start_is_counted_apart_from_the_calls() -> None:
    started = time.monotonic()
    child = WorkerProcess(die_with_thread=True, nice=False, share=0.5, wait=False)
    try:
        child.wait_ready()
        elapsed = time.monotonic() - started
        # the time it was allowed to run while it started: part of the wall time, not nothing
        assert 0 < child.start_run_seconds <= elapsed
        assert child._throttle is not None and child._throttle.run_seconds > 0
        run_before = child.run_seconds
        assert child.call("builtins:sum", [1, 2]) == 3
        assert child.run_seconds >= run_before  # calls are counted apart from the start
    finally:
        child.stop()


@pytest.mark.skipif(not can_throttle(), reason="the throttle needs Linux")
def test_the_trackers_child_starts_at_full_speed_and_repays_it_over_time() -> None:
    """The child's start is a one-off: throttled, it took seconds of a busy machine's wall time
    and held back the next measurements while the budget paid for it."""
    child = WorkerProcess(
        die_with_thread=True, nice=False, share=0.5, wait=False, throttle_start=False
    )
    try:
        child.wait_ready()
        assert child._throttle is not None and child._throttle.run_seconds == 0  # never paused
        assert child.start_run_seconds > 0  # all of its start: it could run throughout
        assert child.call("builtins:sum", [1, 2]) == 3
        assert child._throttle.run_seconds > 0  # calls are throttled
    finally:
        child.stop()

    tracker = ClusterabilityTracker(plots=False, max_overhead=0.1, **SETTINGS)
    tracker.step(mlp(), 0)
    wait_for_reports(tracker, 1)  # measured under the budget, before close() lifts it
    worker = tracker._worker
    assert worker is not None and worker.share is not None and not worker._throttled_start
    assert tracker._busy_seconds > 0
    # the start is repaid over time, and the tracker's threads count too
    assert tracker._start_seconds == worker.start_run_seconds > 0
    assert 0 < tracker._start_debt() <= tracker._start_seconds
    assert tracker._thread_cpu > 0 and worker.throttle_cpu_seconds > 0
    assert tracker._spent() >= tracker._busy_seconds + tracker._thread_cpu + tracker._log_cpu
    tracker.close()


def test_a_tracker_behind_from_its_start_measures_before_it_draws(tmp_path: Path) -> None:
    """Plots cost several measurements' time: a tracker that is behind before its first
    measurement logs metrics first; the final weights at close() get their plots."""
    model = mlp()
    tracker = SlowStartTracker([LocalDirectorySink(tmp_path)], max_pending=1, **SETTINGS)
    with pytest.warns(ClusterTrackingWarning, match="cannot keep up"):
        tracker.step(model, 0)
        assert tracker.starting.wait(60)
        for step in (1, 2):
            nudge(model)
            tracker.step(model, step)
        tracker.gate.set()
        wait_for_reports(tracker, 1)  # step 2, measured while behind: no plots yet
        nudge(model)
        tracker.step(model, 3)  # not behind (nothing skipped since step 2 was taken)
        tracker.close()
    assert [report.step for report in tracker.reports] == [2, 3]
    folder = tmp_path / "clusterability"
    assert (folder / "step-2/report.json").exists()
    assert not (folder / "step-2/adjacency.png").exists()
    assert "plots" not in tracker.reports[0].timings
    assert (folder / "step-3/adjacency.png").exists()
    assert (folder / "report.html").exists()


@pytest.mark.parametrize("max_overhead", [0.1, None])
def test_under_a_budget_the_first_measurement_logs_metrics_before_plots(
    tmp_path: Path, max_overhead: float | None
) -> None:
    """Under a budget the plots (a second of CPU, 11 s of wall time at the default share) wait
    for the first metrics, even when the tracker keeps up; without one they come with them."""
    model = mlp()
    tracker = ClusterabilityTracker(
        [LocalDirectorySink(tmp_path)], max_pending=1, max_overhead=max_overhead, **SETTINGS
    )
    tracker.step(model, 0)
    wait_for_reports(tracker, 1)  # keeping up: nothing skipped
    nudge(model)
    tracker.step(model, 1)
    wait_for_reports(tracker, 2)
    tracker.close()
    assert [report.step for report in tracker.reports] == [0, 1]
    assert tracker.skipped_steps == []
    folder = tmp_path / "clusterability"
    assert (folder / "step-0/report.json").exists()
    assert (folder / "step-0/adjacency.png").exists() == (max_overhead is None)
    assert (folder / "step-1/adjacency.png").exists()


def test_under_a_budget_a_first_checkpoint_draws_its_plots(tmp_path: Path) -> None:
    """A checkpoint was asked for and may be the run's only measurement: it draws its plots
    even when it is the first under a budget and is measured before ``close()``."""
    tracker = ClusterabilityTracker(
        [LocalDirectorySink(tmp_path)], max_overhead=0.1, **{**SETTINGS, "every_n_steps": 100}
    )
    tracker.checkpoint(mlp(), 7)
    wait_for_reports(tracker, 1)  # measured before close() began
    tracker.close()
    assert [report.step for report in tracker.reports] == [7]
    assert "plots" in tracker.reports[0].timings
    assert (tmp_path / "clusterability/step-7/adjacency.png").exists()


def test_the_start_is_repaid_in_proportion_to_the_time_elapsed() -> None:
    from cluster_tracking.tracking.measuring import START_REPAID_SECONDS

    tracker = ClusterabilityTracker(plots=False, max_overhead=0.1, **SETTINGS)
    try:
        assert tracker._start_debt() == 0.0  # nothing started yet
        tracker._start_seconds = 1.0
        tracker._budget_start = time.monotonic() - START_REPAID_SECONDS / 2
        assert 0.5 <= tracker._start_debt() < 0.6  # half the time: half the start
        tracker._budget_start = time.monotonic() - 2 * START_REPAID_SECONDS
        assert tracker._start_debt() == 1.0  # then all of it, no more
    finally:
        tracker.close()


class RecordedWaits(threading.Event):
    """A closing event whose waits are recorded and end at once (the pace's sleeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        self.set()  # one wait, then the tracker is closing and the pace returns
        return True


def test_measurements_are_paced_to_a_margin_below_the_budget() -> None:
    from cluster_tracking.tracking.measuring import PACE_MARGIN

    tracker = ClusterabilityTracker(plots=False, max_overhead=0.1, **SETTINGS)
    real_closing = tracker._closing
    try:
        share = tracker._share()
        assert share is not None and 0.0 < PACE_MARGIN < 1.0
        elapsed = 100.0
        tracker._budget_start = time.monotonic() - elapsed
        # within the margin: the next measurement starts at once
        tracker._busy_seconds = 0.8 * PACE_MARGIN * share * elapsed
        tracker._closing = waits = RecordedWaits()
        tracker._pace()
        assert waits.waits == []
        # inside the budget but beyond the margin: it waits until the margin allows, no longer
        over = (1.0 - PACE_MARGIN) / 2 * share * elapsed
        tracker._busy_seconds = PACE_MARGIN * share * elapsed + over
        tracker._closing = waits = RecordedWaits()
        tracker._pace()
        assert len(waits.waits) == 1
        assert waits.waits[0] == pytest.approx(over / (PACE_MARGIN * share), rel=0.01)
    finally:
        tracker._closing = real_closing
        tracker.close()
