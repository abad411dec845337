"""The state a tracker's three sides share: the training thread (snapshots and the backlog), the
measuring thread, and the logging thread that fans reports out to the sinks.

:class:`_TrackerState` declares it and sets it up; the modules of each side
(:mod:`~cluster_tracking.tracking.backlog`, :mod:`~cluster_tracking.tracking.measuring`,
:mod:`~cluster_tracking.tracking.worker`, :mod:`~cluster_tracking.tracking.fanout`) add their
methods on top of it, and :class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker`
combines them. Everything below ``_lock`` is guarded by it unless said otherwise.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any

from cluster_tracking.parallel.child import WorkerProcess
from cluster_tracking.tracking.report_store import ReportStore
from cluster_tracking.tracking.settings import OnBacklog, TrackerSettings
from cluster_tracking.tracking.sinks import Sink
from cluster_tracking.tracking.snapshots import Snapshot, Snapshotter

#: What the measuring thread puts on the logging queue last.
_STOP = object()


class _Abandoned(Exception):
    """``close(timeout)`` gave up: the measurement in progress is dropped."""


class _TrackerState:
    """The settings and the shared state of a tracker (see the module docstring)."""

    sinks: list[Sink]
    every_n_steps: int | None
    every_n_epochs: int | None
    k: int
    shuffles: int
    shuffle: str
    seed: int
    on_backlog: OnBacklog
    max_pending: int
    max_overhead: float | None
    worker: str
    n_jobs: int | None
    plots: bool
    measure_final: bool
    rank: int | None

    def _init_state(self, sinks: list[Sink], settings: TrackerSettings) -> None:
        """Take the validated ``settings`` and set up the shared state."""
        self.sinks = sinks
        self._settings = settings
        self.every_n_steps, self.every_n_epochs = settings.every_n_steps, settings.every_n_epochs
        self.k, self.shuffles, self.shuffle = settings.k, settings.shuffles, settings.shuffle
        self.seed = settings.seed
        self.on_backlog, self.max_pending = settings.on_backlog, settings.max_pending
        self.max_overhead, self.worker = settings.max_overhead, settings.worker
        self.n_jobs, self.plots, self.rank = settings.n_jobs, settings.plots, settings.rank
        self.measure_final = settings.measure_final
        self._measure_options: dict[str, Any] = settings.measure_options
        self._graph_options: dict[str, Any] = settings.graph_options
        self._snapshotter = Snapshotter(settings.shuffle, settings.graph_options)

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Condition(self._lock)  # a snapshot waits, or close() began
        self._requested: set[int] = set()
        self._pending: deque[Snapshot] = deque()  # snapshots waiting for the worker
        self._in_flight = 0  # snapshots not yet measured *and* logged
        self._reports = ReportStore()  # has its own lock
        self._skipped: list[int] = []
        self._failed: list[int] = []
        self._last_images: tuple[int, dict[str, bytes]] | None = None
        self._warned_untraceable = False
        self._warned_skip = False
        self._warned_slow_sinks = False
        self._warned_closed = False
        self._stopping = False  # close() began: measure what waits, then stop
        self._closing = threading.Event()  # close() began: no more pacing
        self._abandoned = False  # close(timeout) gave up: drop everything left
        self._closed = False
        self._init_budget()
        self._log_queue: queue.Queue[Any] = queue.Queue()
        self._measure_thread: threading.Thread | None = None
        self._log_thread: threading.Thread | None = None
        self._workdir: Path | None = None
        self._worker: WorkerProcess | None = None
        self._worker_failed = False
        # the model and step of the latest hook call, for measure_final (a module is held by
        # weak reference: the tracker never keeps a model alive)
        self._last_model: Any = None
        self._last_step = -1

    def _init_budget(self) -> None:
        """The measuring thread's account of the time it spent (see ``max_overhead``)."""
        self._budget_start: float | None = None
        self._log_cpu = 0.0  # CPU seconds of the logging thread
        self._skipped_since = 0  # steps skipped since the last measurement began
        self._behind = 0  # measurements in a row that began with skipped steps behind them
        self._busy_seconds = 0.0  # wall time of the measurements so far
        self._thread_cpu = 0.0  # the measuring thread's CPU outside the child's measurements
        self._start_seconds = 0.0  # the child's start, at full speed (see _start_debt)
        self._plot_seconds = 0.0  # the part of it spent drawing plots
        self._measure_cost = 0.0  # of the last measurement: without its plots
        self._plot_cost = 0.0  # of the last plots drawn

    def _params(self) -> dict[str, Any]:
        """The settings logged once to every sink (``ClusterabilityTracker.params``)."""
        from cluster_tracking.version import __version__

        return self._settings.params(__version__)

    def _finish_one(self) -> None:
        """One snapshot is done (measured and logged, or failed). Call with the lock held."""
        self._in_flight -= 1
        if self._in_flight <= 0:
            self._idle.notify_all()
