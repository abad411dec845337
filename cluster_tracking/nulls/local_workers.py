"""The shuffle nulls on this process and a pool of worker processes of this machine.

The null networks are cut into tasks of :data:`NULLS_PER_TASK` in a queue. The workers take tasks
from its front (each fed by a thread of this process that waits on its pipe) while this process
takes them from its back, so this process works while the workers start (they import numpy and
scipy only, not torch) and none waits at the end for more than a task. Worker processes stay alive
between calls (:func:`~cluster_tracking.parallel.pool.worker_pool`). A worker that dies (out of
memory, killed) loses nothing: its task goes back in the queue, with a warning.

The graph's weights go to the workers once per call, as files they map
(:class:`~cluster_tracking.parallel.shared_arrays.SharedArrays`); a task carries the blocks'
topology and the null indices only.
"""

from __future__ import annotations

import collections
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from cluster_tracking.config import MeasureConfig
from cluster_tracking.graph.types import EdgeBlock, WeightGraph
from cluster_tracking.nulls.networks import shuffled_ncuts
from cluster_tracking.parallel.child import WorkerProcess
from cluster_tracking.parallel.pool import WorkerPool, worker_pool
from cluster_tracking.parallel.shared_arrays import SharedArrays, mapped_arrays

#: Shuffled null networks per task sent to a worker process: small enough that no process waits
#: long for the last task; each task costs a round trip (the weights themselves are mapped from
#: a file, not sent).
NULLS_PER_TASK = 2
#: The environment of the shuffle nulls' worker processes: one BLAS/OpenMP thread each (their
#: products are thin; more threads oversubscribe the cores the other workers use), and glibc's
#: malloc told to keep freed memory for reuse: by default it maps every array over 128 KiB
#: afresh and returns it on free, and the page faults of the k-means and Krylov temporaries
#: (a few MiB, allocated thousands of times) cost a quarter of a null network's time.
NULL_WORKER_ENV = {
    **{
        name: "1"
        for name in (
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
            "BLIS_NUM_THREADS",
        )
    },
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
}
#: The job a worker runs: :func:`shuffled_task`, by dotted name.
SHUFFLED_TASK = "cluster_tracking.nulls.local_workers:shuffled_task"

_NO_WEIGHT = np.empty(0)


def null_worker_pool(config: MeasureConfig) -> WorkerPool:
    """The pool of ``config.jobs - 1`` null workers, started if there is none (without waiting
    for them); the caller must :meth:`~cluster_tracking.parallel.pool.WorkerPool.release` it."""
    return worker_pool(config.jobs - 1, NULL_WORKER_ENV)


def shuffled_ncuts_with_workers(
    graph: WeightGraph,
    config: MeasureConfig,
    ks: list[int],
    root: np.random.SeedSequence,
    progress: Callable[[int, int], None] | None,
) -> np.ndarray:
    """n-cuts of ``config.shuffles`` shuffled null networks at every k, ``[n, len(ks)]`` in
    null-index order, measured on this process and ``config.jobs - 1`` worker processes."""
    n = config.shuffles
    size = max(1, min(NULLS_PER_TASK, math.ceil(n / (4 * config.jobs))))
    tasks = [list(range(start, min(n, start + size))) for start in range(0, n, size)]
    args = (
        graph.blocks,
        graph.n_nodes,
        graph.node_layer,
        config.shuffle,
        ks,
        root,
        config.n_init,
        config.preset,
    )
    pool = null_worker_pool(config)
    shared = SharedArrays([block.weight for block in graph.blocks])
    skeleton = [replace(block, weight=_NO_WEIGHT) for block in graph.blocks]
    queue = _TaskQueue(tasks, (shared.paths, skeleton, *args[1:]))
    try:
        queue.run(pool, args, lambda done: progress(done, n) if progress is not None else None)
    finally:
        queue.clear()  # an interrupted call leaves no work queued
        pool.release()
        shared.close()
    for reason in queue.lost:
        warnings.warn(
            f"a worker process measuring null networks stopped ({reason}); its null networks "
            "were measured in this process instead.",
            RuntimeWarning,
            stacklevel=4,
        )
    if queue.failures:
        raise RuntimeError(
            f"measuring null networks in a worker process failed: {queue.failures[0]}"
        )
    return np.stack([row for position in range(len(tasks)) for row in queue.rows[position]])


