"""``measure``: the clusterability of a network, with its null-model comparison, as one report.

Data flows one way: model -> weight graph -> spectral partition and n-cut -> null models and
statistics -> :class:`~cluster_tracking.report.ClusterabilityReport`.

Reproducibility: every random draw comes from a :class:`numpy.random.SeedSequence` keyed by the
report's ``seed`` and the draw's role, never from a shared stream. The observed partition at k uses
key ``(0, ...)``, null network i's weights ``(1, i)`` and its partition ``(2, i, ...)``; so the same
seed gives the same numbers whatever the number of workers or the joblib backend.
"""

from __future__ import annotations

import atexit
import collections
import math
import os
import platform
import secrets
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, overload

import numpy as np
from threadpoolctl import threadpool_limits

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.types import WeightGraph
from cluster_tracking.nulls import baselines
from cluster_tracking.report import (
    ClusterabilityReport,
    ClusterSummary,
    LayerSummary,
    NodeCounts,
    Partition,
    ave_in_out,
)
from cluster_tracking.spectral.cuts import cluster_cuts
from cluster_tracking.spectral.partition import (
    CLUSTERING_PROCEDURES,
    DEFAULT_N_INIT,
    SpectralPartition,
    StageCallback,
    child_seed,
    filan2021_n_init,
    laplacian_eigenvalues,
    spectral_partitions,
)

if TYPE_CHECKING:
    import torch

    ModelLike = torch.nn.Module | dict[str, Any] | WeightGraph

#: The range ``k="auto"`` searches for the largest eigengap.
AUTO_K_RANGE = (2, 32)

