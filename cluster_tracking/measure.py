"""``measure``: the clusterability of a network, with its null-model comparison, as one report.

Data flows one way: model -> weight graph -> spectral partition and n-cut -> null models and
statistics -> :class:`~cluster_tracking.report.ClusterabilityReport`. The settings are validated
once, as a :class:`~cluster_tracking.config.MeasureConfig`; where the null networks are measured
(this process, worker processes, joblib, Dask) is :mod:`cluster_tracking.nulls.dispatch`'s choice.

Reproducibility: every random draw comes from a :class:`numpy.random.SeedSequence` keyed by the
report's ``seed`` and the draw's role, never from a shared stream. The observed partition at k uses
key ``(0, ...)``, null network i's weights ``(1, i)`` and its partition ``(2, i, ...)``; so the same
seed gives the same numbers whatever the number of workers or the joblib backend.
"""

from __future__ import annotations

import functools
import platform
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, overload

import numpy as np

from cluster_tracking.config import MeasureConfig
from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.types import WeightGraph
from cluster_tracking.nulls.dispatch import null_ncuts
from cluster_tracking.nulls.local_workers import null_worker_pool
from cluster_tracking.nulls.preconditions import (
    check_magnitude_blocks,
    check_null_backend,
    check_shuffle_preconditions,
)
from cluster_tracking.nulls.statistics import null_statistics
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
    """Measure how clusterable a network is (Filan et al. 2021): a
    :class:`~cluster_tracking.report.ClusterabilityReport` (a list of them for a list of k).

    Builds the weight graph, partitions it into ``k`` clusters by normalised spectral clustering,
    and compares its n-cut with ``shuffles`` null networks of method ``shuffle``. Every setting
    is documented, and validated, by :class:`~cluster_tracking.config.MeasureConfig`.

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
        n_jobs, backend, scheduler: who measures the null networks: ``n_jobs`` processes (or
            threads), this one included (-1 = all cores; ``None`` = 1), on joblib's ``backend``
            (``loky`` by default: worker processes kept alive between calls; ``threading``,
            ``multiprocessing``, ``dask`` with the Dask ``scheduler`` address).
        norm, preset, layers: the graph and procedure: kernel-slice norm (``l1``/``l2``);
            ``default`` or ``filan2021`` (the published procedure, recorded in
            ``config["procedure"]``); the Linear/Conv modules that make the graph.
        init: for ``random_init``: a ``torch.nn.init`` scheme instead of ``reset_parameters()``.
        progress: called as ``progress(done, total)`` while null networks are measured.
        stage: called as ``stage(name, done, total)`` through the stages: ``"graph"`` (0 then 1
            of 1; not when ``model`` is a graph already), ``"eigen"`` (0 to 2 of 2),
            ``"k-means"`` (one step per k) and ``"nulls"`` (as ``progress``).
        example_inputs, include_embeddings: as for :func:`~cluster_tracking.graph.weight_graph`.
    """
    started = time.perf_counter()
    config = MeasureConfig(
        k=k, shuffles=shuffles, shuffle=shuffle, seed=seed, n_init=n_init, n_jobs=n_jobs,
        backend=backend, scheduler=scheduler, norm=norm, preset=preset, layers=layers,
        init=init, example_inputs=example_inputs, include_embeddings=include_embeddings,
    )  # fmt: skip
    graph = _weight_graph(model, config, stage)
    timings = {"graph": time.perf_counter() - started}
    root = np.random.SeedSequence(config.seed)
    ks, k_auto = _resolve_ks(config.k, graph, root)
    tick = time.perf_counter()
    observed = spectral_partitions(
        graph, ks, seed=child_seed(root, 0), n_init=config.n_init, preset=preset, stage=stage
    )
    timings["partition"], tick = time.perf_counter() - tick, time.perf_counter()
    nulls = _null_ncuts(graph, model, config, ks, root, progress, stage)
    timings["baseline"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    recorded = _recorded_config(config, observed, k_auto)
    reports = [
        _report(
            graph,
            part,
            None if nulls is None else null_statistics(part.ncut, nulls[:, index], config.shuffle),
            timings,
            {**recorded, "k": part.k},
        )
        for index, part in enumerate(observed)
    ]
    return reports if config.sweep else reports[0]


def _weight_graph(
    model: ModelLike, config: MeasureConfig, stage: StageCallback | None
) -> WeightGraph:
    """The model's weight graph, after the checks that need the model; the null workers start
    (about a third of a second) while this process builds and cuts the graph."""
    if config.shuffle == "random_init" and config.shuffles and not _is_module(model):
        raise ConfigError(
            "shuffle='random_init' re-initialises the model's modules, so it needs a "
            "torch.nn.Module, not a state_dict; use shuffle='layer' for bare weights."
        )
    if config.shuffles and config.uses_worker_processes:
        null_worker_pool(config).release()
    if isinstance(model, WeightGraph):
        graph = model
    else:
        from cluster_tracking.graph import weight_graph  # torch, imported on first use

        if stage is not None:
            stage("graph", 0, 1)
        graph = weight_graph(model, **config.graph_options())
        if stage is not None:
            stage("graph", 1, 1)
    if config.shuffles:
        check_magnitude_blocks(graph.blocks, config.shuffle)
        check_null_backend(graph, config.shuffle, config.resolved_backend)
    return graph


def _null_ncuts(
    graph: WeightGraph,
    model: ModelLike,
    config: MeasureConfig,
    ks: list[int],
    root: np.random.SeedSequence,
    progress: ProgressCallback | None,
    stage: StageCallback | None,
) -> np.ndarray | None:
    """The null networks' n-cuts ``[shuffles, len(ks)]`` (``None`` without a null model), with
    their progress reported to ``progress`` and as the ``"nulls"`` stage."""
    if not config.shuffles:
        return None
    if stage is not None:
        stage("nulls", 0, config.shuffles)
        reported = progress

        def progress(done: int, total: int) -> None:
            assert stage is not None
            stage("nulls", done, total)
            if reported is not None:
                reported(done, total)

    if config.shuffle != "random_init":
        check_shuffle_preconditions(graph.weights(), config.shuffle)
    reinitialised = model if _is_module(model) and config.shuffle == "random_init" else None
    return null_ncuts(graph, reinitialised, config, ks, root, progress)


def _recorded_config(
    config: MeasureConfig, observed: list[SpectralPartition], k_auto: dict[str, Any] | None
) -> dict[str, Any]:
    """The report's ``config``: the settings as resolved for this measurement."""
    ks = [part.k for part in observed]
    recorded: dict[str, Any] = {
        "k": ks[0] if len(ks) == 1 else ks,
        "shuffles": config.shuffles,
        "method": config.shuffle,
        "seed": config.seed,
        "n_init": _resolved_n_init(config.n_init, config.preset, observed),
        "norm": config.norm,
        "preset": config.preset,
        "procedure": config.preset,
        "clustering": CLUSTERING_PROCEDURES[config.preset],
        "layers": config.layers_list(),
        "init": config.init,
        "n_jobs": config.n_jobs,
        "backend": config.resolved_backend,
    }
    if k_auto is not None:
        recorded["k_auto"] = k_auto
    return recorded


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


def _resolve_ks(
    k: int | Sequence[int] | str, graph: WeightGraph, root: np.random.SeedSequence
) -> tuple[list[int], dict[str, Any] | None]:
    """The k to partition at (``k`` validated by :class:`MeasureConfig`), and for ``"auto"``
    the record of the choice: the k in :data:`AUTO_K_RANGE` after the largest eigengap."""
    if isinstance(k, Sequence) and not isinstance(k, str):
        return [int(value) for value in k], None
    if k != "auto":
        return [k], None  # type: ignore[list-item]  # an integer, ranged by spectral_partitions
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
    """Versions of cluster-tracking and of what its numbers depend on (read once per process:
    the package metadata takes about 10 ms to read, a tracker measures many times)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
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