class _TaskQueue:
    """The tasks of one call: the workers' feeder threads take them from the front, this
    process from the back; the rows come back by task position."""

    def __init__(self, tasks: list[list[int]], worker_args: tuple[Any, ...]) -> None:
        self.tasks = tasks
        self.worker_args = worker_args  # the arguments of shuffled_task after the indices
        self.queue = collections.deque(range(len(tasks)))
        self.rows: dict[int, list[np.ndarray]] = {}
        self.failures: list[str] = []  # errors raised in a worker
        self.lost: list[str] = []  # why a worker stopped
        self.changed = threading.Condition()

    def clear(self) -> None:
        with self.changed:
            self.queue.clear()

    def serve(self, process: WorkerProcess, busy: threading.Lock) -> None:
        """Feed one worker from the front of the queue until it is empty (a feeder thread)."""
        with busy:  # (a call interrupted in this process may still be running there)
            while True:
                with self.changed:
                    if not self.queue or self.failures:
                        return
                    position = self.queue.popleft()
                try:
                    row = process.call(SHUFFLED_TASK, self.tasks[position], *self.worker_args)
                except (EOFError, OSError) as error:  # the worker is gone: its task goes back
                    with self.changed:
                        self.lost.append(str(error))
                        self.queue.appendleft(position)
                        self.changed.notify_all()
                    return
                except Exception as error:  # raised again in the calling thread
                    with self.changed:
                        self.failures.append(str(error))
                        self.changed.notify_all()
                    return
                with self.changed:
                    self.rows[position] = row
                    self.changed.notify_all()

    def run(self, pool: WorkerPool, args: tuple[Any, ...], progress: Callable[[int], None]) -> None:
        """Start a feeder per worker and measure tasks from the back of the queue here, until
        every task has its rows, a worker failed, or no feeder is left (this process then
        measures what remains)."""
        feeders = [
            threading.Thread(
                target=self.serve, args=member, daemon=True, name="cluster-tracking-nulls"
            )
            for member in pool.members()
        ]
        reported = 0
        for feeder in feeders:
            feeder.start()
        with threadpool_limits(1):
            while True:
                with self.changed:
                    if self.failures:
                        break
                    if self.queue:
                        position = self.queue.pop()
                    elif len(self.rows) == len(self.tasks) or not any(
                        feeder.is_alive() for feeder in feeders
                    ):
                        break
                    else:  # the workers have the last tasks
                        self.changed.wait(timeout=0.5)
                        position = None
                if position is not None:
                    self.rows[position] = shuffled_ncuts(self.tasks[position], *args)
                done = sum(len(self.tasks[position]) for position in list(self.rows))
                if done > reported:
                    progress(done)
                reported = done


def shuffled_task(
    indices: list[int],
    paths: list[str],
    skeleton: Sequence[EdgeBlock],
    n_nodes: int,
    node_layer: np.ndarray,
    method: str,
    ks: list[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str = "default",
) -> list[np.ndarray]:
    """In a worker process: :func:`~cluster_tracking.nulls.networks.shuffled_ncuts` of the null
    networks ``indices``, on the weights that :class:`SharedArrays` wrote to ``paths`` (the
    blocks of ``skeleton`` carry the topology)."""
    blocks = [
        replace(block, weight=weight)
        for block, weight in zip(skeleton, mapped_arrays(paths), strict=True)
    ]
    return shuffled_ncuts(indices, blocks, n_nodes, node_layer, method, ks, root, n_init, preset)