ProgressCallback = Callable[[int, int], None]
#: Shuffled null networks per task sent to a worker process: small enough that no process waits
#: long for the last task; each task costs a round trip (the weights themselves are mapped from
#: a file, not sent).
NULLS_PER_TASK = 2
#: The environment of the shuffle nulls' worker processes: one BLAS/OpenMP thread each (their
#: products are thin; more threads oversubscribe the cores the other workers use), and glibc's
#: malloc told to keep freed memory for reuse: by default it maps every array over 128 KiB
#: afresh and returns it on free, and the page faults of the k-means and Krylov temporaries
#: (a few MiB, allocated thousands of times) cost a quarter of a null network's time.
_WORKER_ENV = {
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


@overload
def measure(
    model: ModelLike,
    k: int | Literal["auto"] = ...,
    shuffles: int = ...,
    shuffle: str = ...,
    seed: int | None = ...,
    *,
    n_init: int | None = ...,
    n_jobs: int | None = ...,
    backend: str | None = ...,
    scheduler: str | None = ...,
    norm: Literal["l1", "l2"] = ...,
    preset: Literal["default", "filan2021"] = ...,
    layers: str | Sequence[str] | None = ...,
    init: str | None = ...,
    progress: ProgressCallback | None = ...,
    stage: StageCallback | None = ...,
    example_inputs: Any = ...,
    include_embeddings: bool = ...,
) -> ClusterabilityReport: ...


@overload
def measure(
    model: ModelLike,
    k: Sequence[int],
    shuffles: int = ...,
    shuffle: str = ...,
    seed: int | None = ...,
    *,
    n_init: int | None = ...,
    n_jobs: int | None = ...,
    backend: str | None = ...,
    scheduler: str | None = ...,
    norm: Literal["l1", "l2"] = ...,
    preset: Literal["default", "filan2021"] = ...,
    layers: str | Sequence[str] | None = ...,
    init: str | None = ...,
    progress: ProgressCallback | None = ...,
    stage: StageCallback | None = ...,
    example_inputs: Any = ...,
    include_embeddings: bool = ...,
) -> list[ClusterabilityReport]: ...


def measure(
    model: ModelLike,
    k: int | Sequence[int] | Literal["auto"] = 12,
    shuffles: int = 50,
    shuffle: str = "layer",
    seed: int | None = None,
    *,
    n_init: int | None = None,
    n_jobs: int | None = -1,
    backend: str | None = None,
    scheduler: str | None = None,
    norm: Literal["l1", "l2"] = "l1",
    preset: Literal["default", "filan2021"] = "default",
    layers: str | Sequence[str] | None = None,
    init: str | None = None,
    progress: ProgressCallback | None = None,
    stage: StageCallback | None = None,
    example_inputs: Any = None,
    include_embeddings: bool = False,
) -> ClusterabilityReport | list[ClusterabilityReport]:
    """Measure how clusterable a network is (Filan et al. 2021).

    Builds the weight graph, partitions it into ``k`` clusters by normalised spectral clustering,
    and compares its n-cut with ``shuffles`` null networks of method ``shuffle``.

    Args:
        model: a ``torch.nn.Module``, a state_dict of a chain of layers, or a ready
            :class:`~cluster_tracking.graph.WeightGraph`.
        k: number of clusters (default 12, as in the paper); a list of k sweeps them and returns
            one report per k; ``"auto"`` picks the k in :data:`AUTO_K_RANGE` with the largest
            eigengap of the normalised Laplacian and records the choice in ``config["k_auto"]``.
        shuffles: number of null networks; 0 skips the null model (``report.baseline is None``).
        shuffle: the null model: ``layer``, ``layer_nonzero``, ``layer_nonzero_distribution``,
            ``layer_all_distribution`` or ``random_init`` (needs a ``torch.nn.Module``).
        seed: seed of every random draw; ``None`` draws one and records it in ``config["seed"]``.
        n_init: k-means restarts per partition (``None``: the preset's own, 25 for ``default``;
            25, or 100 above 2,000 nodes, for ``filan2021``).
        n_jobs: processes (or threads) measuring the null networks, this one included
            (-1 = all cores; ``None`` = 1, sequential).
        backend: joblib backend for the null networks, ``loky`` by default: worker processes
            kept alive between calls (for the shuffles, this package's own, fed through pipes;
            for ``random_init``, joblib's loky). For the shuffles this process works too, taking
            null networks from the end of the queue while ``n_jobs - 1`` workers take them from
            the start, so no time is lost while the workers start. Also ``threading`` (no new
            processes; the GIL limits the gain), ``multiprocessing`` and ``dask``.
        scheduler: address of a Dask scheduler, with ``backend="dask"`` (e.g.
            ``"tcp://127.0.0.1:8786"``); without it the current Dask client is used.
        norm: kernel-slice norm for convolutions (``l1`` or ``l2``).
        preset: the procedure. ``default``: this package's clustering (the restart of lowest
            n-cut kept) and null models. ``filan2021``: the published procedure of Filan et al.
            (2021), so that numbers and z-scores can be set beside the paper's: scikit-learn's
            ``SpectralClustering`` (ARPACK, k-means to convergence, lowest inertia), the paper's
            null models (convolutions shuffled as channel-norm matrices, kernel density
            bandwidth 0.01) and graph (conv-to-conv edges, induced "L1" norm). Recorded in
            ``config["procedure"]``.
        layers: names (or ``|``-separated glob patterns) of the Linear/Conv modules that make
            the graph, for models that cannot be traced or where only some layers matter.
        init: for ``random_init``: a named ``torch.nn.init`` scheme instead of
            ``reset_parameters()``.
        progress: called as ``progress(done, total)`` while null networks are measured.
        stage: called as ``stage(name, done, total)`` through the stages of the measurement,
            for progress bars of large audits: ``"graph"`` (0 then 1 of 1; not when ``model``
            is a graph already), ``"eigen"`` (the embedding, then the eigenvalues: 0 to 2 of
            2), ``"k-means"`` (one step per k) and ``"nulls"`` (as ``progress``). The
            bounded-memory reader (:func:`~cluster_tracking.graph.lazy.safetensors_graph`)
            reports ``"reading"`` through its own ``stage``.
        example_inputs, include_embeddings: as for :func:`~cluster_tracking.graph.weight_graph`
            (a small input to follow the model with ``torch.export``; embedding tables as
            blocks).

    Returns:
        A :class:`~cluster_tracking.report.ClusterabilityReport` (a list of them for a list of k).
    """
    started = time.perf_counter()
    method = baselines.check_method(shuffle)
    baselines.check_preset(preset)
    shuffles = _check_shuffles(shuffles)
    seed = _resolve_seed(seed)
    if method == "random_init" and shuffles and not _is_module(model):
        raise ConfigError(
            "shuffle='random_init' re-initialises the model's modules, so it needs a "
            "torch.nn.Module, not a state_dict; use shuffle='layer' for bare weights."
        )
    if shuffles and _uses_worker_processes(method, n_jobs, backend):
        # the workers start (about a third of a second) while this process builds and cuts the
        # graph
        _null_workers(_effective_jobs(n_jobs, backend) - 1).release()

    graph_options: dict[str, Any] = {
        "norm": norm,
        "preset": preset,
        "layers": layers if isinstance(layers, str) else (list(layers) if layers else None),
    }
    if example_inputs is not None:
        graph_options["example_inputs"] = example_inputs
    if include_embeddings:
        graph_options["include_embeddings"] = True
    if isinstance(model, WeightGraph):
        graph = model
    else:
        from cluster_tracking.graph import weight_graph  # torch, imported on first use

        if stage is not None:
            stage("graph", 0, 1)
        graph = weight_graph(model, **graph_options)
        if stage is not None:
            stage("graph", 1, 1)
    graph_seconds = time.perf_counter() - started
    if shuffles:
        baselines.check_magnitude_blocks(graph.blocks, method)
        baselines.check_null_backend(graph, method, backend or "loky")
    root = np.random.SeedSequence(seed)

    ks, k_auto = _resolve_ks(k, graph, root)
    tick = time.perf_counter()
    observed = spectral_partitions(
        graph, ks, seed=child_seed(root, 0), n_init=n_init, preset=preset, stage=stage
    )
    partition_seconds = time.perf_counter() - tick

    tick = time.perf_counter()
    null_ncuts: np.ndarray | None = None
    if shuffles and stage is not None:
        stage("nulls", 0, shuffles)
        reported = progress

        def progress(done: int, total: int) -> None:
            assert stage is not None
            stage("nulls", done, total)
            if reported is not None:
                reported(done, total)

    if shuffles:
        if method != "random_init":
            baselines.check_shuffle_preconditions(graph.weights(), method)
        null_ncuts = _null_ncuts(
            graph,
            model if _is_module(model) and method == "random_init" else None,
            method=method,
            n=shuffles,
            ks=ks,
            root=root,
            n_init=n_init,
            preset=preset,
            graph_options=graph_options,
            init=init,
            n_jobs=n_jobs,
            backend=backend,
            scheduler=scheduler,
            progress=progress,
        )
    baseline_seconds = time.perf_counter() - tick

    config: dict[str, Any] = {
        "k": ks[0] if len(ks) == 1 else ks,
        "shuffles": shuffles,
        "method": method,
        "seed": seed,
        "n_init": _resolved_n_init(n_init, preset, observed),
        "norm": norm,
        "preset": preset,
        "procedure": preset,
        "clustering": CLUSTERING_PROCEDURES[preset],
        "layers": graph_options["layers"],
        "init": init,
        "n_jobs": n_jobs,
        "backend": backend or "loky",
    }
    if k_auto is not None:
        config["k_auto"] = k_auto
    timings = {
        "graph": graph_seconds,
        "partition": partition_seconds,
        "baseline": baseline_seconds,
        "total": time.perf_counter() - started,
    }
    reports = [
        _report(
            graph,
            part,
            None
            if null_ncuts is None
            else baselines.null_statistics(part.ncut, null_ncuts[:, index], method),
            timings,
            {**config, "k": part.k},
        )
        for index, part in enumerate(observed)
    ]
    return reports if isinstance(k, (list, tuple)) else reports[0]


def _resolved_n_init(n_init: int | None, preset: str, observed: list[SpectralPartition]) -> int:
    """The k-means restarts the observed partition used."""
    if n_init is not None:
        return int(n_init)
    if preset == "filan2021":
        clustered = observed[0].labels.size - observed[0].n_isolated
        return filan2021_n_init(clustered)
    return DEFAULT_N_INIT


def _is_module(model: object) -> TypeGuard[torch.nn.Module]:
    """Whether ``model`` is a ``torch.nn.Module`` (without importing torch: if no one has, it is
    not)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _check_shuffles(shuffles: int) -> int:
    if isinstance(shuffles, bool) or not isinstance(shuffles, (int, np.integer)):
        raise ConfigError(f"shuffles must be an integer, got {shuffles!r}.")
    if shuffles == 1 or shuffles < 0:
        raise ConfigError(
            f"shuffles={shuffles}: a null model needs at least 2 networks to have a spread "
            "(the paper uses 50-100); pass shuffles=0 to skip it."
        )
    return int(shuffles)


def _resolve_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbits(32)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer or None, got {seed!r}.")
    return int(seed)


def _resolve_ks(
    k: int | Sequence[int] | str, graph: WeightGraph, root: np.random.SeedSequence
) -> tuple[list[int], dict[str, Any] | None]:
    if isinstance(k, str):
        if k != "auto":
            raise ConfigError(f"k must be an integer, a list of integers or 'auto', got {k!r}.")
        low, high = AUTO_K_RANGE
        eigenvalues = laplacian_eigenvalues(graph, high + 1, seed=child_seed(root, 3))
        high = min(high, len(eigenvalues) - 1)
        if high < low:
            raise ConfigError("k='auto' needs a graph with at least 3 connected nodes.")
        # gaps[i] = lambda_{i+1} - lambda_i in 0-based order: a gap after the k-th eigenvalue
        # (index k - 1) says the graph has k well-separated clusters.
        gaps = np.diff(eigenvalues)
        candidates = np.arange(low, high + 1)
        chosen = int(candidates[np.argmax(gaps[candidates - 1])])
        return [chosen], {
            "range": [low, high],
            "chosen": chosen,
            "eigengap": float(gaps[chosen - 1]),
            "eigenvalues": [float(v) for v in eigenvalues],
        }
    if isinstance(k, (list, tuple)):
        if not k:
            raise ConfigError("k is an empty list; give at least one number of clusters.")
        if len(set(k)) != len(k):
            raise ConfigError(f"k lists a value twice: {list(k)}.")
        return [int(value) for value in k], None
    return [k], None  # type: ignore[list-item]  # validated by spectral_partitions


def _null_ncuts(
    graph: WeightGraph,
    model: torch.nn.Module | None,
    *,
    method: str,
    n: int,
    ks: list[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str,
    graph_options: dict[str, Any],
    init: str | None,
    n_jobs: int | None,
    backend: str | None,
    scheduler: str | None,
    progress: ProgressCallback | None,
) -> np.ndarray:
    """n-cuts of ``n`` null networks at every k: ``[n, len(ks)]``, in null-index order."""
    import joblib

    workers = _effective_jobs(n_jobs, backend)
    resolved = backend or "loky"
    if model is None and getattr(graph, "source", None) is not None and resolved == "dask":
        # read from a safetensors file: each Dask task maps the weights from its path
        return baselines.mapped_null_ncuts(
            graph,
            method=method,
            n=n,
            ks=ks,
            root=root,
            n_init=n_init,
            preset=preset,
            scheduler=scheduler,
            progress=progress,
        )
    if model is None and _uses_worker_processes(method, n_jobs, backend):
        if scheduler is not None:
            raise ConfigError("scheduler is only used with backend='dask'.")
        return _shuffled_ncuts_with_workers(
            graph, method, n, ks, root, n_init, preset, workers, progress
        )
    # A few chunks per worker: the graph travels once per chunk, progress stays smooth.
    n_chunks = min(n, max(1, workers * 4)) if workers > 1 else min(n, 10)
    chunks = [list(chunk) for chunk in np.array_split(np.arange(n), n_chunks) if len(chunk)]
    in_process = workers == 1 or resolved == "threading"
    # BLAS on one thread (its operands are thin blocks of vectors): worker processes pin their
    # own; threads and a sequential run share this process's BLAS, pinned here once for all
    # (threadpoolctl's limits are process-wide).
    task_args = (
        graph,
        model,
        method,
        ks,
        root,
        n_init,
        preset,
        graph_options,
        init,
        not in_process,
    )
    results: dict[int, np.ndarray] = {}
    done = 0
    pinned = threadpool_limits(1) if in_process else nullcontext()
    with pinned, _parallel_context(resolved, scheduler):
        parallel = joblib.Parallel(n_jobs=workers, return_as="generator")
        for chunk, values in zip(
            chunks,
            parallel(joblib.delayed(_null_chunk)(chunk, *task_args) for chunk in chunks),
            strict=True,
        ):
            for index, row in zip(chunk, values, strict=True):
                results[index] = row
            done += len(chunk)
            if progress is not None:
                progress(done, n)
    return np.stack([results[i] for i in range(n)])


def _uses_worker_processes(method: str, n_jobs: int | None, backend: str | None) -> bool:
    """Whether shuffle nulls run on this process and worker processes (see below)."""
    return (
        method != "random_init"
        and (backend or "loky") == "loky"
        and _effective_jobs(n_jobs, backend) > 1
    )


def _shuffled_ncuts_with_workers(
    graph: WeightGraph,
    method: str,
    n: int,
    ks: list[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str,
    workers: int,
    progress: ProgressCallback | None,
) -> np.ndarray:
    """The shuffle nulls on this process and ``workers - 1`` worker processes.

    The null networks are cut into tasks of :data:`NULLS_PER_TASK` in a queue. The workers take
    tasks from its front (each fed by a thread of this process that waits on its pipe) while this
    process takes them from its back, so this process works while the workers start (they import
    numpy and scipy only, not torch) and none waits at the end for more than a task. Worker
    processes stay alive between calls (:func:`_null_workers`). A worker that dies (out of
    memory, killed) loses nothing: its task goes back in the queue, with a warning.
    """
    size = max(1, min(NULLS_PER_TASK, math.ceil(n / (4 * workers))))
    tasks = [list(range(start, min(n, start + size))) for start in range(0, n, size)]
    args = (graph.blocks, graph.n_nodes, graph.node_layer, method, ks, root, n_init, preset)
    pool = _null_workers(workers - 1)
    shared = _SharedWeights(graph.blocks)
    queue = collections.deque(range(len(tasks)))
    rows: dict[int, list[np.ndarray]] = {}
    failures: list[str] = []  # errors raised in a worker
    lost: list[str] = []  # why a worker stopped
    changed = threading.Condition()

    def serve(process: Any, busy: threading.Lock) -> None:
        with busy:  # (a call interrupted in this process may still be running there)
            while True:
                with changed:
                    if not queue or failures:
                        return
                    position = queue.popleft()
                try:
                    row = process.call(
                        "nulls", tasks[position], shared.paths, shared.skeleton, *args[1:]
                    )
                except (EOFError, OSError) as error:  # the worker is gone: its task goes back
                    with changed:
                        lost.append(str(error))
                        queue.appendleft(position)
                        changed.notify_all()
                    return
                except Exception as error:  # raised again in the calling thread, below
                    with changed:
                        failures.append(str(error))
                        changed.notify_all()
                    return
                with changed:
                    rows[position] = row
                    changed.notify_all()

    feeders = [
        threading.Thread(target=serve, args=member, daemon=True, name="cluster-tracking-nulls")
        for member in pool.members()
    ]
    reported = 0

    def report_progress() -> None:
        nonlocal reported
        done = sum(len(tasks[position]) for position in list(rows))
        if progress is not None and done > reported:
            progress(done, n)
        reported = done

    try:
        for feeder in feeders:
            feeder.start()
        with threadpool_limits(1):
            while True:
                with changed:
                    if failures:
                        break
                    if queue:
                        position = queue.pop()
                    elif len(rows) == len(tasks) or not any(f.is_alive() for f in feeders):
                        break
                    else:  # the workers have the last tasks
                        changed.wait(timeout=0.5)
                        position = None
                if position is not None:
                    rows[position] = baselines.shuffled_ncuts(tasks[position], *args)
                report_progress()
    finally:
        with changed:
            queue.clear()  # an interrupted call leaves no work queued
        pool.release()
        shared.close()
    for reason in lost:
        warnings.warn(
            f"a worker process measuring null networks stopped ({reason}); its null networks "
            "were measured in this process instead.",
            RuntimeWarning,
            stacklevel=4,
        )
    if failures:
        raise RuntimeError(f"measuring null networks in a worker process failed: {failures[0]}")
    return np.stack([row for position in range(len(tasks)) for row in rows[position]])


class _SharedWeights:
    """The graph's weight tensors in ``.npy`` files that the worker processes map into memory:
    written once per call, where pickling them with every task would copy them each time.

    On ``/dev/shm`` (memory) where it has room, else in the temporary directory.
    """

    def __init__(self, blocks: Sequence[Any]) -> None:
        nbytes = sum(block.weight.nbytes for block in blocks)
        self.folder = tempfile.mkdtemp(prefix="cluster-tracking-", dir=_shared_memory_dir(nbytes))
        self.paths = []
        for index, block in enumerate(blocks):
            path = os.path.join(self.folder, f"weight-{index}.npy")
            np.save(path, block.weight)
            self.paths.append(path)
        self.skeleton = [replace(block, weight=_NO_WEIGHT) for block in blocks]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


_NO_WEIGHT = np.empty(0)


def _shared_memory_dir(nbytes: int) -> str | None:
    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
            return shm
    except OSError:
        pass
    return None


#: In a worker process: the weight tensors of the call it serves, mapped from their files.
_MAPPED: dict[tuple[str, ...], list[np.ndarray]] = {}


def _shuffled_task(
    indices: list[int],
    paths: list[str],
    skeleton: list[Any],
    n_nodes: int,
    node_layer: np.ndarray,
    method: str,
    ks: list[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str = "default",
) -> list[np.ndarray]:
    """:func:`~cluster_tracking.nulls.baselines.shuffled_ncuts` in a worker process, on the weights
    that :class:`_SharedWeights` wrote."""
    key = tuple(paths)
    if key not in _MAPPED:
        _MAPPED.clear()  # one call's graph at a time
        _MAPPED[key] = [np.load(path, mmap_mode="r") for path in paths]
    blocks = [
        replace(block, weight=weight) for block, weight in zip(skeleton, _MAPPED[key], strict=True)
    ]
    return baselines.shuffled_ncuts(
        indices, blocks, n_nodes, node_layer, method, ks, root, n_init, preset
    )


class _NullWorkers:
    """``count`` worker processes for the shuffle nulls, each with a lock held while it serves
    a call; they exit after :data:`_POOL_IDLE_SECONDS` without a call, or with this process.

    They are :class:`~cluster_tracking.parallel.child._WorkerProcess` children fed through their own
    pipes, not a ``concurrent.futures`` pool: loky and ``multiprocessing`` start resource-tracker
    processes beside the workers, which compete for the cores with the first null networks.
    """

    def __init__(self, count: int) -> None:
        from cluster_tracking.parallel.child import _WorkerProcess

        self.processes = [
            _WorkerProcess(nice=False, env=_WORKER_ENV, wait=False) for _ in range(count)
        ]
        self.locks = [threading.Lock() for _ in range(count)]
        self.users = 0
        self.idle: threading.Timer | None = None
        self.owner = os.getpid()  # a forked child inherits the pipes, but must not use them

    def usable(self) -> bool:
        return self.owner == os.getpid() and all(process.running() for process in self.processes)

    def members(self) -> list[tuple[Any, threading.Lock]]:
        return list(zip(self.processes, self.locks, strict=True))

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def release(self) -> None:
        """One call is done with the workers; stop them if no call uses them for a while."""
        with _POOLS_LOCK:
            self.users -= 1
            if self.users == 0:
                self.idle = threading.Timer(_POOL_IDLE_SECONDS, self._stop_if_idle)
                self.idle.daemon = True
                self.idle.start()

    def _stop_if_idle(self) -> None:
        with _POOLS_LOCK:
            if self.users or self.idle is None:
                return
            self.idle = None
            if _POOLS.get(len(self.processes)) is self:
                del _POOLS[len(self.processes)]
        self.stop()

    def stop(self) -> None:
        for process in self.processes:
            process.stop(timeout=1.0)


#: The shuffle nulls' worker processes by number, kept alive between calls (between the
#: checkpoints of a training run) and stopped when idle for :data:`_POOL_IDLE_SECONDS`.
_POOLS: dict[int, _NullWorkers] = {}
_POOLS_LOCK = threading.Lock()
_POOL_IDLE_SECONDS = 300


def _null_workers(count: int) -> _NullWorkers:
    """The pool of ``count`` null workers, started (without waiting for them) if there is none
    or one of its workers has died; the caller must :meth:`~_NullWorkers.release` it."""
    stale = None
    with _POOLS_LOCK:
        pool = _POOLS.get(count)
        if pool is not None and not pool.usable():
            stale, pool = pool, None
            if stale.owner != os.getpid():
                stale = None  # a forked child's copy: the workers are its parent's
        if pool is None:
            pool = _POOLS[count] = _NullWorkers(count)
        if pool.idle is not None:
            pool.idle.cancel()
            pool.idle = None
        pool.users += 1
    if stale is not None:
        stale.stop()
    return pool


@atexit.register
def _stop_null_workers() -> None:
    with _POOLS_LOCK:
        pools = [pool for pool in _POOLS.values() if pool.owner == os.getpid()]
        _POOLS.clear()
    for pool in pools:
        pool.stop()


def _null_chunk(
    indices: list[int],
    graph: WeightGraph,
    model: torch.nn.Module | None,
    method: str,
    ks: list[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str,
    graph_options: dict[str, Any],
    init: str | None,
    pin_threads: bool,
) -> list[np.ndarray]:
    """Measure the null networks ``indices`` (runs in a worker)."""
    limits = threadpool_limits(1) if pin_threads else nullcontext()
    with limits:
        if model is None:
            return baselines.shuffled_ncuts(
                indices,
                graph.blocks,
                graph.n_nodes,
                graph.node_layer,
                method,
                ks,
                root,
                n_init,
                preset,
            )
        from cluster_tracking.graph import weight_graph

        rows = []
        for index in indices:
            torch_seed = int(child_seed(root, 1, index).generate_state(1)[0])
            fresh = baselines.reinitialised_copy(model, torch_seed, init)
            null_graph = weight_graph(fresh, **graph_options)
            parts = spectral_partitions(
                null_graph, ks, seed=child_seed(root, 2, index), n_init=n_init, preset=preset
            )
            rows.append(np.array([part.ncut for part in parts]))
    return rows


def _effective_jobs(n_jobs: int | None, backend: str | None) -> int:
    if backend == "dask":
        return n_jobs if n_jobs and n_jobs > 0 else 8
    cores = os.cpu_count() or 1
    if n_jobs is None or n_jobs == 0:
        return 1
    if n_jobs < 0:
        return max(1, cores + 1 + n_jobs)
    return int(n_jobs)


@contextmanager
def _parallel_context(backend: str, scheduler: str | None) -> Iterator[None]:
    """joblib's backend for the null networks; for Dask, a client on ``scheduler``."""
    import joblib

    if backend == "loky":
        if scheduler is not None:
            raise ConfigError("scheduler is only used with backend='dask'.")
        with joblib.parallel_config(backend="loky"):
            yield
        return
    if backend != "dask":
        if scheduler is not None:
            raise ConfigError("scheduler is only used with backend='dask'.")
        with joblib.parallel_config(backend=backend):
            yield
        return
    try:
        from distributed import Client, get_client
    except ImportError as error:
        raise ConfigError(
            "backend='dask' needs Dask's distributed scheduler: "
            "pip install 'cluster-tracking[dask]'."
        ) from error
    client = None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="5s", set_as_default=False)
        except OSError as error:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {scheduler!r} ({error}); start one with "
                "`dask scheduler` or pass the right address."
            ) from error
    else:
        try:
            get_client()
        except ValueError as error:
            raise ConfigError(
                "backend='dask' without scheduler= needs a running dask.distributed Client; "
                "pass scheduler='tcp://HOST:PORT'."
            ) from error
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


