"""The peak memory of a measurement, estimated before anything large is allocated.

A weight graph's size is known from its weight tensors' shapes alone (a safetensors header, a
state_dict's shapes), so a measurement that cannot fit is refused in one line, with the estimate,
the limit and the options that fit, before it reads a weight: never a raw ``MemoryError`` an
hour in, nor the kernel's OOM killer.

What a bounded-memory measurement (:mod:`cluster_tracking.graph.lazy`) holds at its peak:

- **graph**: the weight blocks, ``bytes_per_weight`` per edge (4: float32 magnitudes);
- **solver**: the block Krylov basis and its images (at most ``KRYLOV_MAX_BLOCKS`` blocks of
  ``k + KRYLOV_OVERSAMPLE`` float64 vectors: over one side each for a bipartite graph such as a
  chain of layers, over every node each otherwise), the k-means distances of every restart
  (float32) and the row chunks cast for float64 products;
- **nulls**: with ``shuffles``, the weights written once for the worker processes, and per
  null network measured at once its shuffled weights and the permutation that made them.

On a Dask cluster the peak splits: this process keeps the solver's part only when the weight
blocks stay on the workers, each worker its share of the blocks
(:func:`estimate_worker_blocks`), and a worker measuring null networks the whole graph and, per
thread, a null network's part (:func:`estimate_null_task`); each is checked against the worker's
own ``memory_limit`` (:func:`check_workers_fit`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.resources.limits import current_memory_limit, format_size

__all__ = [
    "MemoryEstimate",
    "check_fits",
    "check_workers_fit",
    "estimate_null_task",
    "estimate_peak",
    "estimate_worker_blocks",
]

#: What the interpreter, numpy, scipy and the package hold before any graph (bytes).
BASE_BYTES = 300 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak of one measurement, in bytes, and what it was estimated from.

    Attributes:
        nodes, edges: the weight graph's size (edges: stored weight entries).
        bytes_per_weight: bytes each weight entry is held in (4: float32, 8: float64).
        shuffles: null networks; workers: null networks measured at once.
        graph, solver, nulls: the bytes of each part (see the module's docstring).
    """

    nodes: int
    edges: int
    bytes_per_weight: int
    shuffles: int
    workers: int
    graph: int
    solver: int
    nulls: int

    @property
    def total(self) -> int:
        """The estimated peak: every part, and the interpreter's own."""
        return BASE_BYTES + self.graph + self.solver + self.nulls

    def describe(self) -> str:
        """One line: the estimate and its parts."""
        parts = f"graph {format_size(self.graph)}, solver {format_size(self.solver)}"
        if self.shuffles:
            parts += f", {self.shuffles} null networks {format_size(self.nulls)}"
        return (
            f"about {format_size(self.total)} ({self.nodes:,} nodes, {self.edges:,} edges at "
            f"{self.bytes_per_weight} bytes; {parts})"
        )


