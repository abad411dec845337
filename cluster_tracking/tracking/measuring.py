"""The tracker's measuring thread: takes the waiting snapshots one at a time, paced to the
budget, has them measured, and queues each report with its files for the logging thread.

Paced to a budget: since the first due step, the time spent measuring (of every measurement, the
time the throttled child was allowed to run, or else its wall time; the CPU time of the tracker's
threads; the child's start, repaid over a minute) stays below :data:`PACE_MARGIN` of ``m / (1 +
m)`` of the time elapsed for ``max_overhead=m``; a measurement starts only when that budget
allows, and a newer due step replaces the waiting one meanwhile.
While measuring cannot keep up, the plots are thinned first (:data:`PLOTS_SHARE_WHILE_BEHIND`,
:data:`PLOTS_DELAY_WHILE_BEHIND`), and while the sinks cannot keep up, new reports reach them
without their plots (:data:`LOG_BACKLOG_WITH_PLOTS`).
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from cluster_tracking.errors import describe, warn
from cluster_tracking.graph import weight_graph
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.tracking.jobs import MEASURE_STEP, RENDER_SUMMARY, measure_step
from cluster_tracking.tracking.settings import step_seed
from cluster_tracking.tracking.snapshots import Snapshot
from cluster_tracking.tracking.state import _STOP, _Abandoned
from cluster_tracking.tracking.worker import _WorkerCalls

#: While measuring cannot keep up, drawing the plots takes at most this share of the time spent
#: measuring: a measurement draws them only while the plots so far took less.
PLOTS_SHARE_WHILE_BEHIND = 0.25
#: While measuring cannot keep up, drawing a measurement's plots delays the next metrics by at
#: most this share of the time since the first due step: a short run's dashboard gets its metrics
#: without gaps (and its plots at ``close()``), a long run gets plots as it goes.
PLOTS_DELAY_WHILE_BEHIND = 0.05
#: Reports waiting for the sinks beyond which a new report goes to them without its plots.
LOG_BACKLOG_WITH_PLOTS = 8
#: The measuring child's start runs at full speed before the first measurement; the budget
#: counts it in proportion to the time elapsed, in full after this many seconds.
START_REPAID_SECONDS = 60.0
#: The share of the budget the measurements are paced to. The rest is left for what the budget
#: cannot count (a loop that keeps every core busy stalls about as long as the child runs, and
#: then runs on caches the child displaced) and for the loop's own speed, which moves from
#: minute to minute: paced to the whole budget, ``benchmarks/bench_load.py`` measured the loop
#: 1.06 and 1.09 times slower than its steps taken while the child was idle in the same run, at
#: ``max_overhead=0.1``, with no margin left.
PACE_MARGIN = 0.9


class _Measuring(_WorkerCalls):
    """The measuring thread of a tracker."""

    def _measure_loop(self) -> None:
        self._budget_start = time.monotonic()
        try:
            # before the first snapshot is taken: due steps that arrive while the child starts
            # replace the waiting one, so the first measurement is of recent weights
            self._ensure_worker()
        except _Abandoned:
            return
        while True:
            item = self._next_snapshot()
            if item is None:
                break
            started = time.monotonic()
            run_before = self._worker.run_seconds if self._worker is not None else 0.0
            busy_before = self._busy_seconds
            cpu_before = time.thread_time()
            try:
                report, images = self._measure(item)
            except Exception as error:
                with self._idle:
                    self._failed.append(item.step)
                    self._finish_one()
                if not self._abandoned:
                    warn(
                        f"clusterability measurement at step {item.step} failed: "
                        f"{describe(error)}. Training goes on; this step is not logged."
                    )
                continue
            finally:
                item.release()  # free the copy now
                self._count_busy(started, run_before)
            self._count_costs(report, self._busy_seconds - busy_before)
            handed = self._hand_over(item.step, report, images)
            self._count_thread_cpu(time.thread_time() - cpu_before, report)
            if not handed:
                break
            del report, images
            _trim_heap()
        if not self._abandoned:
            self._send_summary()
            self._log_queue.put(_STOP)
        if self._worker is not None:
            self._worker.stop()

    def _next_snapshot(self) -> Snapshot | None:
        """The next snapshot to measure, once the budget allows (``None``: stop), with its
        ``plots`` decided: plots are thinned first while measuring cannot keep up."""
        with self._wake:
            while not self._pending and not self._stopping:
                self._wake.wait()
            if not self._pending or self._abandoned:
                return None
        self._pace()  # newer due steps may replace the waiting snapshot meanwhile
        with self._lock:
            if self._abandoned or not self._pending:
                return None
            item = self._pending.popleft()
            self._behind = self._behind + 1 if self._skipped_since else 0
            self._skipped_since = 0
            item.plots = self.plots and (
                self._closing.is_set()
                or (self._behind == 0 and (item.explicit or self._first_metrics_came()))
                or self._plots_fit_while_behind()
            )
        return item

    def _first_metrics_came(self) -> bool:
        """Whether a measurement came before (with the lock held), or there is no budget: under
        a budget the first measurement of a due step logs its metrics before anything is drawn
        (the plots' libraries and drawing take about a second of CPU, 11 s of wall time at the
        default share), and its cost is what the plots' share is judged by. A checkpoint's
        draws all the same: it was asked for, and may be the run's only one."""
        return self.max_overhead is None or self._measure_cost > 0

    def _plots_fit_while_behind(self) -> bool:
        """Whether a measurement that is behind draws its plots (with the lock held): their
        cost is known (as last time, or before any, 4x the last measurement's; a tracker behind
        from its start measures first), the plots so far took less than
        :data:`PLOTS_SHARE_WHILE_BEHIND` of the time measuring, and drawing them delays the next
        metrics by at most :data:`PLOTS_DELAY_WHILE_BEHIND` of the run so far."""
        cost = self._plot_cost or 4 * self._measure_cost
        if cost <= 0 or self._budget_start is None:
            return False
        share = self._plot_seconds + cost <= PLOTS_SHARE_WHILE_BEHIND * (self._busy_seconds + cost)
        # the wall time the plots take: at max_overhead's rate under a budget
        delay = cost / self.max_overhead if self.max_overhead else cost
        elapsed = time.monotonic() - self._budget_start
        return share and delay <= PLOTS_DELAY_WHILE_BEHIND * elapsed

    def _count_busy(self, started: float, run_before: float) -> None:
        """Add one measurement's time to the budget: the time the throttled child could run,
        or else the wall time from request to answer."""
        worker = self._worker
        if worker is not None and worker.share is not None:
            self._busy_seconds += worker.run_seconds - run_before  # time it could run
        else:
            self._busy_seconds += time.monotonic() - started

    def _count_thread_cpu(self, cpu: float, report: ClusterabilityReport) -> None:
        """Add this thread's CPU time of one measurement to the budget: all of it when the child
        measured (the weights to it, the report from it, its files), else what the
        measurement's own time, counted already, does not cover (its files)."""
        if report.config.get("worker") == "thread":
            cpu = max(0.0, cpu - report.timings.get("total", 0.0))
        self._thread_cpu += cpu

    def _count_costs(self, report: ClusterabilityReport, spent: float) -> None:
        """Split the ``spent`` seconds of a measurement into measuring and plotting."""
        plot_time = report.timings.get("plots", 0.0)
        plot_share = plot_time / (plot_time + report.timings["total"]) if plot_time else 0.0
        self._measure_cost = spent * (1 - plot_share)
        if plot_time > 0:  # the plots' part of the time this measurement was counted for
            self._plot_cost = spent * plot_share
            self._plot_seconds += self._plot_cost

    def _hand_over(self, step: int, report: ClusterabilityReport, images: dict[str, bytes]) -> bool:
        """Keep ``report``, write its files and queue them for the sinks; False when
        ``close(timeout)`` gave up meanwhile."""
        with self._lock:
            if self._abandoned:
                return False
            # due steps before this one that were skipped (the metric at this step)
            report.config["skipped_steps"] = sum(1 for s in self._skipped if s < step)
            self._reports.keep(step, report)
            if images and (self._last_images is None or step >= self._last_images[0]):
                self._last_images = (step, images)
        if images and self._log_queue.qsize() >= LOG_BACKLOG_WITH_PLOTS:
            images = {}  # the sinks are behind: keep the working files small
            if not self._warned_slow_sinks:
                self._warned_slow_sinks = True
                warn(
                    f"the clusterability sinks are slower than the measurements "
                    f"({self._log_queue.qsize()} reports wait for them): the plots of "
                    f"steps measured while {LOG_BACKLOG_WITH_PLOTS} or more reports wait are "
                    "not written (their metrics and report.json are).",
                    stacklevel=4,
                )
        artifacts = self._step_artifacts(report, images)
        self._log_queue.put(("report", report, artifacts))
        return True

    def _spent(self) -> float:
        """Seconds spent measuring so far: of every measurement, the time the throttled child
        was allowed to run, or else its wall time (in the worker process or this thread, from
        request to answer); the CPU time of the tracker's threads (this one's outside the
        child's measurements, the logging thread's, the throttling thread's, the sinks' sender
        threads'); and the child's start, repaid over :data:`START_REPAID_SECONDS`."""
        worker = self._worker
        threads = self._thread_cpu + self._log_cpu
        threads += worker.throttle_cpu_seconds if worker is not None else 0.0
        threads += sum(float(getattr(sink, "cpu_seconds", 0.0)) for sink in self.sinks)
        return self._busy_seconds + threads + self._start_debt()

    def _start_debt(self) -> float:
        """The part of the child's start counted so far: it ran at full speed before the first
        measurement, and is counted in proportion to the time elapsed, in full after
        :data:`START_REPAID_SECONDS`, so it does not hold back the first measurements."""
        if self._budget_start is None or not self._start_seconds:
            return 0.0
        elapsed = time.monotonic() - self._budget_start
        return self._start_seconds * min(1.0, elapsed / START_REPAID_SECONDS)

    def _pace(self) -> None:
        """Wait until the budget allows the next measurement: the time spent measuring at most
        ``m / (1 + m)`` of the time elapsed for ``max_overhead=m`` (paced to
        :data:`PACE_MARGIN` of it), so that a loop that stalls while measuring runs takes at
        most ``1 + m`` times as long."""
        share = self._share()
        if share is None or self._budget_start is None:
            return
        rate = PACE_MARGIN * share  # seconds measuring per wall-clock second
        while not self._closing.is_set():
            allowed = rate * (time.monotonic() - self._budget_start)
            over = self._spent() - allowed
            if over <= 0:
                return
            self._closing.wait(over / rate)

    def _measure(self, snapshot: Snapshot) -> tuple[ClusterabilityReport, dict[str, bytes]]:
        """Measure one snapshot (measuring thread): report and PNG plots by name."""
        graph, graph_seconds = snapshot.graph, snapshot.graph_seconds
        module: nn.Module | None = None
        if graph is None:
            if snapshot.module is not None and snapshot.state is not None:
                snapshot.module.load_state_dict(snapshot.state)
            source = snapshot.module if snapshot.module is not None else snapshot.state
            assert source is not None
            started = time.perf_counter()
            graph = weight_graph(source, **self._graph_options)  # no tracing: see snapshots
            graph_seconds = time.perf_counter() - started
            if self.shuffle == "random_init" and isinstance(source, nn.Module):
                module = source
        options = {
            "k": self.k,
            "shuffles": self.shuffles,
            "shuffle": self.shuffle,
            "seed": step_seed(self.seed, snapshot.step),
            **self._measure_options,
        }
        if module is not None:  # re-initialised copies need the module: measured here
            report, images, plot_error = measure_step(
                graph, snapshot.step, options, snapshot.plots, module
            )
        else:  # with weights, the worker rebuilds the graph from the traced topology
            report, images, plot_error = self._run(
                MEASURE_STEP, graph, snapshot.step, options, snapshot.plots, None, snapshot.weights
            )
        if plot_error:
            warn(f"clusterability plots at step {snapshot.step} failed: {plot_error}.")
        report.config["tracker_seed"] = self.seed
        report.config["worker"] = "thread" if self._worker is None else "process"
        report.timings["graph"] = report.timings.get("graph", 0.0) + graph_seconds
        report.timings["total"] = report.timings.get("total", 0.0) + graph_seconds
        return report, images

    def _step_artifacts(
        self, report: ClusterabilityReport, images: Mapping[str, bytes]
    ) -> dict[str, Path]:
        """Write ``report.json`` and the step's plots (measuring thread); name -> path."""
        assert self._workdir is not None and report.step is not None
        folder = self._workdir / f"step-{report.step}"
        folder.mkdir(parents=True, exist_ok=True)
        artifacts = {"report.json": folder / "report.json"}
        artifacts["report.json"].write_text(report.to_json(indent=2), encoding="utf-8")
        for name, data in images.items():
            path = folder / f"{name}.png"
            path.write_bytes(data)
            artifacts[f"{name}.png"] = path
        return artifacts

    def _send_summary(self) -> None:
        """Write the summary artifacts and queue them for the sinks (measuring thread)."""
        try:
            reports = self._reports.reports()
            with self._lock:
                skipped, failed = sorted(self._skipped), sorted(self._failed)
                last_images = dict(self._last_images[1]) if self._last_images else {}
            files, plot_error = self._run(
                RENDER_SUMMARY, reports, last_images, self._params(), skipped, failed, self.plots
            )
            if plot_error:
                warn(f"clusterability summary plots failed: {plot_error}.")
            assert self._workdir is not None
            folder = self._workdir / "summary"
            folder.mkdir(parents=True, exist_ok=True)
            artifacts = {}
            for name, data in files.items():
                (folder / name).write_bytes(data)
                artifacts[name] = folder / name
            self._log_queue.put(("summary", reports, artifacts))
        except Exception as error:
            warn(f"clusterability summary failed: {describe(error)}.")


_LIBC: Any = None


def _trim_heap() -> None:
    """Give the pages that the freed weight copies, reports and images leave in the heap back to
    the system (glibc's ``malloc_trim``, about a millisecond; a no-op elsewhere). Without it the
    training process grew by about 30 KB per measurement: glibc's heaps keep freed pages."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _LIBC = libc
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                pass
    if _LIBC:
        _LIBC.malloc_trim(0)
