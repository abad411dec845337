"""The options ``audit`` and ``compare`` share, their closed values, and the settings they make.

Each option is an ``Annotated`` type, so that both commands declare it in one line with the same
flags, help text and ``--help`` panel; :func:`audit_settings` turns the parsed values into the
:class:`~cluster_tracking.audit.settings.AuditSettings` both commands run with.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from cluster_tracking.resources.limits import MAX_SHUFFLES

if TYPE_CHECKING:
    from cluster_tracking.audit.settings import AuditSettings

# Closed option values: Typer lists them in --help and refuses any other value before work
# starts (one line, exit 2). The tests check them against the package's own lists.


class NullMethod(str, Enum):
    """``--method``: the null model (:data:`cluster_tracking.config.NULL_METHODS`)."""

    layer = "layer"
    layer_nonzero = "layer_nonzero"
    layer_nonzero_distribution = "layer_nonzero_distribution"
    layer_all_distribution = "layer_all_distribution"
    layer_all_distribution_dense = "layer_all_distribution_dense"
    random_init = "random_init"


class Norm(str, Enum):
    """``--norm``: the norm of a conv kernel slice as an edge weight."""

    l1 = "l1"
    l2 = "l2"


class Preset(str, Enum):
    """``--preset``: the procedure (:data:`cluster_tracking.config.PRESETS`)."""

    default = "default"
    filan2021 = "filan2021"


class Backend(str, Enum):
    """``--backend``: the joblib backend of the null networks."""

    loky = "loky"
    threading = "threading"
    multiprocessing = "multiprocessing"
    dask = "dask"


# The panels of --help the options are grouped in.
_MEASURE = "Measurement"
_SOURCE = "Reading sources"
_OUTPUT = "Output"

KOption = Annotated[
    str,
    typer.Option(
        "--k",
        "-k",
        metavar="K",
        help="Number of clusters (the paper uses 12), or 'auto': the k in 2..32 with the largest "
        "eigengap of the normalised Laplacian.",
        rich_help_panel=_MEASURE,
    ),
]
ShufflesOption = Annotated[
    int,
    typer.Option(
        "--shuffles",
        "-n",
        help="Weight-shuffled networks in the null model (the paper uses 50-100); 0 skips it "
        f"(no z or p). At most {MAX_SHUFFLES}.",
        rich_help_panel=_MEASURE,
    ),
]
MethodOption = Annotated[
    NullMethod,
    typer.Option(
        help="Null model: layer (permute each weight tensor), layer_nonzero (keep the sparsity "
        "pattern: pruned nets), layer_nonzero_distribution, layer_all_distribution (values "
        "redrawn from a kernel density), layer_all_distribution_dense, or random_init (needs the "
        "pickled model, --trust-pickle).",
        rich_help_panel=_MEASURE,
    ),
]
SeedOption = Annotated[
    int,
    typer.Option(
        help="Seed of every random draw: same seed, same numbers.", rich_help_panel=_MEASURE
    ),
]
JobsOption = Annotated[
    int,
    typer.Option(
        "--jobs",
        "-j",
        help="Parallel workers for the null networks (-1: all cores); more than the CPUs this "
        "process may use are capped to their number, with a note.",
        rich_help_panel=_MEASURE,
    ),
]
MaxMemoryOption = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Memory the readers and the measurement may use, e.g. 2GiB or 512MiB. Sizes a file "
        "declares (tensor shapes, archive members) are checked against it before anything is "
        "allocated, and a run estimated above it is refused, with the estimate. Default: half "
        "the memory available (and of the address space left under ulimit -v).",
        show_default=False,
        rich_help_panel=_SOURCE,
    ),
]
AllowLongRunOption = Annotated[
    bool,
    typer.Option(
        "--allow-long-run",
        help="Measure even when the run is estimated to take more than 6 hours (the estimate "
        "comes from the graph's size, --shuffles, --k and --jobs; without this flag such a run "
        "is refused before it starts, with the estimate and the options that fit).",
        rich_help_panel=_MEASURE,
    ),
]
BackendOption = Annotated[
    Backend | None,
    typer.Option(
        help="joblib backend for the null networks: loky (the default: worker processes kept "
        "alive, this one working too), threading, multiprocessing, or dask (with --scheduler).",
        show_default=False,
        rich_help_panel=_MEASURE,
    ),
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        metavar="ADDRESS",
        help="Dask scheduler for --backend dask, e.g. tcp://127.0.0.1:8786.",
        show_default=False,
        rich_help_panel=_MEASURE,
    ),
]
LayersOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="NAMES",
        help="Layers that make the graph, in data-flow order (repeat the option or separate "
        "names by commas or |): state_dict prefixes such as 0,2,4 or fc1,fc2, or glob patterns "
        "such as 'blocks.*.mlp.*'. Default: the whole model; a bare state_dict is read as a "
        "chain in key order when it is one.",
        show_default=False,
        rich_help_panel=_MEASURE,
    ),
]
ArchOption = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="The architecture of a bare state_dict: a torchvision or timm model name (resnet18, "
        "convnext_atto), or package.module:function of your own code that returns the model. The "
        "weights are loaded into it and its real data flow is followed, instead of reading the "
        "file as a chain of layers.",
        show_default=False,
        rich_help_panel=_MEASURE,
    ),
]
InputShapeOption = Annotated[
    str | None,
    typer.Option(
        metavar="SHAPE",
        help="One example's shape, e.g. 3,224,224: models torch.fx cannot trace (attention, "
        "recurrent layers) are followed with torch.export on zeros of this shape. Hugging Face "
        "and timm models need none.",
        show_default=False,
        rich_help_panel=_MEASURE,
    ),
]
NormOption = Annotated[
    Norm,
    typer.Option(
        help="Norm of a conv kernel slice as an edge weight: l1 or l2.", rich_help_panel=_MEASURE
    ),
]
PresetOption = Annotated[
    Preset,
    typer.Option(
        help="The procedure: default (this package's spectral clustering, whose n-cut is never "
        "worse than scikit-learn's), or filan2021 (the paper's procedure exactly: scikit-learn's "
        "SpectralClustering, the paper's nulls and graph conventions; compare z-scores within "
        "one preset).",
        rich_help_panel=_MEASURE,
    ),
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Unpickle pickled models for real. This RUNS CODE FROM THE FILE: only for files you "
        "trust. Without it nothing from the file is imported or called: state_dicts, "
        "safetensors and torch.export archives are read as data, and a pickled module's "
        "weights are read without its code.",
        rich_help_panel=_SOURCE,
    ),
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking server (http://HOST:PORT) or store of runs:/ and models:/ sources. "
        "Default: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db).",
        show_default=False,
        rich_help_panel=_SOURCE,
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the report JSON instead of the table: one report per source and line, "
        "nothing else on stdout (its config.source names the source).",
        rich_help_panel=_OUTPUT,
    ),
]
LogToRunOption = Annotated[
    bool,
    typer.Option(
        "--log-to-run",
        help="Write the audit back into the run that logged the model (runs:/, models:/ with a "
        "source run, wandb-artifact://): MLflow gets the clusterability/* metrics at --step and "
        "report.json, plots, report.html and audit.json under clusterability/audit/ (audit-2/, "
        "... if taken: nothing in the run is replaced); W&B gets the metrics at the run's next "
        "step and an artifact clusterability-audit-RUN_ID.",
        rich_help_panel=_OUTPUT,
    ),
]
StepOption = Annotated[
    int | None,
    typer.Option(
        help="Step of the metrics --log-to-run writes. Default: the run's last logged step "
        "(0 for a run without metrics).",
        show_default=False,
        rich_help_panel=_OUTPUT,
    ),
]

SourcesArgument = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="SOURCE",
        help="Models to compare, as for audit (files, runs:/, models:/, wandb-artifact://).",
        show_default=False,
    ),
]
ExperimentOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="NAME",
        help="Also compare every run of this MLflow experiment (name or id; repeatable) that "
        "holds a model: its newest logged model, else an MLflow model or weight file among "
        "its artifacts. Runs without one are listed, not audited.",
        show_default=False,
        rich_help_panel=_SOURCE,
    ),
]
OutOption = Annotated[
    str | None,
    typer.Option(
        "--out",
        "-o",
        metavar="DIR",
        help="Also write report.json, adjacency.png (the weight graph ordered by cluster), "
        "composition.png (each layer's neurons by cluster) and a self-contained report.html "
        "into DIR (DIR/SOURCE/ for several sources).",
        show_default=False,
        rich_help_panel=_OUTPUT,
    ),
]
CsvOption = Annotated[
    str | None,
    typer.Option(
        "--csv",
        metavar="FILE",
        help="Write the table as CSV: rank, source, label, ncut, null_mean, null_std, "
        "z_score, p_value, percentile, k, nodes, nodes_clustered, shuffles, method, seed, "
        "read_as.",
        show_default=False,
        rich_help_panel=_OUTPUT,
    ),
]
PlotOption = Annotated[
    str | None,
    typer.Option(
        "--plot",
        metavar="FILE",
        help="Write a chart of each source's n-cut against its null mean ± std, in table "
        "order (PNG; .pdf and .svg by extension).",
        show_default=False,
        rich_help_panel=_OUTPUT,
    ),
]


def audit_settings(
    *,
    k: str,
    shuffles: int,
    method: NullMethod,
    seed: int,
    jobs: int,
    backend: Backend | None,
    scheduler: str | None,
    layers: list[str] | None,
    arch: str | None,
    input_shape: str | None,
    norm: Norm,
    preset: Preset,
    trust_pickle: bool,
    tracking_uri: str | None,
    max_memory: str | None,
    allow_long_run: bool,
) -> AuditSettings:
    """The settings of an audit from the shared options' values (``--k auto``, ``--layers
    a,b``, ``--input-shape 3,224,224`` and ``--max-memory 2GiB`` parsed, with their errors)."""
    from cluster_tracking.audit.settings import AuditSettings, parse_k, parse_layers, parse_shape
    from cluster_tracking.resources.limits import parse_size

    return AuditSettings(
        k=parse_k(k),
        shuffles=shuffles,
        method=method.value,
        seed=seed,
        jobs=jobs,
        backend=None if backend is None else backend.value,
        scheduler=scheduler,
        layers=parse_layers(layers),
        norm=norm.value,
        preset=preset.value,
        trust_pickle=trust_pickle,
        tracking_uri=tracking_uri,
        max_memory=None if max_memory is None else parse_size(max_memory),
        allow_long_run=allow_long_run,
        arch=arch,
        input_shape=parse_shape(input_shape),
    )
