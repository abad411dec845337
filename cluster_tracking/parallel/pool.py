"""Worker processes kept alive between calls: a pool of :class:`WorkerProcess` children per size.

Starting a child costs about a third of a second (its imports); a training run that measures at
every checkpoint would pay it each time. So a pool outlives the call that started it and stops
when no call has used it for :data:`POOL_IDLE_SECONDS`, or when this process exits.

They are :class:`~cluster_tracking.parallel.child.WorkerProcess` children fed through their own
pipes, not a ``concurrent.futures`` pool: loky and ``multiprocessing`` start resource-tracker
processes beside the workers, which compete for the cores with the first jobs.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Mapping

from cluster_tracking.parallel.child import WorkerProcess

#: Seconds a pool waits without a call before its workers stop.
POOL_IDLE_SECONDS = 300


class WorkerPool:
    """``count`` worker processes, each with a lock held while it serves a call; they exit after
    :data:`POOL_IDLE_SECONDS` without a call, or with this process.

    Get one with :func:`worker_pool` and hand it back with :meth:`release`.
    """

    def __init__(self, count: int, env: Mapping[str, str]) -> None:
        self.processes = [WorkerProcess(nice=False, env=env, wait=False) for _ in range(count)]
        self.locks = [threading.Lock() for _ in range(count)]
        self.users = 0
        self.idle: threading.Timer | None = None
        self.owner = os.getpid()  # a forked child inherits the pipes, but must not use them

    def usable(self) -> bool:
        """Whether this process owns the workers and every one of them runs."""
        return self.owner == os.getpid() and all(process.running() for process in self.processes)

    def members(self) -> list[tuple[WorkerProcess, threading.Lock]]:
        """Each worker with its lock."""
        return list(zip(self.processes, self.locks, strict=True))

    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [process.pid for process in self.processes]

    def release(self) -> None:
        """One call is done with the workers; stop them if no call uses them for a while."""
        with _POOLS_LOCK:
            self.users -= 1
            if self.users == 0:
                self.idle = threading.Timer(POOL_IDLE_SECONDS, self._stop_if_idle)
                self.idle.daemon = True
                self.idle.start()

    def _stop_if_idle(self) -> None:
        with _POOLS_LOCK:
            if self.users or self.idle is None:
                return
            self.idle = None
            for key, pool in list(_POOLS.items()):
                if pool is self:
                    del _POOLS[key]
        self.stop()

    def stop(self) -> None:
        """Stop every worker (killed after a second)."""
        for process in self.processes:
            process.stop(timeout=1.0)


#: The live pools, by size and environment.
_POOLS: dict[tuple[int, frozenset[tuple[str, str]]], WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool_key(count: int, env: Mapping[str, str]) -> tuple[int, frozenset[tuple[str, str]]]:
    """The key of the pool of ``count`` workers with environment ``env``."""
    return count, frozenset(env.items())


def worker_pool(count: int, env: Mapping[str, str]) -> WorkerPool:
    """The pool of ``count`` workers with environment ``env`` (on top of this process's),
    started (without waiting for them) if there is none or one of its workers has died; the
    caller must :meth:`~WorkerPool.release` it."""
    key = _pool_key(count, env)
    stale = None
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and not pool.usable():
            stale, pool = pool, None
            if stale.owner != os.getpid():
                stale = None  # a forked child's copy: the workers are its parent's
        if pool is None:
            pool = _POOLS[key] = WorkerPool(count, env)
        if pool.idle is not None:
            pool.idle.cancel()
            pool.idle = None
        pool.users += 1
    if stale is not None:
        stale.stop()
    return pool


def live_pool(count: int, env: Mapping[str, str]) -> WorkerPool | None:
    """The pool of ``count`` workers with environment ``env`` if one is kept, without taking it."""
    with _POOLS_LOCK:
        return _POOLS.get(_pool_key(count, env))


@atexit.register
def _stop_pools() -> None:
    with _POOLS_LOCK:
        pools = [pool for pool in _POOLS.values() if pool.owner == os.getpid()]
        _POOLS.clear()
    for pool in pools:
        pool.stop()
