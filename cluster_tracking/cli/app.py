"""The ``cluster-tracking`` command line: a thin Typer layer over the package's functions.

Each command parses its options, calls one function of the module that implements it (``demo`` ->
:func:`cluster_tracking.cli.demo.run_demo`), and prints the result. Errors a user can cause
(:class:`~cluster_tracking.errors.ClusterTrackingError`) become one red line on stderr and exit
code 2, never a traceback.

To add a command, write its implementation in its own module and add a function here::

    @app.command()
    def audit(source: Annotated[str, typer.Argument(help="...")]) -> None:
        \"\"\"One line for the command list. More lines for its --help.\"\"\"
        with cli_errors():
            from cluster_tracking.audit.run import run_audit
            ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cluster_tracking.errors import ClusterTrackingError, exit_code
from cluster_tracking.resources.limits import MAX_SHUFFLES

if TYPE_CHECKING:
    from rich.console import Console

#: Width of the output when it does not go to a terminal (a file, a pipe) and ``COLUMNS`` does
#: not say otherwise: wide enough that no table or line is wrapped, as it would be at Rich's
#: default of 80 columns.
UNWRAPPED_WIDTH = 1000


def console(*, stderr: bool = False) -> Console:
    """The Rich console the commands print with: the terminal's width on a terminal; elsewhere
    ``$COLUMNS``, or :data:`UNWRAPPED_WIDTH` so that output piped to a file is not wrapped."""
    from rich.console import Console

    made = Console(stderr=stderr, highlight=False, soft_wrap=stderr)
    if not made.is_terminal and not os.environ.get("COLUMNS", "").strip().isdigit():
        made.width = UNWRAPPED_WIDTH
    return made


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


# Click's exception classes, wherever this Typer takes Click from (click, or its vendored copy).
_CLICK_ERRORS = sys.modules[typer.BadParameter.__module__]
_UsageError: type[Exception] = _CLICK_ERRORS.UsageError
_ClickException: type[Exception] = _CLICK_ERRORS.ClickException
_NoArgsIsHelp: type[Exception] | None = getattr(_CLICK_ERRORS, "NoArgsIsHelpError", None)


class _OneLineTyper(typer.Typer):
    """Typer, with every command-line mistake (unknown option, missing source, a value out of
    range) as one line on stderr, ``error: ... (see cluster-tracking COMMAND --help)``, and exit
    code 2, like every other error of the CLI (not Typer's boxed usage message)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        command = typer.main.get_command(self)
        arguments = list(args[0]) if args else kwargs.pop("args", None)
        try:
            code = command.main(
                args=arguments,
                prog_name=kwargs.pop("prog_name", "cluster-tracking"),
                standalone_mode=False,
                **kwargs,
            )
        except _UsageError as error:
            if _NoArgsIsHelp is not None and isinstance(error, _NoArgsIsHelp):
                error.show()  # type: ignore[attr-defined]  # the help page, as Typer shows it
                sys.exit(getattr(error, "exit_code", 2))
            context = getattr(error, "ctx", None)
            where = context.command_path if context is not None else "cluster-tracking"
            message = " ".join(error.format_message().split())  # type: ignore[attr-defined]
            typer.echo(f"error: {message} (see {where} --help)", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("error: interrupted.", err=True)
            sys.exit(130)
        except _ClickException as error:
            message = " ".join(error.format_message().split())  # type: ignore[attr-defined]
            typer.echo(f"error: {message}", err=True)
            sys.exit(getattr(error, "exit_code", 1))
        sys.exit(code if isinstance(code, int) else 0)


app = _OneLineTyper(
    name="cluster-tracking",
    help=(
        "Measure how clusterable neural networks are (Filan et al. 2021, arXiv:2103.03386) and "
        "track it in MLflow or Weights & Biases.\n\n"
        "Start with **cluster-tracking demo**: it trains a small network, tracks its "
        "clusterability every epoch, and logs it to a local MLflow store. Measure models "
        "saved or logged before with **cluster-tracking audit** (checkpoints, MLflow runs and "
        "models, W&B artifacts) and rank many with **cluster-tracking compare**.\n\n"
        "Exit codes of audit and compare: "
        "**0** success; "
        "**1** unexpected internal error (a bug); "
        "**2** bad command line or option value; "
        "**3** source not found or unreadable (missing or corrupt file, unknown URI scheme, "
        "no such run or model, a run without a model, a pickle refused without "
        "--trust-pickle); "
        "**4** the model cannot be measured (no Linear/Conv layers, weights that do not "
        "chain, an unknown --layers name, NaN weights); "
        "**5** MLflow, W&B or the Dask scheduler unreachable, silent, refusing, or not "
        "installed; "
        "**130** interrupted; **143** terminated (SIGTERM). "
        "Usage mistakes are one line and exit 2; the readers' limits (--max-memory, "
        "--shuffles, --jobs) are in cluster-tracking audit --help."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn a :class:`ClusterTrackingError` into one red line on stderr and the exit code of its
    kind (the table in ``--help``: 2 for a bad option, 3 for a source, 4 for a model, 5 for a
    platform), as the audit commands do."""
    try:
        yield
    except ClusterTrackingError as error:
        from rich.markup import escape

        message = " ".join(str(error).split())
        console(stderr=True).print(f"[bold red]error:[/bold red] {escape(message)}")
        raise typer.Exit(exit_code(error)) from None


def _version(value: bool) -> None:
    if value:
        from cluster_tracking import __version__

        typer.echo(f"cluster-tracking {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Measure how clusterable neural networks are and track it in MLflow or W&B."""


@app.command()
def demo(
    epochs: Annotated[
        int,
        typer.Option(
            min=1, max=1000, help="Training epochs; clusterability is measured after each."
        ),
    ] = 8,
    shuffles: Annotated[
        int,
        typer.Option(
            "--shuffles",
            "-n",
            min=0,
            max=MAX_SHUFFLES,
            help="Weight-shuffled networks per measurement (the null model).",
        ),
    ] = 20,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
            "(a local store in the current directory).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of data split, weights, batches and null.")] = 0,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for a local copy of the reports, plots and report.html (one subfolder "
            "per run: runs/RUN_ID/).",
        ),
    ] = "cluster-tracking-demo",
) -> None:
    """Train an MLP on scikit-learn's digits and track its clusterability in MLflow.

    The MLP (64-128-128-10) learns the bundled 8x8 digit images (no download) for a few epochs;
    before training and after every epoch its clusterability is measured (k = 12 clusters,
    n-cut against weight-shuffled networks) and logged to an MLflow run: metrics
    clusterability/ncut, z_score, p_value, ... and plots and report.html as artifacts.
    Prints a table of the measured steps, the run's URL and the command that opens the MLflow
    dashboard. An MLflow server that does not answer fails within seconds (exit 5).
    """
    with cli_errors():  # before torch and mlflow load: a dead server is one line in seconds
        from cluster_tracking.cli.demo import resolve_tracking_uri
        from cluster_tracking.integrations.tracking_uri import check_tracking_uri

        tracking_uri = resolve_tracking_uri(tracking_uri)
        check_tracking_uri(tracking_uri, existing=False)

    from cluster_tracking.audit.run import cli_guard

    with cli_guard(), cli_errors():
        from cluster_tracking.cli.demo import print_demo_result, run_demo

        result = run_demo(
            epochs=epochs, shuffles=shuffles, tracking_uri=tracking_uri, seed=seed, out_dir=out
        )
        print_demo_result(result)


# --------------------------------------------------------------------- audit and compare
# Options shared by both commands; the work is done in cluster_tracking.audit.run.

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

_AUDIT_EPILOG = (
    "**Examples**\n\n"
    "* cluster-tracking audit model.pt\n"
    "* cluster-tracking audit checkpoints/epoch=9.ckpt --k 8 --shuffles 100\n"
    "* cluster-tracking audit weights.safetensors --layers fc1,fc2,fc3 --json > report.json\n"
    "* cluster-tracking audit runs:/0a1b2c3d4e5f/model --out audit/ --log-to-run\n"
    "* cluster-tracking audit models:/digits-mlp/3 --tracking-uri http://127.0.0.1:5000\n"
    "* cluster-tracking audit models:/digits-mlp@champion --log-to-run\n"
    "* cluster-tracking audit wandb-artifact://team/project/model-abc123:v4\n\n"
    "Exit codes: 0 success, 1 internal error, 2 bad option, 3 source not found or unreadable, "
    "4 model cannot be measured, 5 MLflow/W&B unreachable, 130 interrupted, 143 terminated."
)


@app.command(epilog=_AUDIT_EPILOG)
def audit(
    sources: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE",
            help="Models to audit: a .pt/.pth/.bin/.ckpt file (state_dict, checkpoint dict, "
            "Lightning checkpoint or pickled module), .safetensors, a torch.export .pt2, a "
            "folder holding one (or an MLflow model); runs:/RUN_ID/PATH (an artifact or a "
            "model the run logged; runs:/RUN_ID alone: the run's model); "
            "models:/NAME/VERSION, models:/NAME@ALIAS, models:/MODEL_ID; "
            "wandb-artifact://ENTITY/PROJECT/NAME:ALIAS.",
            show_default=False,
        ),
    ],
    k: KOption = "12",
    shuffles: ShufflesOption = 50,
    method: MethodOption = NullMethod.layer,
    seed: SeedOption = 0,
    jobs: JobsOption = -1,
    backend: BackendOption = None,
    scheduler: SchedulerOption = None,
    layers: LayersOption = None,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    norm: NormOption = Norm.l1,
    preset: PresetOption = Preset.default,
    trust_pickle: TrustOption = False,
    tracking_uri: TrackingUriOption = None,
    max_memory: MaxMemoryOption = None,
    allow_long_run: AllowLongRunOption = False,
    json_output: JsonOption = False,
    out: Annotated[
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
    ] = None,
    log_to_run: LogToRunOption = False,
    step: StepOption = None,
) -> None:
    """Audit saved or logged models: n-cut, null model, z-score and p-value of each.

    Reads each model's weights (never running code from the file unless you pass
    --trust-pickle), builds its weight graph (neurons as nodes, |weights| as edges), splits it
    into k clusters by spectral clustering and compares the n-cut with weight-shuffled networks
    (Filan et al. 2021). Prints a table (n-cut, null mean ± std, z, p, nodes, k) with a progress
    bar on a terminal, or the report JSON with --json. Lower n-cut, negative z and small p: more
    clusterable than chance.
    """
    from cluster_tracking.audit.run import cli_guard

    with cli_guard():
        from cluster_tracking.audit.run import (
            AuditSettings,
            parse_k,
            parse_layers,
            parse_shape,
            run_audit,
        )
        from cluster_tracking.resources.limits import parse_size

        settings = AuditSettings(
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
        code = run_audit(
            sources, settings, json_output=json_output, out=out, log_run=log_to_run, step=step
        )
    if code:
        raise typer.Exit(code)


_COMPARE_EPILOG = (
    "**Examples**\n\n"
    "* cluster-tracking compare run1/model.pt run2/model.pt run3/model.pt --csv ranking.csv\n"
    "* cluster-tracking compare --experiment digits --tracking-uri http://127.0.0.1:5000 "
    "--plot ranking.png\n"
    "* cluster-tracking compare --experiment sweep-a --experiment sweep-b --shuffles 20 --json\n\n"
    "A source that fails is reported on stderr and the others are still compared; the exit "
    "code is then that of the first failure (see cluster-tracking --help)."
)


@app.command(epilog=_COMPARE_EPILOG)
def compare(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SOURCE",
            help="Models to compare, as for audit (files, runs:/, models:/, wandb-artifact://).",
            show_default=False,
        ),
    ] = None,
    experiment: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="Also compare every run of this MLflow experiment (name or id; repeatable) that "
            "holds a model: its newest logged model, else an MLflow model or weight file among "
            "its artifacts. Runs without one are listed, not audited.",
            show_default=False,
            rich_help_panel=_SOURCE,
        ),
    ] = None,
    k: KOption = "12",
    shuffles: ShufflesOption = 50,
    method: MethodOption = NullMethod.layer,
    seed: SeedOption = 0,
    jobs: JobsOption = -1,
    backend: BackendOption = None,
    scheduler: SchedulerOption = None,
    layers: LayersOption = None,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    norm: NormOption = Norm.l1,
    preset: PresetOption = Preset.default,
    trust_pickle: TrustOption = False,
    tracking_uri: TrackingUriOption = None,
    max_memory: MaxMemoryOption = None,
    allow_long_run: AllowLongRunOption = False,
    csv: Annotated[
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
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Write a chart of each source's n-cut against its null mean ± std, in table "
            "order (PNG; .pdf and .svg by extension).",
            show_default=False,
            rich_help_panel=_OUTPUT,
        ),
    ] = None,
    json_output: JsonOption = False,
    log_to_run: LogToRunOption = False,
    step: StepOption = None,
) -> None:
    """Audit many models or a whole MLflow experiment and rank them by clusterability.

    Every source is audited as by **audit** (same options) and one table is printed, sorted by
    z-score: the most clusterable model relative to its weight-shuffled networks first.
    """
    from cluster_tracking.audit.run import cli_guard

    with cli_guard():
        from cluster_tracking.audit.run import (
            AuditSettings,
            parse_k,
            parse_layers,
            parse_shape,
            run_compare,
        )
        from cluster_tracking.resources.limits import parse_size

        settings = AuditSettings(
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
        code = run_compare(
            sources or [],
            settings,
            experiments=experiment or [],
            csv_path=csv,
            plot_path=plot,
            json_output=json_output,
            log_run=log_to_run,
            step=step,
        )
    if code:
        raise typer.Exit(code)


if __name__ == "__main__":
    app()
