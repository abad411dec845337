"""``cluster-tracking audit`` and ``compare``: the clusterability of models saved or logged before.

An audit reads a model's weights from a checkpoint, an MLflow run or registered model, or a W&B
artifact (:mod:`cluster_tracking.audit.sources`, which never runs code from the file unless told
to),
measures it (:func:`~cluster_tracking.measure.measure`: spectral partition, n-cut, and a null model
of weight-shuffled networks, Filan et al. 2021) and shows the result:

* a table (n-cut, null mean ± std, z, p, nodes, k), or the report JSON (``--json``);
* with ``--out DIR``: ``report.json``, ``adjacency.png``, ``composition.png`` and a
  self-contained ``report.html``;
* with ``--log-to-run``: the same files and the ``clusterability/*`` metrics written back into the
  run that logged the model (:func:`log_to_run`), next to what is already there.

:func:`run_compare` audits many sources (or every run of MLflow experiments that holds a model)
and sorts them by z-score. The CLI (:mod:`cluster_tracking.cli.app`) is a thin layer over
:func:`run_audit` and :func:`run_compare`; :func:`cli_guard` turns every error into one line on
stderr and the exit code of :data:`EXIT_CODES`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer

from cluster_tracking.audit.sources import (
    LoadedModel,
    PlatformError,
    RunTarget,
    SourceRef,
    experiment_sources,
    load_source,
    mlflow_client,
    parse_source,
)
from cluster_tracking.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_PLATFORM,
    EXIT_SOURCE,
    EXIT_TERMINATED,
    EXIT_USAGE,
    ClusterTrackingError,
    ConfigError,
    GraphError,
    SourceError,
    exit_code,
)
from cluster_tracking.graph import WeightGraph
from cluster_tracking.report import (
    MISSING,
    P_FLOOR_NOTE,
    ClusterabilityReport,
    format_diff,
    format_ncut,
    format_null,
    format_p,
    format_z,
    mixed_procedures,
    p_at_floor,
)
from cluster_tracking.resources.limits import (
    MAX_JOBS_NOTE,
    MAX_SHUFFLES,
    check_run_time,
    cpu_count,
    current_memory_limit,
    format_size,
    memory_limit,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Exit status of ``audit`` and ``compare`` (the codes are :mod:`cluster_tracking.errors`'),
#: and what it means.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "unexpected internal error (a bug; please report it)",
    EXIT_USAGE: "bad command line or option value (unknown option, --shuffles 1 or above "
    f"{MAX_SHUFFLES}, --k above the node count, a malformed tracking URI or scheduler address, a "
    "--plot/--csv extension, a run whose estimated memory passes --max-memory or whose "
    "estimated time passes 6 h without --allow-long-run, --log-to-run on a local file...)",
    EXIT_SOURCE: "source not found or unreadable: missing or corrupt file, not a regular file "
    "(a device, FIFO or socket), a folder too large to search, sizes declared in the file that "
    "it does not hold or that pass --max-memory, a path in MLmodel outside the model's folder, "
    "unknown URI scheme, no such run/model/artifact, a run without a model, a pickle refused "
    "without --trust-pickle",
    EXIT_MODEL: "the model cannot be measured: no Linear/Conv layers, weights that do not chain, "
    "an unknown --layers name, NaN weights, empty or all-zero weights, bool (mask) or integer "
    "(quantized) weights",
    EXIT_PLATFORM: "MLflow, W&B or the Dask scheduler unreachable, silent (10 s at most), "
    "refusing, or not installed; a file store MLflow 3 refuses",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_TERMINATED: "terminated (SIGTERM)",
}

#: Artifact folder of ``--log-to-run`` in an MLflow run (``-2``, ``-3``... if taken).
AUDIT_ARTIFACT_DIR = "clusterability/audit"

#: Files an audit writes (``--out``, ``--log-to-run``).
BUNDLE_FILES = (
    "report.json",
    "adjacency.png",
    "cluster_matrix.png",
    "composition.png",
    "report.html",
)

_BACKENDS = ("threading", "loky", "multiprocessing", "dask")

ProgressFactory = Callable[[str], "Callable[[int, int], None] | None"]


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSettings:
    """How every source of one command is measured and read.

    Attributes:
        k: number of clusters, or ``"auto"`` (the largest eigengap in 2..32).
        shuffles: weight-shuffled networks of the null model (0: none).
        method: the null model (``layer``, ``layer_nonzero``, ``layer_nonzero_distribution``,
            ``layer_all_distribution``, ``random_init``).
        seed: seed of every random draw (same seed, same numbers).
        jobs: parallel workers for the null networks (-1: all cores).
        backend, scheduler: joblib backend, and the Dask scheduler address for ``dask``.
        layers: the layers that make the graph, in data-flow order (``None``: all, as a chain).
        norm, preset: kernel-slice norm for convolutions and graph conventions (see
            :func:`~cluster_tracking.graph.weight_graph`).
        trust_pickle: unpickle pickled models for real (runs code from the file).
        tracking_uri: MLflow tracking server or store of ``runs:/``/``models:/`` sources.
        max_memory: bytes the readers and the run may use (``None``: half the memory available,
            :func:`~cluster_tracking.resources.limits.default_memory_limit`).
        arch: the architecture of a bare state_dict (:mod:`cluster_tracking.audit.architectures`: a
            torchvision or timm name, or ``package.module:function``); the state_dict is loaded
            into it and the model's data flow followed.
        input_shape: one example's shape (``(3, 224, 224)``), for models that ``torch.fx``
            cannot trace: they are followed with ``torch.export`` on ``zeros(1, *input_shape)``.
        allow_long_run: measure even when the run is estimated to take longer than
            :data:`~cluster_tracking.resources.limits.MAX_RUN_SECONDS`
            (:func:`~cluster_tracking.resources.limits.check_run_time`).
    """

    k: int | Literal["auto"] = 12
    shuffles: int = 50
    method: str = "layer"
    seed: int = 0
    jobs: int = -1
    backend: str | None = None
    scheduler: str | None = None
    layers: tuple[str, ...] | None = None
    norm: Literal["l1", "l2"] = "l1"
    preset: Literal["default", "filan2021"] = "default"
    trust_pickle: bool = False
    tracking_uri: str | None = None
    max_memory: int | None = None
    arch: str | None = None
    input_shape: tuple[int, ...] | None = None
    allow_long_run: bool = False

    def check(self) -> None:
        """Validate the settings before any source is read.

        Raises:
            ConfigError: a value is out of range or settings contradict each other.
        """
        from cluster_tracking.config import check_method
        from cluster_tracking.integrations.tracking_uri import check_tracking_uri_form

        if self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int)):
            raise ConfigError(f"--k must be a whole number >= 2 or 'auto', got {self.k!r}.")
        if isinstance(self.k, int) and self.k < 2:
            raise ConfigError(f"--k {self.k}: a partition needs at least 2 clusters.")
        if self.shuffles < 0 or self.shuffles == 1:
            raise ConfigError(
                f"--shuffles {self.shuffles}: a null model needs at least 2 networks to have a "
                "spread (the paper uses 50-100); pass --shuffles 0 to skip it."
            )
        if self.shuffles > MAX_SHUFFLES:
            raise ConfigError(
                f"--shuffles {self.shuffles} is above the limit of {MAX_SHUFFLES} (the paper uses "
                f"50-100; {MAX_SHUFFLES} already resolves p to 1e-4)."
            )
        if self.jobs == 0 or self.jobs < -1:
            raise ConfigError(
                f"--jobs {self.jobs}: give a number of workers >= 1, or -1 for all cores."
            )
        if self.scheduler is not None and not re.fullmatch(
            r"(tcp|tls|ws|wss|ucx)://[^\s/:]+:\d{1,5}/?", self.scheduler
        ):
            raise ConfigError(
                f"--scheduler {self.scheduler!r} is not a Dask scheduler address; write "
                "tcp://HOST:PORT, e.g. tcp://127.0.0.1:8786."
            )
        if self.tracking_uri is not None:
            check_tracking_uri_form(self.tracking_uri)
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError(f"--max-memory must be positive, got {self.max_memory}.")
        try:
            check_method(self.method)
        except ConfigError as error:
            raise ConfigError(str(error).replace("null model", "--method", 1)) from None
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}.")
        if self.backend is not None and self.backend not in _BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(_BACKENDS)}.")
        if self.scheduler is not None and self.backend != "dask":
            raise ConfigError("--scheduler is the address of a Dask scheduler: add --backend dask.")
        if self.norm not in ("l1", "l2"):
            raise ConfigError(f"--norm must be l1 or l2, got {self.norm!r}.")
        if self.preset not in ("default", "filan2021"):
            raise ConfigError(f"--preset must be default or filan2021, got {self.preset!r}.")
        if self.preset == "filan2021" and self.norm != "l1":
            raise ConfigError("--preset filan2021 fixes the kernel norm; drop --norm l2.")


def capped_jobs(settings: AuditSettings) -> tuple[AuditSettings, str | None]:
    """``settings`` with ``--jobs`` capped to the CPUs this process may use, and a note saying
    so (``None`` when nothing changed). A Dask cluster's workers are not local: left as given."""
    cpus = cpu_count()
    if settings.backend == "dask" or settings.jobs <= cpus:
        return settings, None
    note = MAX_JOBS_NOTE.format(asked=settings.jobs, cpus=cpus)
    return replace(settings, jobs=cpus), note


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
    return per_network * (_workers(settings) + 1)


