"""A safetensors chain graph whose weight blocks stay on the workers of a Dask cluster
(``safetensors_graph(..., scheduler=...)``).

Only the topology is built here, from the header's shapes; each worker maps a consecutive run of
blocks of about the same size (:func:`_assign_blocks`) and keeps it
(:class:`~cluster_tracking.graph.remote.RemoteBlocks`), once the memory of this process and of
every worker has been checked against the estimates.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.mapped import MappedSource, _fingerprint, _Tensor
from cluster_tracking.graph.mapped_graph import (
    SafetensorsGraph,
    StageCallback,
    _as_safetensors_graph,
    _finish_chain,
)
from cluster_tracking.graph.selection import list_names
from cluster_tracking.graph.types import Preset


def _remote_graph(
    path: Path,
    plan: list[tuple[str, Literal["linear", "conv", "batchnorm"], _Tensor]],
    layers: str | Sequence[str] | None,
    preset: Preset,
    k: int,
    max_memory: int | None,
    stage: StageCallback | None,
    scheduler: Any,
) -> SafetensorsGraph:
    """The graph of ``plan`` with its weight blocks mapped and kept by the workers of a Dask
    cluster (see :func:`safetensors_graph`)."""
    from cluster_tracking.graph.chain import _ChainEntry
    from cluster_tracking.graph.remote import RemoteBlocks
    from cluster_tracking.parallel.dask import dask_client

    _refuse_remote_chain(preset, plan)
    # The chain's topology from the header's shapes alone: zero-stride placeholders (no
    # memory), replaced below by zero-size ones so nothing here can compute on them.
    entries = [
        _ChainEntry(
            name, f"weight {tensor.key!r}", kind, np.broadcast_to(np.float32(1), tensor.shape)
        )
        for name, kind, tensor in plan
    ]
    chain = _finish_chain(entries, layers, preset, path)
    by_name = {name: tensor for name, _, tensor in plan}
    source = MappedSource(
        str(path),
        _fingerprint(path),
        tuple(by_name[block.name] for block in chain.blocks),
        tuple(None for _ in chain.blocks),
    )
    skeleton = tuple(
        replace(block, weight=_placeholder(block.weight.ndim)) for block in chain.blocks
    )
    nodes = chain.n_nodes
    block_entries = [int(np.prod(t.shape, dtype=np.int64)) for t in source.tensors]
    client, owned = dask_client(scheduler)
    try:
        assignment = _assign_workers(client, block_entries, nodes, k, max_memory, path)
        remote = RemoteBlocks(
            client,
            owned,
            source,
            skeleton,
            chain.n_nodes,
            chain.node_layer,
            assignment,
            stage,
        )
    except BaseException:
        if owned:
            client.close()
        raise
    graph = replace(chain, blocks=skeleton)
    result = _as_safetensors_graph(graph, source, remote)
    # the workers free the blocks when the graph goes (not at exit: the client may be gone)
    weakref.finalize(result, remote.close).atexit = False
    return result


def _refuse_remote_chain(
    preset: Preset, plan: list[tuple[str, Literal["linear", "conv", "batchnorm"], _Tensor]]
) -> None:
    """Refuse what keeping the weights on Dask workers cannot do: the ``filan2021`` preset
    (scikit-learn needs the whole adjacency here) and chains that fold BatchNorm layers."""
    if preset == "filan2021":
        raise ConfigError(
            "preset='filan2021' runs scikit-learn's SpectralClustering, which needs the whole "
            "adjacency in one process; keeping the weights on Dask workers (scheduler=) works "
            "with preset='default' only."
        )
    batchnorms = [tensor.key for _, kind, tensor in plan if kind == "batchnorm"]
    if batchnorms:
        raise ConfigError(
            f"the chain folds BatchNorm layers ({list_names(batchnorms)}); keeping the weights "
            "on Dask workers (scheduler=) reads plain Linear/Conv chains: read this one here "
            "(without scheduler=)."
        )


def _assign_workers(
    client: Any, block_entries: list[int], nodes: int, k: int, max_memory: int | None, path: Path
) -> dict[str, list[int]]:
    """The blocks each running worker of ``client`` will hold, once this process's peak (the
    solver's vectors) and each worker's (its blocks) are checked against their limits."""
    from cluster_tracking.parallel.dask import running_workers
    from cluster_tracking.resources.estimate import (
        check_fits,
        check_workers_fit,
        estimate_peak,
        estimate_worker_blocks,
    )

    estimate = estimate_peak(nodes, 0, k=k, bipartite=True)
    what = f"{path} (this process; the weights on the Dask workers)"
    check_fits(estimate, what, max_memory, dask=False)
    workers = running_workers(client)
    assignment = _assign_blocks(block_entries, sorted(workers))
    check_workers_fit(
        {
            worker: (
                estimate_worker_blocks(sum(block_entries[i] for i in indices)),
                int(workers[worker].get("memory_limit") or 0),
            )
            for worker, indices in assignment.items()
        },
        str(path),
    )
    return assignment


def _placeholder(ndim: int) -> np.ndarray:
    """A zero-size weight: a block whose weights stay on a Dask worker."""
    return np.empty((0,) * ndim, dtype=np.float32)


def _assign_blocks(block_entries: Sequence[int], workers: Sequence[str]) -> dict[str, list[int]]:
    """Consecutive runs of blocks to workers, about the same number of entries each."""
    count = min(len(workers), len(block_entries))
    total = sum(block_entries)
    assignment: dict[str, list[int]] = {worker: [] for worker in workers[:count]}
    filled = 0
    for index, entries in enumerate(block_entries):
        # the worker whose share the middle of this block falls in
        position = min(count - 1, int((filled + entries / 2) * count / max(total, 1)))
        assignment[workers[position]].append(index)
        filled += entries
    return {worker: indices for worker, indices in assignment.items() if indices}