def estimate_peak(
    nodes: int,
    edges: int,
    *,
    k: int = 12,
    shuffles: int = 0,
    workers: int = 1,
    bytes_per_weight: int = 4,
    n_init: int = 25,
    bipartite: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of measuring a weight graph of ``nodes`` nodes and ``edges``
    weight entries held at ``bytes_per_weight`` bytes, with ``shuffles`` null networks of which
    ``workers`` are measured at once (on this machine; 0 when they run on a Dask cluster);
    ``bipartite``: a chain of layers, whose eigensolver works on its two sides."""
    from cluster_tracking.resources.chunks import (
        CHUNK_ENTRIES,
        KRYLOV_MAX_BLOCKS,
        KRYLOV_OVERSAMPLE,
    )

    graph = edges * bytes_per_weight
    vectors = k + KRYLOV_OVERSAMPLE
    # basis and images, float64: one side each for a bipartite graph, all nodes each otherwise
    krylov = (1 if bipartite else 2) * nodes * vectors * KRYLOV_MAX_BLOCKS * 8
    kmeans = 3 * nodes * n_init * k * 4  # distances, packed copies, labels (float32/int)
    chunks = 3 * min(edges, CHUNK_ENTRIES) * 8  # a row chunk cast to float64 and its product
    solver = krylov + kmeans + chunks
    nulls = 0
    if shuffles:
        at_once = max(0, min(workers, shuffles))
        nulls = graph + at_once * (2 * graph + krylov + kmeans)
    return MemoryEstimate(
        nodes=int(nodes),
        edges=int(edges),
        bytes_per_weight=int(bytes_per_weight),
        shuffles=int(shuffles),
        workers=int(workers),
        graph=int(graph),
        solver=int(solver),
        nulls=int(nulls),
    )


def check_fits(
    estimate: MemoryEstimate,
    what: str,
    limit: int | None = None,
    *,
    dask: bool = True,
    fewer_layers: str = "audit fewer layers (--layers / layers=)",
) -> None:
    """Refuse a measurement whose estimated peak passes ``limit`` (``None``: the limit in force,
    :func:`~cluster_tracking.resources.limits.current_memory_limit`: ``--max-memory``, or half the
    memory available). ``dask``: name keeping the weights on a Dask cluster among the options (not
    where they are there already, nor where they cannot be); ``fewer_layers``: how to measure
    fewer layers of this source.

    Raises:
        ConfigError: one line with the estimate, the limit and the options that would fit (the
            CLI's exit 2, as for the in-memory path's estimate: the fix is in the options).
    """
    limit = current_memory_limit() if limit is None else limit
    if estimate.total <= limit:
        return
    options = [fewer_layers]
    if estimate.shuffles:
        without = BASE_BYTES + estimate.graph + estimate.solver
        if without <= limit:
            options.insert(0, f"fewer shuffles (shuffles=0 needs {format_size(without)})")
    if dask:
        options.append(
            "keep the weights on a Dask cluster's workers (--backend dask --scheduler ..., or "
            "safetensors_graph(..., scheduler=...))"
        )
    options.append("raise --max-memory / max_memory if the machine has the memory")
    raise ConfigError(
        f"{what}: measuring it needs {estimate.describe()}, more than the memory limit of "
        f"{format_size(limit)}; options: {'; '.join(options)}."
    )


def estimate_worker_blocks(edges: int, bytes_per_weight: int = 4) -> int:
    """The estimated peak of a Dask worker that keeps ``edges`` weight entries of a graph whose
    eigensolver products it computes (``safetensors_graph(..., scheduler=...)``): the
    interpreter, its blocks, and a row chunk cast to float64 with its product."""
    from cluster_tracking.resources.chunks import CHUNK_ENTRIES

    return BASE_BYTES + edges * bytes_per_weight + 3 * min(edges, CHUNK_ENTRIES) * 8


def estimate_null_task(
    nodes: int, edges: int, *, k: int = 12, threads: int = 1, n_init: int = 25
) -> int:
    """The estimated peak of a Dask worker measuring null networks of a chain graph read from
    its file: the interpreter, the graph's float32 blocks (kept between its tasks), and per
    task running at once (``threads``) a shuffled copy, its permutation and the solver."""
    whole = estimate_peak(nodes, edges, k=k, n_init=n_init, bipartite=True)
    per_task = 2 * whole.graph + whole.solver
    return BASE_BYTES + whole.graph + max(1, threads) * per_task


def check_workers_fit(needs: dict[str, tuple[int, int]], what: str, task: str = "") -> None:
    """Refuse work whose estimated peak on a Dask worker passes that worker's memory limit.

    ``needs`` maps each worker's address to ``(estimated bytes, its memory_limit)``; a limit of
    0 (the worker was started without one) is not checked. ``task`` says what the estimate is
    of, for the message.

    Raises:
        GraphError: one line naming the worker, the estimate, its limit and the options.
    """
    for worker, (need, limit) in sorted(needs.items()):
        if limit and need > limit:
            raise GraphError(
                f"{what}: {task or 'its weight blocks'} on Dask worker {worker} need about "
                f"{format_size(need)}, more than its memory limit of {format_size(limit)}; "
                "options: add workers (or give them more memory: dask worker --memory-limit), "
                "audit fewer layers (--layers / layers=)."
            )