def _workers(settings: AuditSettings) -> int:
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
            f"{n_stored // 2} edges) with {_workers(settings)} worker(s) would need about "
            f"{format_size(estimate)}, more than the memory limit of {format_size(limit)}; "
            "lower --jobs, audit fewer --layers, or raise --max-memory if the machine has it."
        )


def check_scheduler(address: str, timeout: float = 8.0) -> None:
    """Check that a Dask scheduler answers at ``address`` (its handshake) within ``timeout``
    seconds: a port that accepts but never answers would otherwise hang the client.

    Raises:
        PlatformError: nothing answers, or distributed is not installed.
    """
    import asyncio

    try:
        from distributed.comm import connect
    except ImportError as error:
        raise PlatformError(
            "--backend dask needs Dask's distributed scheduler: "
            "pip install 'cluster-tracking[dask]'"
        ) from error

    async def handshake() -> None:
        comm = await connect(address, timeout=timeout / 2)
        await comm.close()

    try:
        asyncio.run(asyncio.wait_for(handshake(), timeout))
    except (asyncio.TimeoutError, TimeoutError) as error:
        raise PlatformError(
            f"the Dask scheduler at {address} did not answer within {timeout:.0f} s; is it a "
            "Dask scheduler, and is it running?"
        ) from error
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error)
        raise PlatformError(
            f"cannot reach the Dask scheduler at {address} ({reason}); start one with `dask "
            "scheduler` or pass the right address."
        ) from error


_PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def check_output_paths(csv_path: str | None, plot_path: str | None) -> None:
    """``--csv`` must end in ``.csv``, ``--plot`` in ``.png``, ``.pdf`` or ``.svg``.

    Raises:
        ConfigError: another extension (the file would hold a format its name does not say).
    """
    if csv_path is not None and Path(csv_path).suffix.lower() != ".csv":
        raise ConfigError(f"--csv {csv_path!r}: the file name must end in .csv.")
    if plot_path is not None and Path(plot_path).suffix.lower() not in _PLOT_SUFFIXES:
        raise ConfigError(
            f"--plot {plot_path!r}: the file name must end in .png, .pdf or .svg (the format is "
            "chosen by it)."
        )


def parse_k(text: str | int) -> int | Literal["auto"]:
    """``--k``: a whole number, or ``auto``."""
    if isinstance(text, int):
        return text
    value = str(text).strip().lower()
    if value == "auto":
        return "auto"
    if not value.isdigit():
        raise ConfigError(f"--k must be a whole number >= 2 or 'auto', got {text!r}.")
    return int(value)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 3,224,224`` as ``(3, 224, 224)``."""
    if text is None:
        return None
    parts = [part.strip() for part in str(text).replace("x", ",").split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ConfigError(
            f"--input-shape must be positive whole numbers separated by commas, e.g. 3,224,224; "
            f"got {text!r}."
        )
    return tuple(int(part) for part in parts)


def parse_layers(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """``--layers``, repeated and/or separated by commas or ``|``, as one tuple of names or glob
    patterns (:mod:`cluster_tracking.graph.selection` expands the patterns)."""
    if not values:
        return None
    names = tuple(
        name.strip()
        for value in values
        for part in str(value).split(",")
        for name in part.split("|")
    )
    names = tuple(name for name in names if name)
    if not names:
        raise ConfigError("--layers names no layer; give layer names, e.g. --layers 0,2,4.")
    return names


# ---------------------------------------------------------------------------------------------
# One audit
# ---------------------------------------------------------------------------------------------


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
    from cluster_tracking.graph import weight_graph
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
    is_module = not isinstance(loaded.weights, dict)
    if isinstance(loaded.weights, dict):  # before the graph, whose building allocates by edges
        nodes, edges = weight_extent(loaded.weights)
        check_run_size(nodes, 2 * edges, settings, loaded.label)
    if settings.arch is not None:
        if not isinstance(loaded.weights, dict):
            raise ConfigError(
                f"{loaded.label} is a model already ({loaded.format}); --arch builds the model "
                "of a bare state_dict: drop it."
            )
        from cluster_tracking.audit.architectures import load_into_architecture

        try:
            model = load_into_architecture(settings.arch, loaded.weights)
        except (ConfigError, SourceError) as error:
            raise type(error)(f"{loaded.label}: {error}") from None
        loaded = replace(
            loaded, weights=model, format=f"{loaded.format}, as --arch {settings.arch}"
        )
        is_module = True
    example = None
    if settings.input_shape is not None and is_module:
        import torch

        example = torch.zeros((1, *settings.input_shape))
    if settings.method == "random_init" and settings.shuffles and not is_module:
        raise ConfigError(
            f"{loaded.label}: --method random_init re-initialises the model's own modules, so it "
            "needs the model itself (a pickled module, with --trust-pickle), not bare weights; "
            "use --method layer."
        )
    try:
        graph = weight_graph(
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
    check_run_size(graph.n_nodes, graph.adjacency.nnz, settings, loaded.label)
    _check_time(settings, graph.n_nodes, graph.adjacency.nnz, loaded.label)
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


def _check_time(settings: AuditSettings, n_nodes: int, n_stored: int, label: str) -> None:
    """Refuse, before any work, a run whose estimated time is absurd (``--allow-long-run`` goes
    ahead anyway; a Dask cluster's speed is unknown, so it is not estimated)."""
    if not settings.allow_long_run and settings.backend != "dask":
        check_run_time(
            n_nodes,
            n_stored,
            shuffles=settings.shuffles,
            ks=[12 if settings.k == "auto" else int(settings.k)],
            jobs=max(_workers(settings), 1),
            preset=settings.preset,
            label=label,
        )


#: A local safetensors file whose chain of layers has at least this many edges is audited in
#: bounded memory (:mod:`cluster_tracking.graph.lazy`: float32 magnitudes, no sparse adjacency).
BOUNDED_MIN_EDGES = 1 << 24


def _bounded_audit(
    source: str | SourceRef,
    settings: AuditSettings,
    progress: Callable[[int, int], None] | None,
) -> tuple[LoadedModel, WeightGraph, ClusterabilityReport] | None:
    """Audit a large local safetensors file in bounded memory, its peak estimated and checked
    first (a :class:`GraphError`, exit 4, when it would not fit); ``None`` for any other
    source, which the in-memory path reads."""
    from cluster_tracking.graph.lazy import safetensors_extent, safetensors_graph
    from cluster_tracking.measure import measure
    from cluster_tracking.nulls.preconditions import MAGNITUDE_SHUFFLES
    from cluster_tracking.resources.estimate import estimate_peak

    ref = source if isinstance(source, SourceRef) else parse_source(source)
    if ref.kind != "file" or ref.path is None or ref.path.suffix.lower() != ".safetensors":
        return None
    if settings.arch is not None or (
        settings.shuffles and settings.method not in MAGNITUDE_SHUFFLES
    ):
        return None
    try:
        if not ref.path.is_file():
            return None
        n_nodes, n_edges = safetensors_extent(ref.path, layers=settings.layers)
    except ClusterTrackingError:
        return None  # the in-memory path reports what is wrong with the file, as for any other
    if n_edges < BOUNDED_MIN_EDGES:
        return None
    _check_time(settings, n_nodes, 2 * n_edges, ref.path.name)  # stored entries: both directions
    limit = settings.max_memory if settings.max_memory is not None else current_memory_limit()
    stage = getattr(progress, "stage", None)  # the CLI's progress bar shows every stage
    k = 32 if settings.k == "auto" else int(settings.k)
    # With a Dask scheduler the null networks run there (each task maps the file from its
    # path), and when the graph itself does not fit here, its weight blocks stay there too.
    on_dask = settings.backend == "dask" and settings.scheduler is not None
    here = estimate_peak(
        n_nodes,
        n_edges,
        k=k,
        shuffles=0 if on_dask else settings.shuffles,
        workers=_workers(settings) + 1,
        bipartite=True,
    )
    remote = on_dask and here.total > limit
    if remote:
        assert settings.scheduler is not None
        check_scheduler(settings.scheduler)
    graph = safetensors_graph(
        ref.path,
        layers=settings.layers,
        preset=settings.preset,
        k=k,
        shuffles=0 if on_dask else settings.shuffles,
        workers=_workers(settings) + 1,
        max_memory=limit,
        stage=stage,
        scheduler=settings.scheduler if remote else None,
    )
    where = (
        "kept on the Dask workers, each mapping its layers from the same path"
        if remote
        else "read in bounded memory"
    )
    loaded = LoadedModel(
        source=ref.uri,
        label=ref.path.name,
        weights={},
        format=f"safetensors state_dict, {where} (float32 magnitudes)",
        notes=[f"the layers were {where}: float32 |W|, no sparse adjacency"],
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


# ---------------------------------------------------------------------------------------------
# Files: --out and --log-to-run
# ---------------------------------------------------------------------------------------------


def write_bundle(
    result: AuditResult, folder: str | os.PathLike[str], *, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write the audit's files into ``folder`` (created if missing).

    ``report.json`` (the :class:`~cluster_tracking.report.ClusterabilityReport`), ``adjacency.png``
    (the weight graph ordered by cluster), ``cluster_matrix.png`` (edge weight between clusters
    over volume, k x k), ``composition.png`` (each layer's neurons by cluster), ``report.html``
    (self-contained, the images embedded), and ``audit.json`` when ``extra`` is given (what was
    audited, when, and where it was logged).

    Returns:
        File name -> path.
    """
    from cluster_tracking.viz.html_report import write_html
    from cluster_tracking.viz.plots import (
        adjacency_figure,
        cluster_matrix,
        cluster_matrix_figure,
        composition_figure,
        png_bytes,
    )

    target = _make_folder(Path(folder))
    report = result.report
    graph = result.graph
    if not graph.assembled:  # a bounded-memory audit: the heat map needs the sparse adjacency
        needed = 3 * 12 * sum(block.weight.size for block in graph.blocks)
        if needed > current_memory_limit():
            raise ConfigError(
                f"{result.label}: the adjacency heat map of --out/--log-to-run needs the sparse "
                f"adjacency, about {format_size(needed)}, more than the memory limit of "
                f"{format_size(current_memory_limit())}; audit fewer --layers for the files, or "
                "drop --out/--log-to-run."
            )
        graph = graph.assemble()
    images = {
        "adjacency": png_bytes(
            adjacency_figure(
                graph,
                report.partition.labels,
                title=f"{result.label}: weight graph ordered by cluster",
            )
        ),
        "cluster_matrix": png_bytes(
            cluster_matrix_figure(cluster_matrix(result.graph, report.partition.labels))
        ),
        "composition": png_bytes(
            composition_figure(report, title=f"{result.label}: clusters by layer (k = {report.k})")
        ),
    }
    written = {
        "report.json": target / "report.json",
        "adjacency.png": target / "adjacency.png",
        "cluster_matrix.png": target / "cluster_matrix.png",
        "composition.png": target / "composition.png",
        "report.html": target / "report.html",
    }
    try:
        written["report.json"].write_text(report.to_json(indent=2) + "\n", encoding="utf-8")
        written["adjacency.png"].write_bytes(images["adjacency"])
        written["cluster_matrix.png"].write_bytes(images["cluster_matrix"])
        written["composition.png"].write_bytes(images["composition"])
        write_html(
            written["report.html"],
            [report],
            images=images,
            params=_params(result),
            title=f"Clusterability audit: {result.label}",
        )
        if extra is not None:
            written["audit.json"] = target / "audit.json"
            written["audit.json"].write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot write into {str(target)!r} ({error.strerror}).") from None
    return written


def _make_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the folder {str(folder)!r} ({error.strerror or error})."
        ) from None
    return folder


def _params(result: AuditResult) -> dict[str, Any]:
    config = result.report.config
    params: dict[str, Any] = {
        "source": result.loaded.source,
        "read as": result.loaded.format,
    }
    if result.loaded.prefix:
        params["prefix removed"] = result.loaded.prefix
    for key in ("k", "shuffles", "method", "seed", "layers", "norm", "preset"):
        if config.get(key) is not None:
            params[key] = config[key]
    return params


def log_to_run(result: AuditResult, *, step: int | None = None) -> str:
    """Write the audit back into the run that logged the audited model.

    MLflow: the ``clusterability/*`` metrics of the report at ``step`` (default: the run's last
    logged step, 0 for a run without metrics), linked to the logged model when the source was one;
    and the files of :func:`write_bundle` plus ``audit.json`` under ``clusterability/audit/``
    (``clusterability/audit-2/``, ... when that folder exists: nothing already in the run is
    replaced). No params are written, so an audit never collides with the run's params.

    W&B: resumes the run (``resume="allow"``), logs the metrics at the run's next step (W&B steps
    only grow; ``step`` if given and ahead of the run), and logs the files as a new version of
    the artifact ``clusterability-audit-<run id>`` (type ``clusterability-audit``). Implemented
    against W&B's public API, untested here without a W&B server.

    Returns:
        Where it was written, in words.

    Raises:
        ConfigError: the source has no run (a local file, a registered model without a source
            run).
        SourceError, PlatformError: the run cannot be found or written.
    """
    target = result.loaded.run
    if target is None:
        raise SourceError(
            f"{result.label}: --log-to-run needs the run that logged the model, and this source "
            "has none (a local file, or a registered model without a source run)."
        )
    if step is not None and step < 0:
        raise ConfigError(f"--step must be >= 0, got {step}.")
    if target.platform == "wandb":
        return _log_to_wandb(result, target, step)
    return _log_to_mlflow(result, target, step)


def _audit_info(result: AuditResult, step: int | None, folder: str | None) -> dict[str, Any]:
    from cluster_tracking.measure import versions

    return {
        "source": result.loaded.source,
        "label": result.label,
        "read_as": result.loaded.format,
        "prefix_removed": result.loaded.prefix or None,
        "notes": result.loaded.notes,
        "metrics": result.report.metrics(),
        "step": step,
        "artifact_folder": folder,
        "audited_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def _log_to_mlflow(result: AuditResult, target: RunTarget, step: int | None) -> str:
    from mlflow.entities import Metric

    from cluster_tracking.audit.sources import _mlflow_error, _run_label

    with mlflow_client(target.tracking_uri) as (client, uri):
        try:
            run = client.get_run(target.run_id)
        except Exception as error:
            raise _mlflow_error(error, f"MLflow run {target.run_id!r}", uri) from error
        label = _run_label(run)
        if run.info.lifecycle_stage == "deleted":
            raise SourceError(f"MLflow run {label} is deleted; restore it to log into it.")
        try:
            if step is None:
                step = _last_step(client, run)
            folder = _free_folder(client, target.run_id)
            with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
                write_bundle(result, scratch, extra=_audit_info(result, step, folder))
                client.log_artifacts(target.run_id, scratch, folder)
            now = int(time.time() * 1000)
            metrics = [
                Metric(key, value, now, step, model_id=target.model_id)
                for key, value in result.report.metrics().items()
            ]
            client.log_batch(target.run_id, metrics=metrics, synchronous=True)
        except ClusterTrackingError:
            raise
        except Exception as error:
            raise _mlflow_error(error, f"MLflow run {label}", uri) from error
    return f"MLflow run {label}: metrics clusterability/* at step {step}, artifacts {folder}/"


def _last_step(client: Any, run: Any) -> int:
    """The largest step of any metric of the run (0 without metrics)."""
    last = 0
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        last = max([last, *(int(metric.step) for metric in history)])
    return last


def _free_folder(client: Any, run_id: str) -> str:
    """``clusterability/audit``, or the first of ``-2``, ``-3``... not yet in the run."""
    parent = AUDIT_ARTIFACT_DIR.rsplit("/", 1)[0]
    taken = {item.path for item in client.list_artifacts(run_id, parent)}
    candidate, number = AUDIT_ARTIFACT_DIR, 1
    while candidate in taken:
        number += 1
        candidate = f"{AUDIT_ARTIFACT_DIR}-{number}"
    return candidate


def _log_to_wandb(result: AuditResult, target: RunTarget, step: int | None) -> str:
    """Resume the W&B run that logged the artifact and log the audit into it (public API)."""
    try:
        import wandb
    except ImportError as error:
        raise PlatformError(
            "logging to a W&B run needs the wandb package: pip install 'cluster-tracking[wandb]'"
        ) from error
    try:
        run = wandb.init(
            entity=target.entity,
            project=target.project,
            id=target.run_id,
            resume="allow",
            settings=wandb.Settings(silent=True, console="off", init_timeout=30),
        )
    except Exception as error:
        raise PlatformError(
            f"cannot resume the W&B run {target.label} ({str(error).splitlines()[0][:200]})."
        ) from error
    try:
        name = f"clusterability-audit-{target.run_id}"
        with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
            info = _audit_info(result, step, name)
            write_bundle(result, scratch, extra=info)
            artifact = wandb.Artifact(name, type="clusterability-audit", metadata=info)
            artifact.add_dir(scratch)
            if step is not None and step > int(run.step or 0):
                run.log(result.report.metrics(), step=step)
            else:
                run.log(result.report.metrics())
            run.log_artifact(artifact)
            logged_step = run.step
        run.finish()
    except ClusterTrackingError:
        raise
    except Exception as error:
        raise PlatformError(
            f"logging the audit to the W&B run {target.label} failed "
            f"({str(error).splitlines()[0][:200]})."
        ) from error
    return (
        f"W&B run {target.label}: metrics clusterability/* near step {logged_step}, artifact {name}"
    )


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------


@dataclass
class _Failure:
    source: str
    error: ClusterTrackingError


@dataclass
class _Batch:
    results: list[AuditResult] = field(default_factory=list)
    failures: list[_Failure] = field(default_factory=list)


def run_audit(
    sources: Sequence[str],
    settings: AuditSettings,
    *,
    json_output: bool = False,
    out: str | os.PathLike[str] | None = None,
    log_run: bool = False,
    step: int | None = None,
) -> int:
    """``cluster-tracking audit``: measure each source and print the result.

    Prints a table (or, with ``json_output``, one report JSON per source and line on stdout),
    writes :func:`write_bundle`'s files into ``out`` (into ``out/<source>/`` for several
    sources), and with ``log_run`` writes the audit back into each source's run
    (:func:`log_to_run`).

    Returns:
        The exit code: 0, or that of the first source that failed (the others are still audited).

    Raises:
        ClusterTrackingError: a setting or a source is invalid (before anything is measured).
    """
    refs = _check_sources(sources, settings, log_run=log_run, step=step)
    settings = _with_capped_jobs(settings)
    if out is not None:
        _make_folder(Path(out))
    batch = _audit_all(refs, settings)
    console = _stdout()
    folders: dict[int, Path] = {}
    if out is not None:
        folders = _out_folders(batch.results, Path(out))
    for index, result in enumerate(batch.results):
        if index in folders:
            write_bundle(result, folders[index])
        if log_run:
            try:
                result.logged = log_to_run(result, step=step)
            except ClusterTrackingError as error:
                batch.failures.append(_Failure(result.loaded.source, error))
    if json_output:
        for result in batch.results:
            sys.stdout.write(result.report.to_json() + "\n")
        sys.stdout.flush()
        for result in batch.results:
            if result.logged:
                _stderr().print(f"logged to {result.logged}", markup=False)
    elif batch.results:
        console.print(_table(batch.results, settings, title="Clusterability audit"))
        _print_details(console, batch.results, folders)
    return _report_failures(batch.failures)


def run_compare(
    sources: Sequence[str],
    settings: AuditSettings,
    *,
    experiments: Sequence[str] = (),
    csv_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    json_output: bool = False,
    log_run: bool = False,
    step: int | None = None,
) -> int:
    """``cluster-tracking compare``: audit many sources, print them sorted by z-score.

    ``experiments`` adds every run of those MLflow experiments that holds a model (its newest
    logged model, else an MLflow model or weight file among its artifacts). The table is sorted
    by z (most clusterable first; sources without a null model last). ``csv_path`` writes the
    table as CSV, ``plot_path`` a chart of each source's n-cut against its null mean ± std.

    Returns:
        The exit code: 0, or that of the first source that failed (the others are still audited).
    """
    listed = list(sources)
    labels: dict[str, str] = {}
    skipped: list[str] = []
    if not listed and not experiments:
        raise ConfigError(
            "compare needs sources or --experiment NAME; e.g. cluster-tracking compare a.pt b.pt."
        )
    check_output_paths(
        None if csv_path is None else str(csv_path), None if plot_path is None else str(plot_path)
    )
    _check_sources(listed, settings, log_run=log_run, step=step)
    settings = _with_capped_jobs(settings)
    if experiments:
        notes: list[str] = []
        found, skipped = experiment_sources(
            experiments, tracking_uri=settings.tracking_uri, notes=notes
        )
        for note in notes:
            _stderr().print(f"note: {note}", markup=False)
        if not found:
            raise SourceError(
                f"no run of experiment {', '.join(repr(e) for e in experiments)} holds a logged "
                "model or a weight file artifact"
                + (f" (runs: {', '.join(skipped[:10])})." if skipped else " (it has no runs).")
            )
        for uri, label in found:
            labels[uri] = label
            listed.append(uri)
    refs = [parse_source(source) for source in listed]
    batch = _audit_all(refs, settings)
    for result in batch.results:
        if result.loaded.source in labels and result.loaded.source.startswith("models:/"):
            result.loaded.label = labels[result.loaded.source]
    ordered = sorted(batch.results, key=_z_order)
    mixed = mixed_procedures(result.report for result in ordered)
    if mixed is not None:
        _stderr().print(f"warning: {mixed}", markup=False)
    if log_run:
        for result in ordered:
            try:
                result.logged = log_to_run(result, step=step)
            except ClusterTrackingError as error:
                batch.failures.append(_Failure(result.loaded.source, error))
    if csv_path is not None and ordered:
        write_csv(ordered, csv_path)
    if plot_path is not None and ordered:
        _save_figure(comparison_figure(ordered), plot_path)
    if json_output:
        for result in ordered:
            sys.stdout.write(result.report.to_json() + "\n")
        sys.stdout.flush()
    elif ordered:
        console = _stdout()
        console.print(_table(ordered, settings, title="Clusterability comparison", rank=True))
        console.print(
            "Sorted by z: most clusterable first. Lower n-cut = more clusterable; z < 0 and "
            "small p: more clusterable than its weight-shuffled networks. diff = n-cut - null "
            "mean."
        )
        floor = _floor_note(ordered)
        if floor:
            console.print(floor)
        if skipped:
            console.print(f"Runs without a model (not audited): {', '.join(skipped)}.")
        for result in ordered:
            if result.logged:
                console.print(f"Logged to {result.logged}.", markup=False)
        if csv_path is not None:
            console.print(f"CSV:  {csv_path}", markup=False)
        if plot_path is not None:
            console.print(f"Plot: {plot_path}", markup=False)
    return _report_failures(batch.failures)


def _check_sources(
    sources: Sequence[str], settings: AuditSettings, *, log_run: bool, step: int | None
) -> list[SourceRef]:
    """Validate settings and sources before anything is read."""
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


def _with_capped_jobs(settings: AuditSettings) -> AuditSettings:
    capped, note = capped_jobs(settings)
    if note:
        _stderr().print(f"note: {note}", markup=False)
    return capped


def _audit_all(refs: Sequence[SourceRef], settings: AuditSettings) -> _Batch:
    """Audit every source; with several, a failure is recorded and the others go on."""
    batch = _Batch()
    with _progress_bars(settings.shuffles) as progress_for:
        for ref in refs:
            try:
                result = audit_source(ref, settings, progress=progress_for(ref.uri))
            except ClusterTrackingError as error:
                if len(refs) == 1:
                    raise
                batch.failures.append(_Failure(ref.uri, error))
                continue
            batch.results.append(result)
    return batch


def _report_failures(failures: Sequence[_Failure]) -> int:
    for failure in failures:
        _print_error(f"{failure.source}: {failure.error}")
    return exit_code(failures[0].error) if failures else EXIT_OK


def _z_order(result: AuditResult) -> tuple[int, float, float]:
    baseline = result.report.baseline
    z = baseline.z_score if baseline is not None else None
    if z is None or not math.isfinite(z):
        return (1, 0.0, result.report.ncut)
    return (0, z, result.report.ncut)


def _out_folders(results: Sequence[AuditResult], out: Path) -> dict[int, Path]:
    if len(results) == 1:
        return {0: out}
    folders: dict[int, Path] = {}
    used: set[str] = set()
    for index, result in enumerate(results):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", result.label).strip("-.")[:80] or "source"
        name, number = slug, 1
        while name in used:
            number += 1
            name = f"{slug}-{number}"
        used.add(name)
        folders[index] = out / name
    return folders


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "rank",
    "source",
    "label",
    "ncut",
    "null_mean",
    "null_std",
    "z_score",
    "p_value",
    "percentile",
    "k",
    "nodes",
    "nodes_clustered",
    "shuffles",
    "method",
    "seed",
    "read_as",
)


def write_csv(results: Sequence[AuditResult], path: str | os.PathLike[str]) -> Path:
    """The comparison table as CSV (columns :data:`CSV_COLUMNS`, rows in the given order)."""
    target = Path(path)
    try:
        if target.parent != Path():
            target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for rank, result in enumerate(results, start=1):
                report, baseline = result.report, result.report.baseline
                writer.writerow(
                    [
                        rank,
                        result.loaded.source,
                        result.label,
                        report.ncut,
                        _cell(baseline.mean if baseline else None),
                        _cell(baseline.std if baseline else None),
                        _cell(baseline.z_score if baseline else None),
                        _cell(baseline.p_value if baseline else None),
                        _cell(baseline.percentile if baseline else None),
                        report.k,
                        report.nodes.total,
                        report.nodes.clustered,
                        report.config.get("shuffles"),
                        report.config.get("method"),
                        report.config.get("seed"),
                        result.loaded.format,
                    ]
                )
    except OSError as error:
        raise ConfigError(
            f"cannot write the CSV file {str(target)!r} ({error.strerror})."
        ) from None
    return target


def _cell(value: float | None) -> str | float:
    return "" if value is None or not math.isfinite(value) else value


def comparison_figure(results: Sequence[AuditResult], *, title: str | None = None) -> Figure:
    """Each source's n-cut (dot) against its null model's mean ± one std (grey bar), in order."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [result.label for result in results]
    positions = np.arange(len(results))
    figure = Figure(figsize=(min(4.0 + 0.55 * len(results), 18.0), 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    with_null = [
        (position, result.report.baseline)
        for position, result in zip(positions, results, strict=True)
        if result.report.baseline is not None
    ]
    if with_null:
        axes.errorbar(
            [position for position, _ in with_null],
            [baseline.mean for _, baseline in with_null],
            yerr=[baseline.std for _, baseline in with_null],
            fmt="s",
            color="tab:gray",
            ecolor="tab:gray",
            capsize=4,
            markersize=5,
            label="null mean ± std",
        )
    axes.plot(
        positions,
        [result.report.ncut for result in results],
        "o",
        color="tab:blue",
        markersize=7,
        label="n-cut",
    )
    rotation = 0 if len(results) <= 4 and max(map(len, labels), default=0) <= 18 else 30
    axes.set_xticks(positions, labels, rotation=rotation, ha="right" if rotation else "center")
    axes.set_ylabel("n-cut (lower = more clusterable)")
    axes.set_xlim(-0.6, len(results) - 0.4)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8, loc="best")
    axes.set_title(title or "Clusterability by source (sorted by z)", fontsize=10)
    figure.tight_layout()
    return figure


def _save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    suffix = target.suffix.lower().lstrip(".")
    try:
        if target.parent != Path():
            target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, format=suffix if suffix in ("png", "pdf", "svg") else "png", dpi=100)
    except OSError as error:
        raise ConfigError(f"cannot write the plot {str(target)!r} ({error.strerror}).") from None
    return target


def _table(
    results: Sequence[AuditResult], settings: AuditSettings, *, title: str, rank: bool = False
) -> Any:
    from rich.table import Table

    null = (
        f"{settings.shuffles} {settings.method} shuffles" if settings.shuffles else "no null model"
    )
    table = Table(title=f"{title} (k = {settings.k}, {null}, seed {settings.seed})")
    if rank:
        table.add_column("#", justify="right")
    table.add_column("source", overflow="fold")
    table.add_column("n-cut", justify="right")
    table.add_column("null mean ± std", justify="right")
    table.add_column("diff (rel.)", justify="right")
    table.add_column("z", justify="right")
    table.add_column("p", justify="right")
    table.add_column("nodes", justify="right")
    table.add_column("k", justify="right")
    for index, result in enumerate(results, start=1):
        report, baseline = result.report, result.report.baseline
        nodes = str(report.nodes.clustered)
        if report.nodes.removed:
            nodes += f" (+{report.nodes.removed} isolated)"
        row = [
            _escape(result.label),
            format_ncut(report.ncut),
            format_null(baseline),
            format_diff(baseline),
            format_z(baseline.z_score) if baseline else MISSING,
            format_p(baseline),
            nodes,
            str(report.k),
        ]
        table.add_row(*([str(index)] if rank else []), *row)
    return table


def _print_details(console: Any, results: Sequence[AuditResult], folders: dict[int, Path]) -> None:
    console.print(
        "Lower n-cut = more clusterable; z < 0 and small p: more clusterable than its "
        "weight-shuffled networks (Filan et al. 2021). diff = n-cut - null mean."
    )
    floor = _floor_note(results)
    if floor:
        console.print(floor)
    for index, result in enumerate(results):
        layers = " → ".join(f"{layer.name} ({layer.width})" for layer in result.report.layers[:10])
        if len(result.report.layers) > 10:
            layers += f" → ... ({len(result.report.layers)} layers)"
        console.print(
            f"[bold]{_escape(result.label)}[/bold]: {_escape(result.loaded.format)}; "
            f"layers {_escape(layers)}; {result.seconds:.1f} s."
        )
        for note in result.loaded.notes:
            console.print(f"  note: {_escape(note)}")
        if index in folders:
            console.print(f"  wrote {', '.join(BUNDLE_FILES)} to {_escape(str(folders[index]))}")
        if result.logged:
            console.print(f"  logged to {_escape(result.logged)}")


def _floor_note(results: Sequence[AuditResult]) -> str | None:
    """The table's footnote when one of its p-values sits at its floor ``1 / (n + 1)``."""
    if any(r.report.baseline is not None and p_at_floor(r.report.baseline) for r in results):
        return P_FLOOR_NOTE
    return None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _stdout() -> Any:
    from cluster_tracking.cli.app import console

    return console()


def _stderr() -> Any:
    from cluster_tracking.cli.app import console

    return console(stderr=True)


@contextmanager
def _progress_bars(shuffles: int) -> Iterator[ProgressFactory]:
    """A progress bar per source on stderr while its null networks are measured (only when
    stderr is a terminal: scripts and logs get no progress output)."""
    console = _stderr()
    if not console.is_terminal:
        yield lambda label: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:

        def factory(label: str) -> Callable[[int, int], None]:
            return _SourceBar(progress, label, shuffles)

        yield factory


class _SourceBar:
    """One source's progress bar: ``bar(done, total)`` for its null networks, and
    ``bar.stage(name, done, total)`` for the stages of a large audit (reading, eigen...)."""

    def __init__(self, progress: Any, label: str, shuffles: int) -> None:
        self.progress, self.label = progress, label
        self.task = progress.add_task(f"{label}: shuffles", total=shuffles or None)

    def __call__(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def stage(self, name: str, done: int, total: int) -> None:
        self.progress.update(  # shown at once: a stage may pass between two auto-refreshes
            self.task,
            description=f"{self.label}: {name}",
            completed=done,
            total=total,
            refresh=True,
        )


# ---------------------------------------------------------------------------------------------
# Errors and exit codes
# ---------------------------------------------------------------------------------------------


def _print_error(message: str) -> None:
    from rich.markup import escape

    text = " ".join(message.split())
    _stderr().print(f"[bold red]error:[/bold red] {escape(text)}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises :class:`KeyboardInterrupt`, so that
    both stop the same way (workers stopped, one line); exit code 143."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _descendants() -> list[int]:
    """Process ids of this process's children and their children (Linux ``/proc``)."""
    parents: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    found: list[int] = []
    pending = [os.getpid()]
    while pending:
        for child in parents.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def stop_workers(grace: float = 2.0) -> None:
    """Stop every worker process this command started (joblib's loky executor, the null
    workers, their helpers): SIGTERM, then SIGKILL after ``grace`` seconds."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    if executor is not None:
        try:
            executor.shutdown(wait=False, kill_workers=True)
        except Exception:  # best effort: the processes are signalled below anyway
            pass
    children = _descendants()
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (a grandchild) or already reaped
                done = pid if not os.path.exists(f"/proc/{pid}") else 0
            if done:
                children.remove(pid)
        time.sleep(0.05)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, os.WNOHANG)
        except OSError:
            pass


@contextmanager
def cli_guard() -> Iterator[None]:
    """Run a command: third-party chatter silenced, every error one red line and an exit code.

    A :class:`~cluster_tracking.errors.ClusterTrackingError` exits with its code of
    :data:`EXIT_CODES`; Ctrl-C with 130 and SIGTERM with 143, after the workers were stopped;
    anything else (a bug) with 1, still as one line (set ``CLUSTER_TRACKING_TRACEBACK=1`` to see
    the traceback).
    """
    quiet = ("mlflow", "alembic", "urllib3", "wandb", "matplotlib", "torch")
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    previous_int = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except typer.Exit:
        raise
    except ClusterTrackingError as error:
        _print_error(str(error))
        raise typer.Exit(exit_code(error)) from None
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        if main_thread:  # a second signal must not interrupt the clean-up
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_workers()
        _print_error("terminated." if terminated else "interrupted.")
        raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
    except Exception as error:
        if os.environ.get("CLUSTER_TRACKING_TRACEBACK"):
            raise
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        _print_error(
            f"unexpected {type(error).__name__}: {first} (a bug; please report it, with the "
            "traceback from CLUSTER_TRACKING_TRACEBACK=1)."
        )
        raise typer.Exit(EXIT_INTERNAL) from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if main_thread and previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def exit_codes_help() -> str:
    """The exit codes, as Markdown for ``--help``."""
    return "\n".join(f"* **{code}**: {meaning}" for code, meaning in EXIT_CODES.items())
