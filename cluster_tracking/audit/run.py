"""One audit: read a source, build its weight graph, measure its clusterability.

:func:`audit_source` reads a model (:mod:`cluster_tracking.audit.sources`, which never runs code
from the file unless told to), measures it (:func:`~cluster_tracking.measure.measure`: spectral
partition, n-cut, and a null model of weight-shuffled networks, Filan et al. 2021) and returns an
:class:`AuditResult`; a large local safetensors file is measured in bounded memory
(:data:`BOUNDED_MIN_EDGES`). :func:`audit_all` audits several sources, recording a failure and
going on. Results are data: the CLI (:mod:`cluster_tracking.cli.audit_output`) prints them, and
:mod:`cluster_tracking.audit.bundle` and :mod:`cluster_tracking.audit.writeback` write them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cluster_tracking.audit.settings import AuditSettings, check_scheduler
from cluster_tracking.audit.sizing import check_run_size, check_time, weight_extent, workers
from cluster_tracking.audit.sources import LoadedModel, SourceRef, load_source, parse_source
from cluster_tracking.errors import ClusterTrackingError, ConfigError, GraphError, SourceError
from cluster_tracking.graph import WeightGraph
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.resources.limits import current_memory_limit, memory_limit

#: ``progress_for(label)``: the progress callback of one source's null networks, or ``None``.
ProgressFactory = Callable[[str], "Callable[[int, int], None] | None"]


@dataclass
class AuditResult:
    """One audited source.

    Attributes:
        loaded: the weights and where they came from.
        report: the measurement (``config["source"]`` holds the source as given).
        graph: the weight graph that was partitioned (for the heat map).
        seconds: wall time of loading and measuring.
        logged: where ``--log-to-run`` wrote the audit, in words (``None``: not logged).
    """

    loaded: LoadedModel
    report: ClusterabilityReport
    graph: WeightGraph
    seconds: float
    logged: str | None = None

    @property
    def label(self) -> str:
        """Short name of the source for tables."""
        return self.loaded.label


def audit_source(
    source: str | SourceRef,
    settings: AuditSettings,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> AuditResult:
    """Load one source and measure its clusterability.

    Raises:
        SourceError, PlatformError: the source cannot be read.
        GraphError: its weights do not make a weight graph.
        ConfigError: a setting does not fit this model.
    """
    from cluster_tracking.measure import measure

    started = time.perf_counter()
    bounded = _bounded_audit(source, settings, progress)
    if bounded is not None:
        loaded, graph, report = bounded
        return AuditResult(loaded, report, graph, time.perf_counter() - started)
    with memory_limit(settings.max_memory) as limit:
        loaded = load_source(
            source,
            trust_pickle=settings.trust_pickle,
            tracking_uri=settings.tracking_uri,
            max_memory=limit,
        )
    settings = replace(settings, max_memory=limit)
    layers = loaded.layer_names(settings.layers)
    if isinstance(loaded.weights, dict):  # before the graph, whose building allocates by edges
        nodes, edges = weight_extent(loaded.weights)
        check_run_size(nodes, 2 * edges, settings, loaded.label)
    if settings.arch is not None:
        loaded = _with_architecture(loaded, settings.arch)
    is_module = not isinstance(loaded.weights, dict)
    if settings.method == "random_init" and settings.shuffles and not is_module:
        raise ConfigError(
            f"{loaded.label}: --method random_init re-initialises the model's own modules, so it "
            "needs the model itself (a pickled module, with --trust-pickle), not bare weights; "
            "use --method layer."
        )
    graph = _weight_graph(loaded, settings, layers, is_module)
    check_run_size(graph.n_nodes, graph.adjacency.nnz, settings, loaded.label)
    check_time(settings, graph.n_nodes, graph.adjacency.nnz, loaded.label)
    report = measure(
        loaded.weights if settings.method == "random_init" else graph,
        **_measure_options(settings),
        norm=settings.norm,
        layers=layers,
        progress=progress,
    )
    report.config["source"] = loaded.source
    report.config["source_format"] = loaded.format
    return AuditResult(loaded, report, graph, time.perf_counter() - started)


def _with_architecture(loaded: LoadedModel, arch: str) -> LoadedModel:
    """A bare state_dict loaded into the model ``--arch`` names."""
    if not isinstance(loaded.weights, dict):
        raise ConfigError(
            f"{loaded.label} is a model already ({loaded.format}); --arch builds the model "
            "of a bare state_dict: drop it."
        )
    from cluster_tracking.audit.architectures import load_into_architecture

    try:
        model = load_into_architecture(arch, loaded.weights)
    except (ConfigError, SourceError) as error:
        raise type(error)(f"{loaded.label}: {error}") from None
    return replace(loaded, weights=model, format=f"{loaded.format}, as --arch {arch}")


def _weight_graph(
    loaded: LoadedModel, settings: AuditSettings, layers: list[str] | None, is_module: bool
) -> WeightGraph:
    """The weight graph of what was loaded, its errors naming the source."""
    from cluster_tracking.graph import weight_graph

    example = None
    if settings.input_shape is not None and is_module:
        import torch

        example = torch.zeros((1, *settings.input_shape))
    try:
        return weight_graph(
            loaded.weights,
            norm=settings.norm,
            preset=settings.preset,
            layers=layers,
            example_inputs=example,
        )
    except GraphError as error:
        hint = (
            " A state_dict is read as the chain of its Linear/Conv layers in key order: pass "
            "--layers to choose them, or audit the pickled model with --trust-pickle to follow "
            "its real data flow."
            if not is_module and "--arch" not in str(error)
            else ""
        )
        raise GraphError(f"{loaded.label}: {error}{hint}") from None


def _measure_options(settings: AuditSettings) -> dict[str, Any]:
    """The options of :func:`~cluster_tracking.measure.measure` that both audit paths pass."""
    return {
        "k": settings.k,
        "shuffles": settings.shuffles,
        "shuffle": settings.method,
        "seed": settings.seed,
        "n_jobs": settings.jobs,
        "backend": settings.backend,
        "scheduler": settings.scheduler,
        "preset": settings.preset,
    }


#: A local safetensors file whose chain of layers has at least this many edges is audited in
#: bounded memory (:mod:`cluster_tracking.graph.lazy`: float32 magnitudes, no sparse adjacency).
BOUNDED_MIN_EDGES = 1 << 24


def _bounded_extent(
    source: str | SourceRef, settings: AuditSettings
) -> tuple[SourceRef, int, int] | None:
    """``(ref, nodes, edges)`` of a local safetensors file, or Hugging Face model folder
    (without ``--layers``; its size at most, from the headers), large enough for the bounded
    path and measurable there; ``None`` for any other source, which the in-memory path reads."""
    from cluster_tracking.graph.lazy import safetensors_extent
    from cluster_tracking.graph.model_folder import model_folder_size
    from cluster_tracking.nulls.preconditions import MAGNITUDE_SHUFFLES

    ref = source if isinstance(source, SourceRef) else parse_source(source)
    if ref.kind != "file" or ref.path is None:
        return None
    if settings.arch is not None or (
        settings.shuffles and settings.method not in MAGNITUDE_SHUFFLES
    ):
        return None
    try:
        if ref.path.is_dir() and settings.layers is None:
            # a model folder: its traced graph has at most this size (embeddings included)
            n_nodes, n_edges = model_folder_size(ref.path)
        elif ref.path.is_file() and ref.path.suffix.lower() == ".safetensors":
            n_nodes, n_edges = safetensors_extent(ref.path, layers=settings.layers)
        else:
            return None
    except ClusterTrackingError:
        return None  # the in-memory path reports what is wrong with the source, as for any other
    if n_edges < BOUNDED_MIN_EDGES:
        return None
    return ref, n_nodes, n_edges


def _bounded_audit(
    source: str | SourceRef,
    settings: AuditSettings,
    progress: Callable[[int, int], None] | None,
) -> tuple[LoadedModel, WeightGraph, ClusterabilityReport] | None:
    """Audit a large local safetensors file in bounded memory, its peak estimated and checked
    first (a :class:`GraphError`, exit 4, when it would not fit); ``None`` for any other
    source, which the in-memory path reads."""
    from cluster_tracking.graph.lazy import safetensors_graph
    from cluster_tracking.graph.mapped_graph import SafetensorsGraph
    from cluster_tracking.graph.model_folder import model_folder_graph
    from cluster_tracking.measure import measure
    from cluster_tracking.resources.estimate import estimate_peak

    extent = _bounded_extent(source, settings)
    if extent is None:
        return None
    ref, n_nodes, n_edges = extent
    assert ref.path is not None
    folder = ref.path.is_dir()
    if not folder:  # a model folder's own size is known once traced: checked then
        check_time(settings, n_nodes, 2 * n_edges, ref.path.name)  # stored: both directions
    limit = settings.max_memory if settings.max_memory is not None else current_memory_limit()
    stage = getattr(progress, "stage", None)  # the CLI's progress bar shows every stage
    k = 32 if settings.k == "auto" else int(settings.k)
    # With a Dask scheduler the null networks run there (each task maps the file from its
    # path), and when the graph itself does not fit here, its weight blocks stay there too.
    on_dask = settings.backend == "dask" and settings.scheduler is not None
    shuffles = 0 if on_dask else settings.shuffles
    here = estimate_peak(
        n_nodes, n_edges, k=k, shuffles=shuffles, workers=workers(settings) + 1, bipartite=True
    )
    remote = on_dask and here.total > limit and not folder
    if remote:
        assert settings.scheduler is not None
        check_scheduler(settings.scheduler)
    graph: SafetensorsGraph
    common: dict[str, Any] = {
        "preset": settings.preset,
        "k": k,
        "shuffles": shuffles,
        "workers": workers(settings) + 1,
        "max_memory": limit,
        "stage": stage,
    }
    if folder:
        name = ref.path.name
        graph = model_folder_graph(
            ref.path,
            norm=settings.norm,
            before_reading=lambda nodes, edges: check_time(settings, nodes, 2 * edges, name),
            **common,
        )
    else:
        scheduler = settings.scheduler if remote else None
        graph = safetensors_graph(ref.path, layers=settings.layers, scheduler=scheduler, **common)
    where = (
        "kept on the Dask workers, each mapping its layers from the same path"
        if remote
        else "read in bounded memory"
    )
    what = (
        "Hugging Face model folder, traced on the meta device"
        if folder
        else "safetensors state_dict"
    )
    loaded = LoadedModel(
        source=ref.uri,
        label=ref.path.name,
        weights={},
        format=f"{what}, {where} (float32 magnitudes)",
        notes=[f"the weight blocks were {where}: float32 |W|, no sparse adjacency"],
    )
    try:
        report = measure(
            graph,
            **_measure_options(settings),
            progress=None if stage is not None else progress,
            stage=stage,
        )
    finally:
        graph.release()  # the workers free the blocks of a graph kept there
    report.config["source"] = ref.uri
    report.config["source_format"] = loaded.format
    report.config["layers"] = list(settings.layers) if settings.layers else None
    return loaded, graph, report


@dataclass
class AuditFailure:
    """A source that could not be audited (or logged), and why."""

    source: str
    error: ClusterTrackingError


@dataclass
class AuditBatch:
    """The sources of one command: those audited, in order, and those that failed."""

    results: list[AuditResult] = field(default_factory=list)
    failures: list[AuditFailure] = field(default_factory=list)


def audit_all(
    refs: Sequence[SourceRef],
    settings: AuditSettings,
    progress_for: ProgressFactory = lambda label: None,
) -> AuditBatch:
    """Audit every source; with several, a failure is recorded and the others go on (a single
    source's error is raised)."""
    batch = AuditBatch()
    for ref in refs:
        try:
            result = audit_source(ref, settings, progress=progress_for(ref.uri))
        except ClusterTrackingError as error:
            if len(refs) == 1:
                raise
            batch.failures.append(AuditFailure(ref.uri, error))
            continue
        batch.results.append(result)
    return batch


def check_sources(
    sources: Sequence[str], settings: AuditSettings, *, log_run: bool, step: int | None
) -> list[SourceRef]:
    """Validate settings and sources before anything is read.

    Raises:
        ConfigError: a setting, or ``--log-to-run``/``--step`` with these sources, is invalid.
        SourceError: a source is malformed.
        PlatformError: the Dask scheduler does not answer.
    """
    settings.check()
    if step is not None and step < 0:
        raise ConfigError(f"--step must be >= 0, got {step}.")
    if step is not None and not log_run:
        raise ConfigError("--step is the step of --log-to-run's metrics: add --log-to-run.")
    refs = [parse_source(source) for source in sources]
    if settings.backend == "dask" and settings.scheduler is not None and settings.shuffles:
        check_scheduler(settings.scheduler)
    if log_run:
        local = [ref.uri for ref in refs if not ref.remote]
        if local:
            raise ConfigError(
                f"--log-to-run writes into the run that logged the model, so it needs runs:/, "
                f"models:/ or wandb-artifact:// sources; {local[0]!r} is a local file."
            )
    return refs
