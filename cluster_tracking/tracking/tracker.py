"""The training hook: measure clusterability on a schedule without slowing training down.

>>> tracker = ClusterabilityTracker(sinks=[LocalDirectorySink("runs/clusterability")],
...                                 every_n_steps=200, k=12, shuffles=20)
>>> for step, batch in enumerate(loader):
...     ...                                  # forward, backward, optimiser step
...     tracker.step(model, step)            # cheap; measures only when the schedule says so
>>> tracker.close()                          # waits for pending measurements, logs the summary

How it works. At a due step the training thread takes a snapshot of the weights on the CPU and
returns. A background thread hands the snapshot to the tracker's worker process, which partitions
it, measures the null model (:func:`~cluster_tracking.measure.measure`) and draws the plots; a
second background thread passes report and plots to the sinks. Measuring in a child process
(``worker="process"``, the default) keeps it from competing with training for the GIL;
``worker="thread"`` measures in the training process instead. A slow or unreachable tracking
server delays neither training nor the next measurement.

The snapshot is one device-to-host copy of the weights. At the first due step the training
thread also traces the model's data flow with ``torch.fx`` (tracing must happen in the training
thread, because it patches ``torch.nn.Module.__call__`` for the whole process), or with
``layers=[...]`` builds the chain of named layers without tracing; later steps reuse that topology,
and the child process rebuilds each step's graph from it and the copied weights.

Guarantees:

* **Paced to a budget.** On Linux the worker runs at normal priority with one BLAS thread and is
  throttled (:class:`~cluster_tracking.parallel.throttle.Throttle`) to run at most
  ``m / (1 + m)`` of the wall time for ``max_overhead=m`` (default 0.1), in 5 ms bursts, which
  bounds a busy loop's slowdown to ``1 + m``; elsewhere it runs at nice 19 and the wall time of
  its measurements is paced to ``max_overhead``. ``close()`` measures what is left at full speed.
* **Never blocks training; the newest due step wins.** When ``max_pending`` snapshots already
  wait at a due step, ``on_backlog="skip"`` (the default) replaces the oldest waiting one with the
  new one, so the dashboard follows training; ``on_backlog="queue"`` replaces the newest waiting
  one (the older ones are measured in order). Either way the last due step is always measured,
  replaced steps are listed in :attr:`ClusterabilityTracker.skipped_steps` and the summary, their
  count is logged with every measurement as ``clusterability/skipped_steps``, and the first one
  gives a warning that names the knobs.
* **Bounded.** At most ``max_pending`` snapshots wait; reports are kept in an unnamed temporary
  file, not in memory; a step's working files go once every sink has them, and while the sinks
  are behind (8 or more reports waiting for them) new reports reach them without their plots.
* **Never takes training down.** Every failure in snapshotting, measuring, plotting or logging
  becomes a :class:`ClusterTrackingWarning` and the run goes on; ``close()`` never raises.
* **Reproducible.** Step ``s`` is measured with the seed :meth:`ClusterabilityTracker.seed_for`
  ``(s)``, derived from the tracker's ``seed`` and ``s`` only, so a rerun gives the same numbers.
* **Distributed.** Only rank 0 measures and logs (``torch.distributed``'s rank, or ``rank=``); on
  the other ranks every call is a no-op.
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import os
import queue
import secrets
import shutil
import sys
import tempfile
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cluster_tracking import nulls
from cluster_tracking.errors import ClusterTrackingWarning, ConfigError, GraphError, describe, warn
from cluster_tracking.graph import WeightGraph, live_weights, weight_graph, weight_topology
from cluster_tracking.graph.selection import parse_layers
from cluster_tracking.parallel.child import PRELOAD_VARIABLE, WorkerError, WorkerProcess, run_job
from cluster_tracking.parallel.throttle import can_throttle
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.tracking.jobs import MEASURE_STEP, PLOT_MODULES, RENDER_SUMMARY, measure_step
from cluster_tracking.tracking.sinks import SKIPPED_STEPS_METRIC, Sink

OnBacklog = Literal["skip", "queue"]

#: Thread-count variables of the BLAS/OpenMP libraries, set to 1 in the throttled child.
_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_OPERATIONS",
    "NUMEXPR_NUM_THREADS",
)

#: ``max_pending`` when it is not given: 1 with ``on_backlog="skip"``, this with ``"queue"``.
DEFAULT_QUEUE_PENDING = 16
#: While measuring cannot keep up, drawing the plots takes at most this share of the time spent
#: measuring: a measurement draws them only while the plots so far took less.
PLOTS_SHARE_WHILE_BEHIND = 0.25
#: Reports waiting for the sinks beyond which a new report goes to them without its plots.
LOG_BACKLOG_WITH_PLOTS = 8

#: Per-step artifact names the tracker writes (under ``clusterability/step-<step>/``).
STEP_ARTIFACTS = ("report.json", "adjacency.png", "cluster_matrix.png", "composition.png")
#: Summary artifact names written at ``close()`` (under ``clusterability/``).
SUMMARY_ARTIFACTS = ("summary.json", "trajectory.png", "report.html")


@dataclass(eq=False)  # compared by identity (a waiting snapshot is replaced by identity)
class _Snapshot:
    """The weights of one due step, on the CPU, waiting for the worker: one of

    * ``graph``: the weight graph itself, built in the training thread (models that need
      ``torch.fx`` tracing, see :meth:`ClusterabilityTracker._snapshot`) at the first due step;
    * ``graph`` and ``weights``: at later due steps, that graph's topology and the weights read
      again from the model, to combine in the background;
    * ``module`` and ``state``: the tracker's CPU copy of the model's structure and the weights
      to load into it (``state`` is ``None`` when the copy was just made and holds them);
    * ``state`` alone: a state_dict, measured as a chain of layers.
    """

    step: int
    graph: WeightGraph | None = None
    module: nn.Module | None = None
    state: dict[str, Any] | None = None
    graph_seconds: float = 0.0
    weights: list[np.ndarray] | None = None
    explicit: bool = False  # a checkpoint(): never replaced by a newer due step
    plots: bool = True  # draw this step's plots (the tracker thins them while behind)


_STOP = object()


class _Abandoned(Exception):
    """``close(timeout)`` gave up: the measurement in progress is dropped."""


class ClusterabilityTracker:
    """Measures a model's clusterability during training and sends the reports to sinks.

    Call :meth:`step` every training step (it measures when ``step % every_n_steps == 0``, so at
    steps 0, n, 2n, ...), :meth:`epoch_end` at the end of every epoch (it measures after every
    ``every_n_epochs``-th epoch), or :meth:`checkpoint` wherever you want a measurement (e.g. when
    you save a checkpoint). A step is measured at most once. Finish with :meth:`close`, or use the
    tracker as a context manager.

    Each measurement logs to every sink the metrics of
    :data:`~cluster_tracking.report.METRIC_KEYS` at its step and, under
    ``clusterability/step-<step>/``, ``report.json`` (the full
    :class:`~cluster_tracking.report.ClusterabilityReport`), ``adjacency.png`` (the weight graph
    ordered by cluster) and ``composition.png`` (neurons of each layer by cluster). ``close()``
    logs ``clusterability/summary.json`` (every step, skipped and failed steps),
    ``clusterability/trajectory.png`` and the self-contained ``clusterability/report.html``.

    Args:
        sinks: where reports go (:class:`~cluster_tracking.tracking.sinks.LocalDirectorySink`,
            ``cluster_tracking.integrations.mlflow.MlflowSink``, or anything with the
            :class:`~cluster_tracking.tracking.sinks.Sink` methods). No sink: reports are only kept
            in
            :attr:`reports`.
        every_n_steps: measure in :meth:`step` when ``step % every_n_steps == 0``; ``None``: never.
        every_n_epochs: measure in :meth:`epoch_end` after epochs ``n - 1, 2n - 1, ...``
            (0-based, as in ``for epoch in range(epochs)``); ``None``: never.
        k: number of clusters (the paper uses 12).
        shuffles: null networks per measurement (0: no null model, no z-score or p-value).
        shuffle: the null model (``layer``, ``layer_nonzero``, ``layer_nonzero_distribution``,
            ``layer_all_distribution`` or ``random_init``).
        seed: the tracker's seed; step ``s`` is measured with :meth:`seed_for` ``(s)``. ``None``
            draws one (recorded in the params as ``clusterability.seed``).
        n_jobs: parallel workers for the null networks. The default 1 measures inside the
            tracker's thread with no process pool; pass -1 for all cores.
        n_init: k-means restarts per partition (``None``: ``measure``'s default).
        norm, preset, layers, init, backend: forwarded to
            :func:`~cluster_tracking.measure.measure` (see there).
        on_backlog: what a due step does while ``max_pending`` snapshots already wait for the
            worker (measuring cannot keep up): ``"skip"`` (default) replaces the *oldest*
            waiting snapshot with the new one (newest wins: measurements follow training);
            ``"queue"`` replaces the *newest* waiting one, so the first ``max_pending - 1``
            waiting steps are measured in order, and then the latest. Replaced steps are
            recorded in :attr:`skipped_steps` and counted in the metric
            ``clusterability/skipped_steps``. Snapshots of :meth:`checkpoint` are never replaced.
        max_pending: how many snapshots may wait while a measurement runs, in both modes (each
            holds a CPU copy of the weights). ``None``: 1 with ``"skip"``, 16 with ``"queue"``.
        max_overhead: the fraction of training wall time measuring may take: since the first
            due step, the wall time of the measurements (in the worker, from request to
            answer) and the logging thread's CPU time stay below ``max_overhead`` times the
            time elapsed; a measurement starts only when that budget allows, and a newer due
            step replaces the waiting one meanwhile. A loop that keeps every core busy slows
            down mostly while a measurement runs; the worker's one-off start (about 2 s of CPU)
            and the tracker's threads come on top (``benchmarks/bench_load.py``).
            ``None``: no limit (measure back to back, which can slow such a loop 2-4x).
            ``close()`` measures what is left without the limit.
        plots: draw the PNG plots and the HTML report (``False``: JSON only, faster). The
            plots can cost several times the measurement itself, so while measuring cannot keep
            up (due steps were skipped since the previous measurement) a measurement draws them
            only while the plots so far, with these, take at most a quarter of the time spent
            measuring (:data:`PLOTS_SHARE_WHILE_BEHIND`); the metrics and ``report.json`` of
            every measured step are logged all the same, and the last measurement (at
            ``close()``) has its plots.
        measure_final: at ``close()``, measure the model of the latest hook call when its step
            was not measured (the last due step was skipped, or training ran past it), so the
            final value logged is the final model's (only once the tracker has measured
            something; a model deleted before ``close()`` is not measured). On by default:
            with ``every_n_steps=100`` and steps ``0..250``, the steps measured are 0, 100,
            200 and 250. ``False``: only the schedule's due steps.
        worker: where measurements run. ``"process"`` (default): in a child Python process at
            nice 19, started at the first due step (a few seconds, in the background; it
            imports cluster-tracking, ~400 MB of memory), so they never compete with training
            for the GIL; it never outlives the tracker (``close(timeout=...)`` kills it).
            ``"thread"``: in a thread of the training process; no extra process, but a
            Python-bound training loop runs slower while a measurement runs. If the process
            cannot start or dies, the tracker warns and goes on with a thread. The
            ``random_init`` null model always measures in a thread (it needs the model).
        rank: this process's rank; ``None`` reads ``torch.distributed`` at each call. Only rank 0
            measures and logs.
        example_inputs: a small input of the model (a tensor, a tuple of them, or a dict of
            keyword inputs) to follow its data flow with ``torch.export`` where ``torch.fx``
            cannot (recurrent layers, attention, transposed convolutions, reshapes that move the
            channel axis); Hugging Face and timm models need none (their configs give one).
        include_embeddings: add embedding tables and the LM head as weight blocks (see
            :func:`~cluster_tracking.graph.weight_graph`).

    Raises:
        ConfigError: a setting is out of range (checked here, before training starts).
    """

    def __init__(
        self,
        sinks: Sequence[Sink] = (),
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        k: int = 12,
        shuffles: int = 20,
        shuffle: str = "layer",
        seed: int | None = 0,
        n_jobs: int | None = 1,
        n_init: int | None = None,
        norm: Literal["l1", "l2"] = "l1",
        preset: Literal["default", "filan2021"] = "default",
        layers: str | Sequence[str] | None = None,
        init: str | None = None,
        backend: str | None = None,
        on_backlog: OnBacklog = "skip",
        max_pending: int | None = None,
        max_overhead: float | None = 0.1,
        plots: bool = True,
        measure_final: bool = True,
        worker: Literal["process", "thread"] = "process",
        rank: int | None = None,
        example_inputs: Any = None,
        include_embeddings: bool = False,
    ) -> None:
        self.sinks: list[Sink] = list(sinks)
        for sink in self.sinks:
            missing = [
                name
                for name in ("log_params", "log_report", "log_summary", "close")
                if not callable(getattr(sink, name, None))
            ]
            if missing:
                raise ConfigError(
                    f"sink {sink!r} lacks {', '.join(missing)}; a sink needs log_params, "
                    "log_report, log_summary and close (see cluster_tracking.tracking.sinks.Sink)."
                )
        self.every_n_steps = _check_interval(every_n_steps, "every_n_steps")
        self.every_n_epochs = _check_interval(every_n_epochs, "every_n_epochs")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
            raise ConfigError(f"k must be an integer >= 2 (the paper uses 12), got {k!r}.")
        self.k = int(k)
        if isinstance(shuffles, bool) or not isinstance(shuffles, (int, np.integer)):
            raise ConfigError(f"shuffles must be an integer, got {shuffles!r}.")
        if shuffles == 1 or shuffles < 0:
            raise ConfigError(
                f"shuffles={shuffles}: a null model needs at least 2 networks (20-50 is typical "
                "during training); pass shuffles=0 to skip it."
            )
        self.shuffles = int(shuffles)
        self.shuffle = nulls.check_method(shuffle)
        if norm not in ("l1", "l2"):
            raise ConfigError(f"norm must be 'l1' or 'l2', got {norm!r}.")
        if preset not in ("default", "filan2021"):
            raise ConfigError(f"preset must be 'default' or 'filan2021', got {preset!r}.")
        if layers:
            parse_layers(layers)  # a ConfigError now, not at the first due step
        if self.shuffle == "random_init" and layers is None:
            raise ConfigError(
                "shuffle='random_init' traces every re-initialised copy of the model with "
                "torch.fx, which cannot run in the background while training calls the model; "
                "pass layers=[...] (the graph is then built without tracing), or use a shuffle "
                "null during training and measure(model, shuffle='random_init') on checkpoints."
            )
        if seed is None:
            seed = secrets.randbits(32)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer or None, got {seed!r}.")
        self.seed = int(seed)
        if on_backlog not in ("skip", "queue"):
            raise ConfigError(f"on_backlog must be 'skip' or 'queue', got {on_backlog!r}.")
        self.on_backlog: OnBacklog = on_backlog
        if max_pending is None:
            max_pending = 1 if on_backlog == "skip" else DEFAULT_QUEUE_PENDING
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be an integer >= 1, got {max_pending!r}.")
        self.max_pending = max_pending
        if max_overhead is not None and (
            isinstance(max_overhead, bool)
            or not isinstance(max_overhead, (int, float))
            or not 0 < max_overhead <= 1
        ):
            raise ConfigError(
                f"max_overhead must be a fraction in (0, 1] (0.1: measuring may take a tenth "
                f"of the machine) or None for no limit, got {max_overhead!r}."
            )
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        if worker not in ("process", "thread"):
            raise ConfigError(f"worker must be 'process' or 'thread', got {worker!r}.")
        self.worker = worker
        self.n_jobs = n_jobs
        self.plots = bool(plots)
        self.measure_final = bool(measure_final)
        self.rank = rank
        self._measure_options: dict[str, Any] = {
            "n_jobs": n_jobs,
            "norm": norm,
            "preset": preset,
            "layers": layers if isinstance(layers, str) or layers is None else list(layers),
            "init": init,
            "backend": backend,
        }
        if n_init is not None:
            self._measure_options["n_init"] = n_init
        self._graph_options: dict[str, Any] = {
            "norm": norm,
            "preset": preset,
            "layers": self._measure_options["layers"],
        }
        if example_inputs is not None:
            self._graph_options["example_inputs"] = example_inputs
        if include_embeddings:
            self._graph_options["include_embeddings"] = True

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Condition(self._lock)  # a snapshot waits, or close() began
        self._requested: set[int] = set()
        self._pending: deque[_Snapshot] = deque()  # snapshots waiting for the worker
        self._in_flight = 0  # snapshots not yet measured *and* logged
        # Reports live in an unnamed temporary file as compressed JSON (about 2 KB each for a
        # 600-node MLP); memory keeps only where each one is, so the training process does not
        # grow with the number of measurements. The file goes when the tracker does.
        self._reports: dict[int, tuple[int, int]] = {}  # step -> (offset, length)
        self._report_file: Any = None
        self._skipped: list[int] = []
        self._failed: list[int] = []
        self._last_images: tuple[int, dict[str, bytes]] | None = None
        self._template: nn.Module | None = None
        self._template_signature: dict[str, Any] | None = None
        self._structure_copy_failed = False
        # the traced graph's topology (no adjacency: what later snapshots send the worker with
        # their weights) and the parameter shapes it was traced with
        self._topology: WeightGraph | None = None
        self._traced_signature: tuple[Any, ...] | None = None
        # A model the graph cannot follow: not traced again while its parameters stay the same,
        # and said once.
        self._untraceable: tuple[tuple[Any, ...], str] | None = None
        self._warned_untraceable = False
        self._warned_skip = False
        self._warned_slow_sinks = False
        self._warned_closed = False
        self._stopping = False  # close() began: measure what waits, then stop
        self._closing = threading.Event()  # close() began: no more pacing
        self._abandoned = False  # close(timeout) gave up: drop everything left
        self._budget_start: float | None = None
        self._log_cpu = 0.0  # CPU seconds of the logging thread
        self._skipped_since = 0  # steps skipped since the last measurement began
        self._behind = 0  # measurements in a row that began with skipped steps behind them
        self._busy_seconds = 0.0  # wall time of the measurements so far
        self._plot_seconds = 0.0  # the part of it spent drawing plots
        self._measure_cost = 0.0  # of the last measurement: without its plots
        self._plot_cost = 0.0  # of the last plots drawn
        self._log_queue: queue.Queue[Any] = queue.Queue()
        self._measure_thread: threading.Thread | None = None
        self._log_thread: threading.Thread | None = None
        self._workdir: Path | None = None
        self._worker: WorkerProcess | None = None
        self._worker_failed = False
        self._closed = False
        # the model and step of the latest hook call, for measure_final (a module is held by
        # weak reference: the tracker never keeps a model alive)
        self._last_model: Any = None
        self._last_step = -1

    # ----------------------------------------------------------------------------- public API

    @property
    def params(self) -> dict[str, Any]:
        """The settings logged once to every sink, under ``clusterability.*`` names."""
        from cluster_tracking import __version__

        options = self._measure_options
        params: dict[str, Any] = {
            "clusterability.k": self.k,
            "clusterability.shuffles": self.shuffles,
            "clusterability.method": self.shuffle,
            "clusterability.seed": self.seed,
            "clusterability.norm": options["norm"],
            "clusterability.preset": options["preset"],
            # the report's config["procedure"]: sinks warn when a run holds another one
            "clusterability.procedure": options["preset"],
            "clusterability.n_jobs": self.n_jobs,
            "clusterability.every_n_steps": self.every_n_steps,
            "clusterability.every_n_epochs": self.every_n_epochs,
            "clusterability.on_backlog": self.on_backlog,
            "clusterability.max_pending": self.max_pending,
            "clusterability.max_overhead": self.max_overhead,
            "clusterability.version": __version__,
        }
        if options["layers"] is not None:
            params["clusterability.layers"] = ",".join(options["layers"])
        if options.get("n_init") is not None:
            params["clusterability.n_init"] = options["n_init"]
        if options["init"] is not None:
            params["clusterability.init"] = options["init"]
        return {key: value for key, value in params.items() if value is not None}

    @property
    def reports(self) -> list[ClusterabilityReport]:
        """The reports measured so far, by step."""
        with self._lock:
            packed = []
            for step in sorted(self._reports):
                offset, length = self._reports[step]
                self._report_file.seek(offset)
                packed.append(self._report_file.read(length))
        return [ClusterabilityReport.from_json(zlib.decompress(data).decode()) for data in packed]

    @property
    def skipped_steps(self) -> list[int]:
        """Due steps not measured because measuring could not keep up: a newer due step
        replaced their snapshot while it waited (see ``on_backlog``)."""
        with self._lock:
            return sorted(self._skipped)

    @property
    def failed_steps(self) -> list[int]:
        """Due steps whose snapshot or measurement failed (each gave a warning)."""
        with self._lock:
            return sorted(self._failed)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def seed_for(self, step: int) -> int:
        """The seed of the measurement at ``step``: a 32-bit integer drawn from
        ``numpy.random.SeedSequence([seed, step])``, so it depends on nothing else."""
        return int(np.random.SeedSequence([self.seed, int(step)]).generate_state(1)[0])

    def should_measure(self, step: int) -> bool:
        """Whether :meth:`step` would measure at ``step`` (schedule only, not the backlog)."""
        return (
            self.every_n_steps is not None
            and int(step) % self.every_n_steps == 0
            and int(step) not in self._requested
        )

    def step(self, model: nn.Module | Mapping[str, Any], step: int) -> bool:
        """Call once per training step; measures ``model`` when ``step % every_n_steps == 0``.

        Cheap when no measurement is due (a modulo). When one is, it copies the weights to the CPU
        and returns at once; the measurement runs in the background.

        Args:
            model: the model being trained (any device; DDP and ``torch.compile`` wrappers are
                unwrapped), or a ``state_dict``.
            step: the training step (an integer >= 0); the metrics are logged at this step.

        Returns:
            True when a snapshot was taken for measurement.
        """
        if self.every_n_steps is None:
            return False
        number = self._check_step(step)
        if number is None:
            return False
        if number >= self._last_step:
            self._note_latest(model, number)
        if number % self.every_n_steps != 0:
            return False
        return self._request(model, number)

    def epoch_end(
        self, model: nn.Module | Mapping[str, Any], epoch: int, step: int | None = None
    ) -> bool:
        """Call at the end of every epoch; measures after every ``every_n_epochs``-th epoch.

        Args:
            model: the model being trained.
            epoch: the epoch that just ended, counted from 0.
            step: the step to log the metrics at (the global training step); ``None`` logs them
                at ``epoch``.

        Returns:
            True when a snapshot was taken for measurement.
        """
        if self.every_n_epochs is None:
            return False
        number = self._check_step(epoch, what="epoch")
        if number is None or (number + 1) % self.every_n_epochs != 0:
            return False
        at = number if step is None else self._check_step(step)
        if at is None:
            return False
        if at >= self._last_step:
            self._note_latest(model, at)
        return self._request(model, at)

    def checkpoint(self, model: nn.Module | Mapping[str, Any], step: int) -> bool:
        """Measure ``model`` at ``step`` now, whatever the schedule (e.g. when saving it).

        An explicit checkpoint is never dropped by the backlog policy (it waits in the queue),
        and it does measure a step that the schedule had to skip, so the weights a training run
        saves, such as its final ones, are always measured.

        Returns:
            True when a snapshot was taken (False on other ranks, after ``close()``, or when
            ``step`` was already measured).
        """
        number = self._check_step(step)
        if number is None:
            return False
        if number >= self._last_step:
            self._note_latest(model, number)
        return self._request(model, number, explicit=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every snapshot taken so far is measured and handed to every sink.

        Returns:
            True when nothing is pending any more, False when ``timeout`` seconds ran out.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._in_flight > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Wait for pending measurements, log the summary, and close the sinks. Never raises.

        Calling it again does nothing. After ``close()`` the hooks do nothing.

        Args:
            timeout: seconds to wait for pending measurements and sinks; ``None`` waits as long
                as they take. When it runs out, a warning says what was left undone and the
                sinks are not closed (the background threads are daemons: they end with Python).
        """
        if self.measure_final:
            try:
                self._measure_final()
            except Exception as error:  # close() never raises
                warn(f"could not measure the final weights: {describe(error)}.")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._close(timeout)
        except Exception as error:  # close() is called from training scripts' finally blocks
            warn(f"closing the clusterability tracker failed: {describe(error)}.")

    def __enter__(self) -> ClusterabilityTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        schedule = []
        if self.every_n_steps is not None:
            schedule.append(f"every_n_steps={self.every_n_steps}")
        if self.every_n_epochs is not None:
            schedule.append(f"every_n_epochs={self.every_n_epochs}")
        return (
            f"ClusterabilityTracker({', '.join(schedule) or 'checkpoints only'}, k={self.k}, "
            f"shuffles={self.shuffles}, shuffle={self.shuffle!r}, sinks={self.sinks!r})"
        )

    # ------------------------------------------------------------------ training-thread side

    def _note_latest(self, model: nn.Module | Mapping[str, Any], step: int) -> None:
        """Remember the model and step of the latest hook call (for ``measure_final``)."""
        self._last_step = step
        if isinstance(model, nn.Module):
            if not isinstance(self._last_model, weakref.ref) or self._last_model() is not model:
                self._last_model = weakref.ref(model)
        else:
            self._last_model = model

    def _measure_final(self) -> None:
        """At ``close()``: snapshot the latest model seen unless its step is measured or waits
        (the last due step was skipped, or steps ran past it)."""
        if self._closed or self._last_model is None or self._measure_thread is None:
            return
        step = self._last_step
        with self._lock:
            if step in self._requested and step not in self._skipped:
                return
        model = self._last_model
        if isinstance(model, weakref.ref):
            model = model()
            if model is None:
                return  # the model is gone: nothing newer to measure
        self._request(model, step, explicit=True)

    def _is_rank_zero(self) -> bool:
        if self.rank is not None:
            return self.rank == 0
        return not (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_rank() != 0
        )

    def _check_step(self, value: Any, what: str = "step") -> int | None:
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if isinstance(value, bool) or number < 0 or number != value:
            warn(f"{what}={value!r} is not an integer >= 0; the clusterability hook ignored it.")
            return None
        return number

    def _request(
        self, model: nn.Module | Mapping[str, Any], step: int, *, explicit: bool = False
    ) -> bool:
        """Snapshot ``model`` at ``step`` for the worker, unless the step was seen or skipped.

        ``explicit`` requests (checkpoints) are never skipped for backlog, and may take again a
        step that the backlog policy skipped before."""
        if self._closed:
            if not self._warned_closed:
                self._warned_closed = True
                warn(f"the clusterability tracker is closed; step {step} was not measured.")
            return False
        if not self._is_rank_zero():
            return False
        with self._lock:
            if step in self._requested:
                if not (explicit and step in self._skipped):
                    return False
                self._skipped.remove(step)
            self._requested.add(step)
            self._in_flight += 1
        try:
            self._ensure_started()
            snapshot = self._snapshot(model, step)
        except Exception as error:
            with self._idle:
                self._failed.append(step)
                self._finish_one()
            if not isinstance(error, GraphError):
                warn(
                    f"could not snapshot the model for clusterability at step {step}: "
                    f"{describe(error)}. Training goes on; this step is not measured."
                )
            elif not self._warned_untraceable:
                self._warned_untraceable = True
                warn(
                    f"could not build the weight graph for clusterability at step {step}: "
                    f"{describe(error)}. Training goes on; no due step of this model is "
                    "measured (warned once)."
                )
            return False
        snapshot.explicit = explicit
        taken = True
        with self._wake:
            if not explicit and len(self._pending) >= self.max_pending:
                replaceable = [waiting for waiting in self._pending if not waiting.explicit]
                if replaceable:  # newest wins: a waiting snapshot makes room
                    victim = replaceable[0] if self.on_backlog == "skip" else replaceable[-1]
                    self._pending.remove(victim)
                    self._skipped.append(victim.step)
                    self._skipped_since += 1
                else:  # only checkpoints wait, and they are never dropped
                    self._skipped.append(step)
                    self._skipped_since += 1
                    taken = False
                self._finish_one()
                warn_skip, self._warned_skip = not self._warned_skip, True
            else:
                warn_skip = False
            if taken:
                self._pending.append(snapshot)
                self._wake.notify_all()
        if warn_skip:
            budget = (
                "no max_overhead limit"
                if self.max_overhead is None
                else f"max_overhead={self.max_overhead:g}: measuring takes at most "
                f"{self.max_overhead:.0%} of the wall time"
            )
            warn(
                f"clusterability cannot keep up with training ({budget}, "
                f"every_n_steps={self.every_n_steps}, shuffles={self.shuffles}, "
                f"plots={self.plots}): a newer due step replaced a waiting one "
                f"(on_backlog={self.on_backlog!r}, max_pending={self.max_pending}); skipped "
                f"steps are counted in the metric {SKIPPED_STEPS_METRIC} and listed in the "
                "summary. To measure more of them, raise max_overhead, measure less often, use "
                "fewer shuffles, or pass plots=False."
            )
        return taken

    def _snapshot(self, model: nn.Module | Mapping[str, Any], step: int) -> _Snapshot:
        """Copy the weights to the CPU (the only work done in the training thread).

        A model whose graph needs ``torch.fx`` tracing (no ``layers=``) is traced here, once:
        tracing patches ``torch.nn.Module.__call__`` for the whole process while it runs, so
        tracing in the background would break the training thread's forward passes. At later
        due steps, while the model's parameter shapes are unchanged, only its weights are copied
        (:func:`~cluster_tracking.graph.live_weights`) and the graph is rebuilt in the background
        from the traced topology. With ``layers=`` the same, except that the first graph is built
        from the named layers, without tracing. The graph is never built in a thread of this
        process while training runs: assembling it holds the GIL, which the training thread
        needs at every torch call (a loop ran 1.8x slower). A state_dict, and a model measured
        with the ``random_init`` null (which needs a copy of the module to re-initialise), are
        copied to the CPU here and turned into a graph in the background.
        """
        with torch.no_grad():
            if isinstance(model, Mapping):
                return _Snapshot(step, state={key: _cpu_copy(v) for key, v in model.items()})
            if not isinstance(model, nn.Module):
                raise ConfigError(
                    f"expected a torch.nn.Module or a state_dict, got {type(model).__name__}."
                )
            module = _unwrap(model)
            if self.shuffle != "random_init":
                started = time.perf_counter()
                shapes = (id(module), *((n, p.shape) for n, p in module.named_parameters()))
                if self._topology is not None and shapes == self._traced_signature:
                    try:
                        weights = live_weights(module, self._topology)
                    except GraphError:
                        pass  # the model changed under its graph: trace it again
                    else:
                        return _Snapshot(
                            step,
                            graph=self._topology,
                            weights=weights,
                            graph_seconds=time.perf_counter() - started,
                        )
                if self._untraceable is not None and self._untraceable[0] == shapes:
                    raise GraphError(self._untraceable[1])
                # the adjacency is assembled in the background, as at later steps
                try:
                    self._topology = weight_topology(module, **self._graph_options)
                except GraphError as error:
                    self._untraceable = (shapes, str(error))
                    raise
                self._traced_signature = shapes
                return _Snapshot(
                    step,
                    graph=self._topology,
                    weights=[block.weight for block in self._topology.blocks],
                    graph_seconds=time.perf_counter() - started,
                )
            state = module.state_dict()
            signature = {
                name: (tuple(value.shape), value.dtype)
                for name, value in state.items()
                if isinstance(value, torch.Tensor)
            }
            if self._template is not None and signature == self._template_signature:
                copied = {key: _cpu_copy(value) for key, value in state.items()}
                return _Snapshot(step, module=self._template, state=copied)
            if not self._structure_copy_failed:
                try:
                    template = _structure_copy(module)
                except Exception as error:
                    self._structure_copy_failed = True
                    warn(
                        f"cannot copy the structure of {type(module).__name__} "
                        f"({describe(error)}); clusterability is measured from its state_dict "
                        "instead."
                    )
                else:
                    # New structure (first due step, or the shapes changed): the copy already
                    # holds this step's weights; later steps load theirs into it.
                    self._template, self._template_signature = template, signature
                    return _Snapshot(step, module=template)
            return _Snapshot(step, state={key: _cpu_copy(v) for key, v in state.items()})

    def _ensure_started(self) -> None:
        if self._measure_thread is not None:
            return
        self._workdir = Path(tempfile.mkdtemp(prefix="cluster-tracking-"))
        self._log_queue.put(("params", self.params))
        self._log_thread = threading.Thread(
            target=self._log_loop, name="cluster-tracking-log", daemon=True
        )
        self._measure_thread = threading.Thread(
            target=self._measure_loop, name="cluster-tracking-measure", daemon=True
        )
        self._log_thread.start()
        self._measure_thread.start()

    def _finish_one(self) -> None:
        """One snapshot is done (measured and logged, or failed). Call with the lock held."""
        self._in_flight -= 1
        if self._in_flight <= 0:
            self._idle.notify_all()

    # ---------------------------------------------------------------------- measuring thread

    def _measure_loop(self) -> None:
        self._budget_start = time.monotonic()
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if not self._pending or self._abandoned:
                    break
            self._pace()  # newer due steps may replace the waiting snapshot meanwhile
            with self._lock:
                if self._abandoned or not self._pending:
                    break
                item = self._pending.popleft()
                # plots are thinned first while measuring cannot keep up
                self._behind = self._behind + 1 if self._skipped_since else 0
                self._skipped_since = 0
                # the plots' cost: as last time, or before any, 4x the last measurement's
                cost = self._plot_cost or 4 * self._measure_cost
                item.plots = self.plots and (
                    self._closing.is_set()
                    or self._behind == 0
                    or self._plot_seconds + cost
                    <= PLOTS_SHARE_WHILE_BEHIND * (self._busy_seconds + cost)
                )
            started = time.monotonic()
            run_before = self._worker.run_seconds if self._worker is not None else 0.0
            busy_before = self._busy_seconds
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
                item.state = item.graph = item.module = item.weights = None  # free the copy now
                worker = self._worker
                if worker is not None and worker.share is not None:
                    self._busy_seconds += worker.run_seconds - run_before  # time it could run
                else:
                    self._busy_seconds += time.monotonic() - started
            plot_time = report.timings.get("plots", 0.0)
            spent = self._busy_seconds - busy_before
            plot_share = plot_time / (plot_time + report.timings["total"]) if plot_time else 0.0
            self._measure_cost = spent * (1 - plot_share)
            if plot_time > 0:  # the plots' part of the time this measurement was counted for
                self._plot_cost = spent * plot_share
                self._plot_seconds += self._plot_cost
            with self._lock:
                if self._abandoned:
                    break
                # due steps before this one that were skipped (the metric at this step)
                report.config["skipped_steps"] = sum(1 for s in self._skipped if s < item.step)
                self._keep_report(item.step, report)
                if images and (self._last_images is None or item.step >= self._last_images[0]):
                    self._last_images = (item.step, images)
            if images and self._log_queue.qsize() >= LOG_BACKLOG_WITH_PLOTS:
                images = {}  # the sinks are behind: keep the working files small
                if not self._warned_slow_sinks:
                    self._warned_slow_sinks = True
                    warn(
                        f"the clusterability sinks are slower than the measurements "
                        f"({self._log_queue.qsize()} reports wait for them): the plots of "
                        f"steps measured while {LOG_BACKLOG_WITH_PLOTS} or more reports wait are "
                        "not written (their metrics and report.json are)."
                    )
            artifacts = self._step_artifacts(report, images)
            self._log_queue.put(("report", report, artifacts))
            del report, images, artifacts
            _trim_heap()
        if not self._abandoned:
            self._send_summary()
            self._log_queue.put(_STOP)
        if self._worker is not None:
            self._worker.stop()

    def _keep_report(self, step: int, report: ClusterabilityReport) -> None:
        """Append ``report`` to the reports file (with the lock held)."""
        if self._report_file is None:
            self._report_file = tempfile.TemporaryFile(prefix="cluster-tracking-reports-")
            weakref.finalize(self, self._report_file.close)  # the file goes with the tracker
        data = zlib.compress(report.to_json().encode("utf-8"))
        offset = self._report_file.seek(0, os.SEEK_END)
        self._report_file.write(data)
        self._reports[step] = (offset, len(data))

    def _spent(self) -> float:
        """Seconds spent measuring so far: of every measurement, the time the throttled child
        was allowed to run, or else its wall time (in the worker process or this thread, from
        request to answer); and the logging thread's CPU time."""
        return self._busy_seconds + self._log_cpu

    def _pace(self) -> None:
        """Wait until the CPU budget allows the next measurement (``max_overhead``)."""
        if self.max_overhead is None or self._budget_start is None:
            return
        rate = self.max_overhead  # seconds measuring per wall-clock second
        while not self._closing.is_set():
            allowed = rate * (time.monotonic() - self._budget_start)
            over = self._spent() - allowed
            if over <= 0:
                return
            self._closing.wait(over / rate)

    def _measure(self, snapshot: _Snapshot) -> tuple[ClusterabilityReport, dict[str, bytes]]:
        """Measure one snapshot (measuring thread): report and PNG plots by name."""
        graph, graph_seconds = snapshot.graph, snapshot.graph_seconds
        module: nn.Module | None = None
        if graph is None:
            if snapshot.module is not None and snapshot.state is not None:
                snapshot.module.load_state_dict(snapshot.state)
            source = snapshot.module if snapshot.module is not None else snapshot.state
            assert source is not None
            started = time.perf_counter()
            graph = weight_graph(source, **self._graph_options)  # no tracing: see _snapshot
            graph_seconds = time.perf_counter() - started
            if self.shuffle == "random_init" and isinstance(source, nn.Module):
                module = source
        options = {
            "k": self.k,
            "shuffles": self.shuffles,
            "shuffle": self.shuffle,
            "seed": self.seed_for(snapshot.step),
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

    def _run(self, name: str, *args: Any) -> Any:
        """Call a worker function in the worker process (``worker="process"``), else here."""
        # random_init's null networks need the model itself, so it is measured here anyway.
        if self.worker == "process" and self.shuffle != "random_init" and not self._worker_failed:
            try:
                if self._worker is None:
                    started = time.monotonic()
                    self._worker = self._start_worker()
                    if self._worker.share is None:  # its start is not counted
                        self._busy_seconds -= time.monotonic() - started
                if self._abandoned:
                    raise _Abandoned("close() gave up")
                return self._worker.call(name, *args)
            except WorkerError:
                raise  # the function failed in the worker: a measurement error, not a dead worker
            except Exception as error:
                if self._abandoned:
                    raise _Abandoned("close() gave up") from error  # the worker was ended
                self._worker_failed = True
                if self._worker is not None:
                    self._worker.stop()
                self._worker = None
                warn(
                    f"the clusterability worker process failed ({describe(error)}); measuring "
                    "in a background thread of the training process from now on, which slows a "
                    "Python-bound training loop while a measurement runs."
                )
        return run_job(name, *args)

    def _start_worker(self) -> WorkerProcess:
        """The measuring child: throttled to :meth:`_share` at normal priority where the
        platform allows (Linux), else at nice 19 and paced by wall time (:meth:`_pace`)."""
        env = {PRELOAD_VARIABLE: PLOT_MODULES if self.plots else ""}
        share = self._share()
        if share is not None and can_throttle() and not self._closing.is_set():
            # its start takes a share of the wall time too: importing the plotting libraries
            # (about half a second of CPU, 5 s at a 9% share) waits for the first plot, so the
            # first metrics come sooner
            env[PRELOAD_VARIABLE] = ""
            # one thread: it runs on one core at a time, so its bursts displace one training
            # thread at most
            env.update({name: "1" for name in _THREAD_VARIABLES})
            return WorkerProcess(die_with_thread=True, env=env, nice=False, share=share, wait=False)
        return WorkerProcess(die_with_thread=True, env=env, nice=share is not None)

    def _share(self) -> float | None:
        """The share of wall time the measuring child may run: ``m / (1 + m)`` for
        ``max_overhead=m``. While it runs, a loop that keeps every core busy can stall entirely
        (its threads wait for the one the child displaced), so a loop that got ``1 - share`` of
        the wall time takes at most ``1 / (1 - share) = 1 + m`` times as long."""
        if self.max_overhead is None:
            return None
        return self.max_overhead / (1.0 + self.max_overhead)

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
            reports = self.reports
            with self._lock:
                skipped, failed = sorted(self._skipped), sorted(self._failed)
                last_images = dict(self._last_images[1]) if self._last_images else {}
            files, plot_error = self._run(
                RENDER_SUMMARY, reports, last_images, self.params, skipped, failed, self.plots
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

    # ------------------------------------------------------------------------ logging thread

    def _log_loop(self) -> None:
        while True:
            self._log_cpu = time.thread_time()  # counted in the budget (see _pace)
            item = self._log_queue.get()
            if item is _STOP:
                return
            kind = item[0]
            if kind == "params":
                self._call_sinks("log_params", item[1])
            elif kind == "report":
                _, report, artifacts = item
                self._call_sinks(
                    "log_report", report, report.step, artifacts, where=f" at step {report.step}"
                )
                shutil.rmtree(next(iter(artifacts.values())).parent, ignore_errors=True)
                with self._idle:
                    self._finish_one()
            elif kind == "summary":
                self._call_sinks("log_summary", item[1], item[2], where=" (the summary)")

    def _call_sinks(self, method: str, *args: Any, where: str = "") -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as error:
                warn(
                    f"{sink!r}.{method}{where} failed: {describe(error)}. Training goes on; "
                    "the report stays in the tracker's other sinks."
                )

    # -------------------------------------------------------------------------------- close

    def _close(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if self._measure_thread is not None and self._log_thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify_all()
            self._closing.set()  # measure what is left at full speed
            worker = self._worker
            if worker is not None:
                worker.unthrottle()
            self._measure_thread.join(remaining())
            if self._measure_thread.is_alive():
                self._give_up(timeout)
            self._log_thread.join(remaining())
            if self._log_thread.is_alive():
                warn(
                    f"gave up waiting for the clusterability tracker's sinks after {timeout} s "
                    "(a sink is still busy with a report); the sinks were not closed."
                )
                return
        for sink in self.sinks:
            try:
                if "timeout" in inspect.signature(sink.close).parameters:
                    sink.close(timeout=remaining())  # type: ignore[call-arg]
                else:
                    sink.close()
            except Exception as error:
                warn(f"closing {sink!r} failed: {describe(error)}.")
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._template = None
        self._topology = None

    def _give_up(self, timeout: float | None) -> None:
        """``close(timeout)`` ran out while measuring: drop what waits, end the worker process
        (no orphan is left), and let the logging thread deliver what was measured."""
        with self._lock:
            self._abandoned = True
            dropped = sorted([snapshot.step for snapshot in self._pending])
            self._pending.clear()
            unmeasured = self._in_flight - self._log_queue.qsize()
        worker = self._worker
        if worker is not None:
            worker.kill()
        self._log_queue.put(_STOP)  # after the reports already measured
        warn(
            f"gave up waiting for the clusterability tracker after {timeout} s: "
            f"{max(unmeasured, len(dropped))} due step(s) were not measured"
            f"{' (' + ', '.join(map(str, dropped)) + ' waiting)' if dropped else ''}; the worker "
            "process was ended. What was measured goes to the sinks."
        )


def _check_interval(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer or None, got {value!r}.")
    return int(value)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel/DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _cpu_copy(value: Any) -> Any:
    """A detached CPU copy of a tensor (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


def _structure_copy(module: nn.Module) -> nn.Module:
    """A CPU deep copy of ``module`` without copying its tensors on their device first.

    The memo of :func:`copy.deepcopy` is pre-filled with CPU copies of every parameter and buffer,
    so a model on a GPU is never duplicated on the GPU; the original is not touched.
    """
    memo: dict[int, Any] = {}
    for parameter in module.parameters():
        memo[id(parameter)] = nn.Parameter(_cpu_copy(parameter), requires_grad=False)
    for buffer in module.buffers():
        memo[id(buffer)] = _cpu_copy(buffer)
    return copy.deepcopy(module, memo)


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


__all__ = [
    "SKIPPED_STEPS_METRIC",
    "STEP_ARTIFACTS",
    "SUMMARY_ARTIFACTS",
    "ClusterTrackingWarning",
    "ClusterabilityTracker",
    "OnBacklog",
]
