"""The tracker's measuring child process: what runs in it, and the pipe that feeds it.

Measuring is CPU-bound Python and numpy code. In a thread of the training process it would hold
the GIL for milliseconds at a time, and a training loop, which releases and re-takes the GIL at
every torch call, would wait for it each time: a small loop runs several times slower while a
measurement runs. So by default the tracker measures in a child process of its own, fed through
a pipe: the weight graph goes in, the report and the PNG plots come back.

This module imports no torch (the weight graph, the measurement and the report need numpy and
scipy only), so the child starts in well under a second instead of competing with the training
loop for the seconds torch takes to import.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster_tracking.graph.types import WeightGraph
from cluster_tracking.measure import _shuffled_task, measure
from cluster_tracking.report import SCHEMA_VERSION, ClusterabilityReport

if TYPE_CHECKING:
    from torch import nn


def measure_step(
    graph: WeightGraph,
    step: int,
    options: Mapping[str, Any],
    plots: bool,
    module: nn.Module | None = None,
    weights: Sequence[np.ndarray] | None = None,
) -> tuple[ClusterabilityReport, dict[str, bytes], str | None]:
    """Measure one snapshot's weight graph and draw its plots (the worker's job).

    Args:
        graph: the snapshot's weight graph, or with ``weights`` its topology.
        step: its training step.
        options: keyword arguments of :func:`~cluster_tracking.measure.measure` (k, shuffles,
            shuffle, seed, n_jobs, ...).
        plots: draw ``adjacency``, ``cluster_matrix`` and ``composition``.
        module: the model, for the ``random_init`` null model (which re-initialises it).
        weights: the snapshot's weights, one per block of ``graph``: the graph is rebuilt from
            them here (its sparse adjacency assembled in the worker, not in the training
            process, where it would hold the GIL that the training thread needs), and the time
            it takes is the report's ``graph`` timing.

    Returns:
        The report (with its ``step``), PNG bytes by plot name, and the error of the plots, if
        they failed (the report is still good).
    """
    rebuild_seconds = 0.0
    if weights is not None:
        started = time.perf_counter()
        graph = graph.with_weights(weights)
        rebuild_seconds = time.perf_counter() - started
    report = measure(module if module is not None else graph, **options)
    report.step = step
    report.timings["graph"] = report.timings.get("graph", 0.0) + rebuild_seconds
    report.timings["total"] = report.timings.get("total", 0.0) + rebuild_seconds
    images: dict[str, bytes] = {}
    if not plots:
        return report, images, None
    started = time.perf_counter()
    try:
        from cluster_tracking.viz import plots as figures

        images["adjacency"] = figures.png_bytes(
            figures.adjacency_figure(
                graph,
                report.partition.labels,
                title=f"Weight graph ordered by cluster, step {step}",
            )
        )
        images["cluster_matrix"] = figures.png_bytes(
            figures.cluster_matrix_figure(
                figures.cluster_matrix(graph, report.partition.labels),
                title=f"Edge weight between clusters / volume, step {step}",
            )
        )
        images["composition"] = figures.png_bytes(figures.composition_figure(report))
    except Exception as error:
        return report, images, _describe(error)
    finally:  # not part of "total" (the measurement): the tracker budgets the plots apart
        report.timings["plots"] = time.perf_counter() - started
    return report, images, None


def render_summary(
    reports: Sequence[ClusterabilityReport],
    last_images: Mapping[str, bytes],
    params: Mapping[str, Any],
    skipped: Sequence[int],
    failed: Sequence[int],
    plots: bool,
) -> tuple[dict[str, bytes], str | None]:
    """The summary artifacts: ``summary.json``, ``trajectory.png`` and ``report.html``.

    Returns:
        File contents by name, and the error of the plots or HTML, if they failed.
    """
    summary = {
        "schema_version": SCHEMA_VERSION,
        "params": dict(params),
        "steps": [report.step for report in reports],
        "skipped_steps": list(skipped),
        "failed_steps": list(failed),
        "trajectory": [{"step": report.step, **_short_metrics(report)} for report in reports],
        "reports": [report.to_dict() for report in reports],
    }
    files = {"summary.json": json.dumps(summary, indent=1, allow_nan=False).encode("utf-8")}
    if not plots:
        return files, None
    try:
        from cluster_tracking.viz import html_report
        from cluster_tracking.viz import plots as figures

        files["trajectory.png"] = figures.png_bytes(
            figures.trajectory_figure(reports, skipped_steps=skipped)
        )
        html = html_report.render_html(
            reports,
            images={"trajectory": files["trajectory.png"], **last_images},
            params=params,
            skipped_steps=skipped,
            failed_steps=failed,
        )
        files["report.html"] = html.encode("utf-8")
    except Exception as error:
        return files, _describe(error)
    return files, None


_WORKER_CALLS: dict[str, Any] = {
    "measure": measure_step,
    "summary": render_summary,
    "nulls": _shuffled_task,  # measure()'s null workers
}

# Runs in the child: put the package's folder first on sys.path (so it imports this very copy of
# cluster_tracking, whatever the training script did to sys.path), then serve requests.
_WORKER_BOOTSTRAP = (
    "import os, sys\n"
    "try:  # Linux: die with the thread that started it, even while busy (no orphan)\n"
    "    import ctypes, signal\n"
    "    assert sys.argv[3] != '-'\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != int(sys.argv[3]):\n        os._exit(0)\n"
    "except Exception:\n    pass\n"
    "if sys.argv[2] == 'nice':\n"
    "    try:\n        os.nice(19)\n"
    "    except (OSError, AttributeError):\n        pass\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from cluster_tracking.parallel.child import _worker_main\n"
    "_worker_main()"
)


#: Longest stretch the tracker's throttled child runs before it is paused (seconds).
THROTTLE_BURST_SECONDS = 0.005


class _Throttle:
    """Lets a child process run at most ``share`` of the wall time, in bursts of ``burst`` s.

    One thread of the parent, for the child's whole life: between :meth:`start` and
    :meth:`stop` it alternates ``SIGCONT`` (the child may run for ``burst`` seconds) and
    ``SIGSTOP`` (it is paused for ``burst * (1 - share) / share`` seconds); :meth:`stop` returns
    once the child runs unpaused again, and :meth:`close` ends the thread. The kernel enforces
    the pause whatever the child is doing (a long numpy or scipy call included), unlike a signal
    handler in the child, which Python runs only between bytecodes. Why a wall-time share and
    not a CPU share: a training loop whose threads keep every core busy loses a core while the
    child runs on it, and its OpenMP threads then wait for each other, so the loop can stall for
    the whole time the child runs; bounding that time to ``share`` bounds the loop's slowdown to
    ``1 / (1 - share)``. Short bursts keep each stall to a few milliseconds. (One thread, not
    one per measurement: every new thread of the training process may get a malloc arena of its
    own, and the process's memory grew with the number of measurements.)

    A paused child cannot be orphaned: the tracker's child dies with the thread that started it
    (``PR_SET_PDEATHSIG`` sends ``SIGKILL``, which also ends a stopped process).
    """

    def __init__(self, pid: int, share: float, burst: float = THROTTLE_BURST_SECONDS) -> None:
        self._pid = pid
        self._on = burst
        self._off = burst * (1.0 - share) / share
        self._changed = threading.Condition()
        self._wanted = False  # pause the child in cycles (between start() and stop())
        self._cycling = False  # the thread is cycling (the child may be paused)
        self._closed = False
        #: wall-clock seconds the child was allowed to run (not paused) while cycling, so far
        self.run_seconds = 0.0
        self._thread = threading.Thread(
            target=self._loop, name="cluster-tracking-throttle", daemon=True
        )
        self._thread.start()

    def start(self) -> None:
        """Begin pausing the child in cycles."""
        with self._changed:
            if not self._closed:
                self._wanted = True
                self._changed.notify_all()

    def stop(self) -> float:
        """Stop pausing the child; returns once it runs unpaused, with :attr:`run_seconds`."""
        with self._changed:
            self._wanted = False
            self._changed.notify_all()
            while self._cycling:
                self._changed.wait()
            return self.run_seconds

    def close(self) -> None:
        """Stop pausing the child for good and end the thread (the child runs on)."""
        with self._changed:
            self._closed = True
        self.stop()
        self._thread.join()

    def _loop(self) -> None:
        with self._changed:
            while True:
                while not self._wanted and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                self._cycling = True
                self._cycle()
                self._cycling = False
                self._changed.notify_all()

    def _cycle(self) -> None:
        """Pause and resume the child until :meth:`stop` (with ``_changed`` held; its waits
        release it)."""
        resumed = time.monotonic()
        try:
            while self._wanted:
                self._changed.wait(self._on)
                if not self._wanted:
                    break
                os.kill(self._pid, signal.SIGSTOP)
                self.run_seconds += time.monotonic() - resumed
                self._changed.wait(self._off)  # stop() wakes it at once
                os.kill(self._pid, signal.SIGCONT)
                resumed = time.monotonic()
        except OSError:  # the child is gone
            self._wanted = False
        finally:
            self.run_seconds += time.monotonic() - resumed
            try:
                os.kill(self._pid, signal.SIGCONT)  # never leave it paused
            except OSError:
                pass


def can_throttle() -> bool:
    """Whether :class:`_Throttle` can pause a child here (POSIX signals and, so that a paused
    child cannot be orphaned, Linux's ``PR_SET_PDEATHSIG``)."""
    return sys.platform.startswith("linux") and hasattr(signal, "SIGSTOP")


class _WorkerError(Exception):
    """A worker function raised; the message is the original ``Type: message``."""


def _write_frame(stream: Any, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(stream: Any) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the worker's pipe closed")
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the worker's pipe closed mid-message")
    return pickle.loads(data)


class _WorkerProcess:
    """A child Python process that runs :data:`_WORKER_CALLS`, one call at a time.

    Requests and answers are pickled frames on the child's stdin and stdout (its own pipes: only
    its owner talks to it). The tracker's child runs at the lowest CPU priority (``nice``: nice
    19), so training keeps the CPU when both want it, and the tracker also paces its requests to
    a budget (:class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker`'s ``max_overhead``);
    ``nice=False`` runs it at normal priority (the null workers of ``measure``). The child exits
    when its stdin closes (so it never outlives its parent; with ``die_with_thread`` it is also
    killed when the thread that started it ends, even mid-measurement) and writes nothing else to
    the pipe (stray prints go to stderr).
    Every answer carries the child's CPU seconds so far (:attr:`cpu_seconds`).

    Args:
        start_timeout: seconds the child may take to start before it is killed.
        nice: run the child at nice 19.
        env: environment variables set in the child, on top of this process's.
        wait: wait here until the child has started; otherwise the first :meth:`call` waits.
        die_with_thread: on Linux, kill the child when the thread creating it ends
            (``PR_SET_PDEATHSIG``): for a child owned by one long-lived thread.
    """

    def __init__(
        self,
        start_timeout: float = 120.0,
        *,
        nice: bool = True,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        die_with_thread: bool = False,
        throttle: float | None = None,
    ) -> None:
        if throttle is not None and not (die_with_thread and can_throttle()):
            raise ValueError("throttle needs die_with_thread on Linux (no orphaned paused child)")
        if throttle is not None and not 0 < throttle < 1:
            raise ValueError(f"throttle must be a fraction in (0, 1), got {throttle!r}")
        #: the share of wall time the child may run during a call (None: no limit)
        self.throttle = throttle
        #: wall-clock seconds the child was allowed to run during calls (all of a call's wall
        #: time when it is not throttled)
        self.run_seconds = 0.0
        self._throttle: _Throttle | None = None
        package_root = str(Path(__file__).resolve().parents[1])
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER_BOOTSTRAP,
                package_root,
                "nice" if nice else "-",
                str(os.getpid()) if die_with_thread else "-",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            env={**os.environ, **env} if env else None,
        )
        self._ready = threading.Event()
        #: CPU seconds the child has used (user + system), as of its last answer.
        self.cpu_seconds = 0.0
        #: CPU seconds the child used to start (imports), as of its first message.
        self.start_cpu_seconds = 0.0

        def give_up() -> None:
            if not self._ready.is_set():
                self._process.kill()  # its pipe closes: the read of its first message fails

        self._timer = threading.Timer(start_timeout, give_up)
        self._timer.daemon = True
        self._timer.start()
        if throttle is not None:
            # a throttled child is throttled while it starts too (its imports take CPU seconds)
            self._throttle = _Throttle(self.pid, throttle)
            self._throttle.start()
        if wait:
            self._await_ready()

    @property
    def pid(self) -> int:
        return self._process.pid

    def running(self) -> bool:
        """Whether the child is still running."""
        return self._process.poll() is None

    def _await_ready(self) -> None:
        """Read the child's first message, which says it has started."""
        if self._ready.is_set():
            return
        try:
            kind, _, cpu = _read_frame(self._process.stdout)
            self.cpu_seconds = self.start_cpu_seconds = float(cpu)
        except Exception:
            self.stop()
            raise
        finally:
            self._ready.set()
            self._timer.cancel()
            if self._throttle is not None:
                self._throttle.stop()  # idle, it waits for requests unpaused
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"unexpected first message from the worker: {kind!r}")

    def call(self, name: str, *args: Any) -> Any:
        """Run ``_WORKER_CALLS[name](*args)`` in the child; raises :class:`_WorkerError` when it
        raised, ``EOFError``/``OSError`` when the child is gone."""
        if not self.running():
            raise EOFError(f"the worker exited with code {self._process.returncode}")
        self._await_ready()
        started = time.monotonic()
        throttle = self._throttle if self.throttle is not None else None
        run_before = 0.0
        if throttle is not None:
            run_before = throttle.run_seconds
            throttle.start()
        try:
            _write_frame(self._process.stdin, (name, args))
            kind, value, cpu = _read_frame(self._process.stdout)
        finally:
            self.run_seconds += (
                time.monotonic() - started if throttle is None else throttle.stop() - run_before
            )
        self.cpu_seconds = float(cpu)
        if kind == "error":
            raise _WorkerError(value)
        return value

    def unthrottle(self) -> None:
        """Let the child run at full speed from now on, the call under way included."""
        self.throttle = None
        if self._throttle is not None:
            self._throttle.close()  # for good: a call starting now cannot pause it again

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to exit; kill it if it does not within ``timeout`` seconds."""
        process = self._process
        if self._throttle is not None:
            self._throttle.close()  # it must run to exit
        try:
            if process.poll() is None and process.stdin is not None:
                _write_frame(process.stdin, None)
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
        if process.stdout is not None:
            process.stdout.close()

    def kill(self) -> None:
        """End the child now (a measurement in progress is abandoned) and reap it."""
        process = self._process
        if process.poll() is None:
            process.kill()
        if self._throttle is not None:
            self._throttle.close()
        try:
            process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
            pass


def _worker_main() -> None:
    """The worker process's loop (see :class:`_WorkerProcess`)."""
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the pipe
    # Ctrl-C in a terminal reaches the whole process group; the training script decides what
    # happens then (typically tracker.close()), and the worker goes when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get("CLUSTER_TRACKING_WARM_PLOTS") == "1":
        try:  # part of the start, not of the first measurement (the tracker's budget)
            from cluster_tracking.viz import (
                html_report,  # noqa: F401
                plots,  # noqa: F401
            )
        except Exception:
            pass
    try:
        _write_frame(answers, ("ready", None, time.process_time()))
    except OSError:  # the parent is gone already
        return
    while True:
        try:
            request = _read_frame(requests)
        except EOFError:
            return
        if request is None:
            return
        name, args = request
        try:
            answer = ("ok", _WORKER_CALLS[name](*args))
        except Exception as error:
            answer = ("error", f"{type(error).__name__}: {str(error).strip()}")
        try:
            _write_frame(answers, (*answer, time.process_time()))
        except OSError:  # the parent closed the pipe (it gave up waiting): leave quietly
            return


def _short_metrics(report: ClusterabilityReport) -> dict[str, float]:
    """``report.metrics()`` without the ``clusterability/`` prefix."""
    return {key.split("/", 1)[1]: value for key, value in report.metrics().items()}


def _describe(error: BaseException) -> str:
    if isinstance(error, _WorkerError):  # already "Type: message", from the worker process
        return str(error).strip().rstrip(".")
    text = str(error).strip().rstrip(".")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
