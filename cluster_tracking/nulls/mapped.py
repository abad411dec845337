"""Shuffled null networks on Dask workers that map the weights from the graph's safetensors file.

Only the file's path and fingerprint, the blocks' topology (node indices) and each task's null
indices and seeds travel; no weights go through the scheduler. A worker keeps the blocks it
mapped for its next tasks and frees them when the call ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.types import EdgeBlock, WeightGraph
from cluster_tracking.nulls.networks import shuffled_ncuts

#: Null networks per Dask task, at most: few enough that no worker waits long for the last one.
MAPPED_NULLS_PER_TASK = 2

_NO_WEIGHT = np.empty(0, dtype=np.float32)


def mapped_null_ncuts(
    graph: WeightGraph,
    *,
    method: str,
    n: int,
    ks: Sequence[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str,
    scheduler: Any,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """n-cuts of ``n`` shuffled null networks of a graph read from a safetensors file, each a
    Dask task that maps the weights from the same path on its worker: ``[n, len(ks)]``.

    The numbers are the local path's (:func:`~cluster_tracking.nulls.networks.shuffled_ncuts`
    on the same float32 blocks with the same streams). ``scheduler``: an address or a
    ``distributed.Client`` (``None``: the remote graph's own, else the current client).

    Raises:
        ConfigError: no Dask, no scheduler, or a graph that does not know its file.
        GraphError: a worker's memory limit is below the estimated peak of a task.
    """
    from cluster_tracking.graph.mapped import forget_mapped
    from cluster_tracking.parallel.dask import dask_client, running_workers

    source = getattr(graph, "source", None)
    if source is None:
        raise ConfigError(
            "this graph does not come from a safetensors file (safetensors_graph), so Dask "
            "workers cannot map its weights from a shared path."
        )
    client, owned = dask_client(_scheduler_of(graph, scheduler))
    try:
        workers = running_workers(client)
        _check_null_tasks_fit(graph, workers, max(ks))
        skeleton = [replace(block, weight=_NO_WEIGHT) for block in graph.blocks]
        [shared] = client.scatter(
            [(source, skeleton, graph.n_nodes, graph.node_layer)], broadcast=True
        )
        size = max(1, min(MAPPED_NULLS_PER_TASK, math.ceil(n / (4 * len(workers)))))
        chunks = [list(range(start, min(n, start + size))) for start in range(0, n, size)]
        futures = [
            client.submit(
                _mapped_null_task, shared, chunk, method, list(ks), root, n_init, preset, pure=False
            )
            for chunk in chunks
        ]
        try:
            rows = _gather_in_order(client, futures, chunks, n, progress)
        finally:
            client.cancel(futures)
            # the workers free the blocks they mapped (a worker that is gone has nothing to free)
            client.run(forget_mapped, source.key, on_error="ignore")
        return np.stack([row for chunk_rows in rows for row in chunk_rows])
    finally:
        if owned:
            client.close()


def _scheduler_of(graph: WeightGraph, scheduler: Any) -> Any:
    """The scheduler the null tasks go to: ``scheduler``, else the remote graph's client, else
    the current Dask client."""
    remote = getattr(graph, "remote", None)
    if scheduler is None and remote is not None:
        scheduler = remote.client
    if scheduler is None:
        try:
            from distributed import get_client

            scheduler = get_client()
        except (ImportError, ValueError) as error:
            raise ConfigError(
                "null networks on Dask need a scheduler: pass scheduler='tcp://HOST:PORT' (or "
                "run inside a dask.distributed Client)."
            ) from error
    return scheduler


def _check_null_tasks_fit(graph: WeightGraph, workers: dict[str, Any], k: int) -> None:
    """Refuse, before any task is sent, workers whose memory limit is below a null task's peak
    (the whole graph, a shuffled copy and the solver per thread, beside the blocks the worker
    keeps for the observed graph)."""
    from cluster_tracking.resources.estimate import check_workers_fit, estimate_null_task

    source = graph.source  # type: ignore[attr-defined]  # checked by the caller
    remote = getattr(graph, "remote", None)
    edges = sum(int(np.prod(tensor.shape, dtype=np.int64)) for tensor in source.tensors)
    held = remote.held if remote is not None and not remote.closed else {}
    check_workers_fit(
        {
            worker: (
                estimate_null_task(
                    graph.n_nodes, edges, k=k, threads=int(info.get("nthreads") or 1)
                )
                + held.get(worker, 0),  # the blocks it keeps for the observed graph
                int(info.get("memory_limit") or 0),
            )
            for worker, info in workers.items()
        },
        source.path,
        task="null networks (the whole graph, a shuffled copy and the solver per thread)",
    )


def _gather_in_order(
    client: Any,
    futures: list[Any],
    chunks: list[list[int]],
    n: int,
    progress: Callable[[int, int], None] | None,
) -> list[list[np.ndarray]]:
    """The tasks' rows in task order, gathered as they complete (with progress)."""
    from distributed import as_completed

    position = {future.key: i for i, future in enumerate(futures)}
    rows: dict[int, list[np.ndarray]] = {}
    done = 0
    with client.as_current():  # (as_completed asks for the current client)
        for future in as_completed(futures):
            rows[position[future.key]] = future.result()
            done += len(chunks[position[future.key]])
            if progress is not None:
                progress(done, n)
    return [rows[i] for i in range(len(chunks))]


def _mapped_null_task(
    shared: tuple[Any, list[EdgeBlock], int, np.ndarray],
    indices: list[int],
    method: str,
    ks: list[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str,
) -> list[np.ndarray]:
    """On a Dask worker: :func:`~cluster_tracking.nulls.networks.shuffled_ncuts` of the null
    networks ``indices`` on the blocks mapped from the file
    (:func:`~cluster_tracking.graph.mapped.mapped_blocks`)."""
    from threadpoolctl import threadpool_limits

    from cluster_tracking.graph.mapped import mapped_blocks

    source, skeleton, n_nodes, node_layer = shared
    blocks = mapped_blocks(source, skeleton)
    with threadpool_limits(1):
        return shuffled_ncuts(
            indices, blocks, n_nodes, node_layer, method, ks, root, n_init, preset
        )
