"""What a measurement will cost, estimated from its weight graph's size before it starts.

Memory (:func:`run_memory_estimate`, refused by :func:`check_run_size` above the memory limit)
and time (:func:`check_time`, refused above
:data:`~cluster_tracking.resources.limits.MAX_RUN_SECONDS` unless ``--allow-long-run``).
"""

from __future__ import annotations

from typing import Any

from cluster_tracking.audit.settings import AuditSettings
from cluster_tracking.errors import ConfigError
from cluster_tracking.resources.limits import (
    check_run_time,
    cpu_count,
    current_memory_limit,
    format_size,
)

#: Bytes per stored edge that one measured network holds (the adjacency and its shuffled,
#: normalised and symmetrised copies), and per node and eigenvector (solver work space).
_BYTES_PER_EDGE = 72
_BYTES_PER_NODE_VECTOR = 48


def run_memory_estimate(n_nodes: int, n_stored: int, settings: AuditSettings) -> int:
    """Bytes a measurement of a weight graph of ``n_nodes`` nodes and ``n_stored`` stored
    adjacency entries (each edge twice) will hold with ``settings``, roughly: one network per
    worker measured at once (and this process's own), each its adjacency's copies and the
    eigensolver's vectors."""
    k = 32 if settings.k == "auto" else int(settings.k)
    per_network = n_stored * _BYTES_PER_EDGE + n_nodes * (k + 8) * _BYTES_PER_NODE_VECTOR
    return per_network * (workers(settings) + 1)


def workers(settings: AuditSettings) -> int:
    """Local worker processes (or threads) measuring null networks at once."""
    if not settings.shuffles or settings.backend == "dask":
        return 0
    jobs = cpu_count() if settings.jobs == -1 else settings.jobs
    return min(jobs, settings.shuffles)


def weight_extent(state: dict[str, Any]) -> tuple[int, int]:
    """``(nodes, edges)`` at most of the weight graph of a state_dict: every weight of two or
    more dimensions counted as a full bipartite block (``out * in`` edges, ``out + in`` nodes),
    before the graph is built (building it allocates by its edges)."""
    nodes = edges = 0
    for key, value in state.items():
        shape: tuple[int, ...] = tuple(getattr(value, "shape", ()))
        if key.rsplit(".", 1)[-1] in ("weight", "weight_orig") and len(shape) >= 2:
            nodes += int(shape[0]) + int(shape[1])
            edges += int(shape[0]) * int(shape[1])
    return nodes, edges


def check_run_size(n_nodes: int, n_stored: int, settings: AuditSettings, label: str) -> None:
    """Refuse a measurement whose estimated memory (:func:`run_memory_estimate`) passes the
    limit, before it starts.

    Raises:
        ConfigError: with the estimate, the limit, and what to lower.
    """
    estimate = run_memory_estimate(n_nodes, n_stored, settings)
    limit = settings.max_memory if settings.max_memory is not None else current_memory_limit()
    if estimate > limit:
        raise ConfigError(
            f"{label}: measuring its weight graph ({n_nodes} nodes, "
            f"{n_stored // 2} edges) with {workers(settings)} worker(s) would need about "
            f"{format_size(estimate)}, more than the memory limit of {format_size(limit)}; "
            "lower --jobs, audit fewer --layers, or raise --max-memory if the machine has it."
        )


def check_time(settings: AuditSettings, n_nodes: int, n_stored: int, label: str) -> None:
    """Refuse, before any work, a run whose estimated time is absurd (``--allow-long-run`` goes
    ahead anyway; a Dask cluster's speed is unknown, so it is not estimated)."""
    if not settings.allow_long_run and settings.backend != "dask":
        check_run_time(
            n_nodes,
            n_stored,
            shuffles=settings.shuffles,
            ks=[12 if settings.k == "auto" else int(settings.k)],
            jobs=max(workers(settings), 1),
            preset=settings.preset,
            label=label,
        )
