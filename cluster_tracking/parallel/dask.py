"""Dask helpers shared by the graph's remote weight blocks and the null models: a client on a
scheduler, its running workers, and actors that start in bounded time.

``distributed`` is imported on first use, so that this module costs nothing without Dask.
"""

from __future__ import annotations

from typing import Any

from cluster_tracking.errors import ConfigError, GraphError


def dask_client(scheduler: Any) -> tuple[Any, bool]:
    """``(client, owned)``: a ``distributed.Client`` on ``scheduler`` (an address: a new client,
    owned by the caller, who closes it) or ``scheduler`` itself when it is a client."""
    try:
        from distributed import Client
    except ImportError as error:
        raise ConfigError(
            "a Dask scheduler needs Dask's distributed package: pip install "
            "'cluster-tracking[dask]'."
        ) from error
    if isinstance(scheduler, Client):
        return scheduler, False
    if not isinstance(scheduler, str):
        raise ConfigError(
            f"scheduler must be a Dask scheduler's address (tcp://HOST:PORT) or a "
            f"distributed.Client, got {scheduler!r}."
        )
    try:
        return Client(scheduler, timeout="5s", set_as_default=False), True
    except OSError as error:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {scheduler!r} ({error}); start one with "
            "`dask scheduler` or pass the right address."
        ) from error


def running_workers(client: Any) -> dict[str, Any]:
    """The scheduler's workers that run tasks (``{address: info}``): a worker paused for memory
    runs none, so work sent to it would wait until it frees memory.

    Raises:
        ConfigError: the cluster has no workers.
        GraphError: every worker is paused.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        raise ConfigError(
            f"the Dask scheduler {client.scheduler.address} has no workers; start some with "
            "`dask worker`."
        )
    running = {address: info for address, info in workers.items() if info.get("status") != "paused"}
    if not running:
        raise GraphError(
            f"every worker of the Dask scheduler {client.scheduler.address} is paused (above "
            "its memory's pause threshold), so none would run this; give them more memory "
            "(dask worker --memory-limit) or free what they hold."
        )
    return running


#: Seconds a Dask worker may take to start holding blocks (an actor starts at once on a
#: worker that runs tasks; one that does not is paused, or busy with other work).
ACTOR_START_TIMEOUT = 60.0


def started_actor(future: Any, worker: str, client: Any) -> Any:
    """The actor ``future`` makes on ``worker``, or a clear error when the worker does not
    start it (a worker paused for memory never runs a task, and the call would wait forever)."""
    from distributed import TimeoutError as DaskTimeoutError

    try:
        return future.result(timeout=ACTOR_START_TIMEOUT)
    except (TimeoutError, DaskTimeoutError):
        status = client.scheduler_info(n_workers=-1)["workers"].get(worker, {}).get("status")
        raise GraphError(
            f"Dask worker {worker} did not start holding its weight blocks within "
            f"{ACTOR_START_TIMEOUT:.0f} s (its status: {status or 'gone'}); a paused worker is "
            "above its memory's pause threshold: give it more memory (dask worker "
            "--memory-limit) or free what it holds."
        ) from None
