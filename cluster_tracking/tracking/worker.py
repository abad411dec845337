"""Where a tracker's measurements run: its measuring child process, or a thread.

With ``worker="process"`` (the default) every job of the measuring thread (a measurement, the
summary) runs in a child Python process (:class:`~cluster_tracking.parallel.child.WorkerProcess`)
so that it never competes with training for the GIL. On Linux the child runs at normal priority
with one BLAS thread and is throttled to ``m / (1 + m)`` of the wall time for ``max_overhead=m``
(its one-off start runs at full speed); elsewhere it runs at nice 19 and the measuring thread
paces it by wall time. If the child cannot start or dies, the tracker warns and runs the jobs in
its measuring thread from then on.
"""

from __future__ import annotations

from typing import Any

from cluster_tracking.errors import describe, warn
from cluster_tracking.parallel.child import PRELOAD_VARIABLE, WorkerError, WorkerProcess, run_job
from cluster_tracking.parallel.throttle import can_throttle
from cluster_tracking.tracking.jobs import MEASURING_MODULES, PLOT_MODULES
from cluster_tracking.tracking.state import _Abandoned, _TrackerState

#: Thread-count variables of the BLAS/OpenMP libraries, set to 1 in the throttled child.
_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_OPERATIONS",
    "NUMEXPR_NUM_THREADS",
)


class _WorkerCalls(_TrackerState):
    """The measuring thread's calls into the child process (or, failing that, itself)."""

    def _uses_worker(self) -> bool:
        """Whether the jobs go to the worker process (else they run in the measuring thread)."""
        # random_init's null networks need the model itself, so it is measured here anyway.
        return (
            self.worker == "process" and self.shuffle != "random_init" and not self._worker_failed
        )

    def _ensure_worker(self) -> WorkerProcess | None:
        """The worker process, started and ready (measuring thread); ``None`` when the jobs run
        here, also when it could not start (after a warning).

        Its start, a one-off at full speed, is repaid over time (``_start_debt``)."""
        if not self._uses_worker():
            return None
        if self._worker is None:
            try:
                self._worker = self._start_worker()
                self._worker.wait_ready()
                if self._worker.share is not None:  # repaid over time (see _start_debt)
                    self._start_seconds = self._worker.start_run_seconds
            except Exception as error:
                self._worker_broke(error)
                return None
        return self._worker

    def _run(self, name: str, *args: Any) -> Any:
        """Call a worker function in the worker process (``worker="process"``), else here."""
        worker = self._ensure_worker()
        if worker is not None:
            try:
                if self._abandoned:
                    raise _Abandoned("close() gave up")
                return worker.call(name, *args)
            except WorkerError:
                raise  # the function failed in the worker: a measurement error, not a dead worker
            except Exception as error:
                self._worker_broke(error)
        return run_job(name, *args)

    def _worker_broke(self, error: Exception) -> None:
        """The worker process could not start or died: measure in this thread from now on
        (raises :class:`_Abandoned` when ``close(timeout)`` ended it)."""
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

    def _start_worker(self) -> WorkerProcess:
        """The measuring child: throttled to :meth:`_share` at normal priority where the
        platform allows (Linux), else at nice 19 and paced by wall time (``_pace``).

        A throttled child starts at full speed, and the budget repays its start over a minute
        (``_start_debt``): its start (imports of numpy, scipy and the measuring core, about 0.3 s
        of CPU, once per tracker) took several seconds at its share and then held back the next
        measurements while the budget paid for it, so the first metrics came 12% into a
        one-minute run (``benchmarks/bench_load.py``). It imports the measuring job too, so
        that the first measurement is paced like the others; the plotting libraries (about
        half a second of CPU) wait for the first plot."""
        env = {PRELOAD_VARIABLE: PLOT_MODULES if self.plots else ""}
        share = self._share()
        if share is not None and can_throttle() and not self._closing.is_set():
            env[PRELOAD_VARIABLE] = MEASURING_MODULES
            # one thread: it runs on one core at a time, so its bursts displace one training
            # thread at most
            env.update({name: "1" for name in _THREAD_VARIABLES})
            return WorkerProcess(
                die_with_thread=True,
                env=env,
                nice=False,
                share=share,
                wait=False,
                throttle_start=False,
            )
        return WorkerProcess(die_with_thread=True, env=env, nice=share is not None)

    def _share(self) -> float | None:
        """The share of wall time the measuring child may run: ``m / (1 + m)`` for
        ``max_overhead=m``. While it runs, a loop that keeps every core busy can stall entirely
        (its threads wait for the one the child displaced), so a loop that got ``1 - share`` of
        the wall time takes at most ``1 / (1 - share) = 1 + m`` times as long."""
        if self.max_overhead is None:
            return None
        return self.max_overhead / (1.0 + self.max_overhead)
