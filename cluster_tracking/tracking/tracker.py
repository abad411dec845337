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

The tracker is assembled from one module per side: its settings
(:mod:`~cluster_tracking.tracking.settings`), the snapshots of the training thread
(:mod:`~cluster_tracking.tracking.snapshots`) and the backlog policy
(:mod:`~cluster_tracking.tracking.backlog`), the measuring thread
(:mod:`~cluster_tracking.tracking.measuring`) and its child process
(:mod:`~cluster_tracking.tracking.worker`), the fan-out to the sinks
(:mod:`~cluster_tracking.tracking.fanout`), and the reports kept on disk
(:mod:`~cluster_tracking.tracking.report_store`).

Guarantees:

* **Paced to a budget.** On Linux the worker runs at normal priority with one BLAS thread and is
  throttled (:class:`~cluster_tracking.parallel.throttle.Throttle`) to run at most ``m / (1 + m)``
  of the wall time for ``max_overhead=m`` (default 0.1), in 5 ms bursts, which bounds a busy loop's
  slowdown to ``1 + m``; elsewhere it runs at nice 19 and the wall time of its measurements is
  paced. The budget also counts the CPU time of the tracker's threads and, repaid over a minute,
  the child's one-off start at full speed; the first measurement of a due step under a budget
  logs metrics before any plots are drawn. ``close()`` measures what is left at full speed.
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

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from torch import nn

from cluster_tracking.errors import describe, warn
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.tracking.closing import _Closing
from cluster_tracking.tracking.requests import _Requests
from cluster_tracking.tracking.settings import OnBacklog, TrackerSettings, check_sinks, step_seed
from cluster_tracking.tracking.sinks import Sink


class ClusterabilityTracker(_Requests, _Closing):
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
            in :attr:`reports`.
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
        max_overhead: how much slower measuring may make training, as a fraction (0.1: at most
            1.1 times the wall time): since the first due step, the time spent measuring (of
            the measurements, the time the throttled worker could run, else their wall time;
            the CPU time of the tracker's threads, its sinks' sender threads included; the
            worker's one-off start, about 0.3 s of CPU at full speed so that the first metrics
            come seconds into training, repaid over a minute) stays below 90% of ``m / (1 + m)``
            of the time elapsed for ``max_overhead=m`` (a margin for what cannot be counted,
            :data:`~cluster_tracking.tracking.measuring.PACE_MARGIN`); a measurement starts only
            when that budget allows, and a newer due step replaces the waiting one meanwhile.
            What runs outside this process (a tracking server on the same machine) is not
            counted (``benchmarks/bench_load.py``).
            ``None``: no limit (measure back to back, which can slow such a loop 2-4x).
            ``close()`` measures what is left without the limit.
        plots: draw the PNG plots and the HTML report (``False``: JSON only, faster). The
            plots can cost several times the measurement itself, so while measuring cannot keep
            up (due steps were skipped since the previous measurement) a measurement draws them
            only while the plots so far, with these, take at most a quarter of the time spent
            measuring
            (:data:`~cluster_tracking.tracking.measuring.PLOTS_SHARE_WHILE_BEHIND`); the
            metrics and ``report.json`` of every measured step are logged all the same, and the
            last measurement (at ``close()``) has its plots.
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
        sinks = check_sinks(sinks)
        settings = TrackerSettings.check(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            k=k,
            shuffles=shuffles,
            shuffle=shuffle,
            seed=seed,
            n_jobs=n_jobs,
            n_init=n_init,
            norm=norm,
            preset=preset,
            layers=layers,
            init=init,
            backend=backend,
            on_backlog=on_backlog,
            max_pending=max_pending,
            max_overhead=max_overhead,
            plots=plots,
            measure_final=measure_final,
            worker=worker,
            rank=rank,
            example_inputs=example_inputs,
            include_embeddings=include_embeddings,
        )
        self._init_state(sinks, settings)

    # ----------------------------------------------------------------------------- public API

    @property
    def params(self) -> dict[str, Any]:
        """The settings logged once to every sink, under ``clusterability.*`` names."""
        return self._params()

    @property
    def reports(self) -> list[ClusterabilityReport]:
        """The reports measured so far, by step."""
        return self._reports.reports()

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
        return step_seed(self.seed, step)

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


__all__ = ["ClusterabilityTracker", "OnBacklog"]
