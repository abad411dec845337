"""Where the null networks are measured: this process, its worker processes, joblib or Dask.

:func:`null_ncuts` picks by the settings (:class:`~cluster_tracking.config.MeasureConfig`):

- a graph read from a safetensors file, on Dask: tasks that map the weights from the file
  (:mod:`cluster_tracking.nulls.mapped`);
- the shuffles with the default ``loky`` backend and more than one job: this process and this
  package's worker processes (:mod:`cluster_tracking.nulls.local_workers`);
- otherwise (``random_init``, ``threading``, ``multiprocessing``, ``dask``, one job): chunks of
  null networks through ``joblib.Parallel``.

Every path gives the same numbers: null network i draws from the streams keyed by i under the
measurement's seed, whichever process measures it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from cluster_tracking.config import MeasureConfig
from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.types import WeightGraph
from cluster_tracking.nulls.local_workers import shuffled_ncuts_with_workers
from cluster_tracking.nulls.mapped import mapped_null_ncuts
from cluster_tracking.nulls.networks import shuffled_ncuts
from cluster_tracking.nulls.reinit import reinitialised_copy
from cluster_tracking.spectral.partition import child_seed, spectral_partitions

if TYPE_CHECKING:
    import torch


def null_ncuts(
    graph: WeightGraph,
    model: torch.nn.Module | None,
    config: MeasureConfig,
    ks: list[int],
    root: np.random.SeedSequence,
    progress: Callable[[int, int], None] | None,
) -> np.ndarray:
    """n-cuts of ``config.shuffles`` null networks at every k: ``[n, len(ks)]``, in null-index
    order. ``model``: the network to re-initialise for ``random_init`` (``None`` for the
    shuffles, which need the graph only)."""
    import joblib

    n = config.shuffles
    if model is None and getattr(graph, "source", None) is not None and config.backend == "dask":
        # read from a safetensors file: each Dask task maps the weights from its path
        return mapped_null_ncuts(
            graph,
            method=config.shuffle,
            n=n,
            ks=ks,
            root=root,
            n_init=config.n_init,
            preset=config.preset,
            scheduler=config.scheduler,
            progress=progress,
        )
    if model is None and config.uses_worker_processes:
        return shuffled_ncuts_with_workers(graph, config, ks, root, progress)
    workers = config.jobs
    # A few chunks per worker: the graph travels once per chunk, progress stays smooth.
    n_chunks = min(n, max(1, workers * 4)) if workers > 1 else min(n, 10)
    chunks = [list(chunk) for chunk in np.array_split(np.arange(n), n_chunks) if len(chunk)]
    in_process = workers == 1 or config.resolved_backend == "threading"
    # BLAS on one thread (its operands are thin blocks of vectors): worker processes pin their
    # own; threads and a sequential run share this process's BLAS, pinned here once for all
    # (threadpoolctl's limits are process-wide).
    results: dict[int, np.ndarray] = {}
    done = 0
    pinned = threadpool_limits(1) if in_process else nullcontext()
    with pinned, _parallel_context(config.resolved_backend, config.scheduler):
        parallel = joblib.Parallel(n_jobs=workers, return_as="generator")
        measured = parallel(
            joblib.delayed(_null_chunk)(chunk, graph, model, config, ks, root, not in_process)
            for chunk in chunks
        )
        for chunk, values in zip(chunks, measured, strict=True):
            for index, row in zip(chunk, values, strict=True):
                results[index] = row
            done += len(chunk)
            if progress is not None:
                progress(done, n)
    return np.stack([results[i] for i in range(n)])


def _null_chunk(
    indices: list[int],
    graph: WeightGraph,
    model: torch.nn.Module | None,
    config: MeasureConfig,
    ks: list[int],
    root: np.random.SeedSequence,
    pin_threads: bool,
) -> list[np.ndarray]:
    """Measure the null networks ``indices`` (runs in a worker)."""
    limits = threadpool_limits(1) if pin_threads else nullcontext()
    with limits:
        if model is None:
            return shuffled_ncuts(
                indices,
                graph.blocks,
                graph.n_nodes,
                graph.node_layer,
                config.shuffle,
                ks,
                root,
                config.n_init,
                config.preset,
            )
        from cluster_tracking.graph import weight_graph

        rows = []
        for index in indices:
            torch_seed = int(child_seed(root, 1, index).generate_state(1)[0])
            fresh = reinitialised_copy(model, torch_seed, config.init)
            null_graph = weight_graph(fresh, **config.graph_options())
            parts = spectral_partitions(
                null_graph,
                ks,
                seed=child_seed(root, 2, index),
                n_init=config.n_init,
                preset=config.preset,
            )
            rows.append(np.array([part.ncut for part in parts]))
    return rows


@contextmanager
def _parallel_context(backend: str, scheduler: str | None) -> Iterator[None]:
    """joblib's backend for the null networks; for Dask, a client on ``scheduler``."""
    import joblib

    if backend != "dask":
        with joblib.parallel_config(backend=backend):
            yield
        return
    client = _joblib_dask_client(scheduler)
    try:
        if client is not None:
            with client.as_current(), joblib.parallel_config(backend="dask"):
                yield
        else:
            with joblib.parallel_config(backend="dask"):
                yield
    finally:
        if client is not None:
            client.close()


def _joblib_dask_client(scheduler: str | None) -> Any:
    """A new client on ``scheduler``, or ``None`` to use the current one (which must exist)."""
    try:
        from distributed import Client, get_client
    except ImportError as error:
        raise ConfigError(
            "backend='dask' needs Dask's distributed scheduler: "
            "pip install 'cluster-tracking[dask]'."
        ) from error
    if scheduler is not None:
        try:
            return Client(scheduler, timeout="5s", set_as_default=False)
        except OSError as error:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {scheduler!r} ({error}); start one with "
                "`dask scheduler` or pass the right address."
            ) from error
    try:
        get_client()
    except ValueError as error:
        raise ConfigError(
            "backend='dask' without scheduler= needs a running dask.distributed Client; "
            "pass scheduler='tcp://HOST:PORT'."
        ) from error
    return None