def _report(
    graph: WeightGraph,
    part: SpectralPartition,
    baseline: Any,
    timings: dict[str, float],
    config: dict[str, Any],
) -> ClusterabilityReport:
    labels = part.labels
    offsets = graph.offsets
    cuts, volumes = cluster_cuts(graph, labels, part.k)
    node_layer = graph.node_layer
    clusters = []
    for cluster in range(part.k):
        members = labels == cluster
        per_layer = np.bincount(node_layer[members], minlength=len(graph.widths))
        clusters.append(
            ClusterSummary(
                cluster=cluster,
                size=int(members.sum()),
                cut=float(cuts[cluster]),
                volume=float(volumes[cluster]),
                ncut_term=float(cuts[cluster] / volumes[cluster]) if volumes[cluster] > 0 else 0.0,
                per_layer={
                    name: int(count)
                    for name, count in zip(graph.layer_names, per_layer, strict=True)
                },
            )
        )
    return ClusterabilityReport(
        ncut=part.ncut,
        ave_in_out=ave_in_out(part.ncut, part.k),
        k=part.k,
        partition=Partition(
            labels=[int(label) for label in labels],
            by_layer={
                name: [int(label) for label in labels[offsets[i] : offsets[i + 1]]]
                for i, name in enumerate(graph.layer_names)
            },
            clusters=clusters,
        ),
        baseline=baseline,
        nodes=NodeCounts(
            total=graph.n_nodes,
            removed=part.n_isolated,
            clustered=graph.n_nodes - part.n_isolated,
        ),
        layers=[
            LayerSummary(name=name, width=int(width))
            for name, width in zip(graph.layer_names, graph.widths, strict=True)
        ],
        eigenvalues=[float(value) for value in part.eigenvalues],
        timings=dict(timings),
        config=dict(config),
        versions=versions(),
    )


def versions() -> dict[str, str]:
    """Versions of cluster-tracking and of what its numbers depend on."""
    from cluster_tracking.version import __version__

    found = {"cluster_tracking": __version__, "python": platform.python_version()}
    for name, distribution in (
        ("torch", "torch"),
        ("numpy", "numpy"),
        ("scipy", "scipy"),
        ("scikit-learn", "scikit-learn"),
    ):
        try:
            found[name] = _version(distribution)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
