"""``cluster-tracking compare``: many models, or whole MLflow experiments, ranked by z-score."""

from __future__ import annotations

import typer

from cluster_tracking.cli.guard import cli_errors
from cluster_tracking.cli.options import (
    AllowLongRunOption,
    ArchOption,
    BackendOption,
    CsvOption,
    ExperimentOption,
    InputShapeOption,
    JobsOption,
    JsonOption,
    KOption,
    LayersOption,
    LogToRunOption,
    MaxMemoryOption,
    MethodOption,
    Norm,
    NormOption,
    NullMethod,
    PlotOption,
    Preset,
    PresetOption,
    SchedulerOption,
    SeedOption,
    ShufflesOption,
    SourcesArgument,
    StepOption,
    TrackingUriOption,
    TrustOption,
    audit_settings,
)

#: The end of ``compare --help``: examples, and what happens when a source fails.
COMPARE_EPILOG = (
    "**Examples**\n\n"
    "* cluster-tracking compare run1/model.pt run2/model.pt run3/model.pt --csv ranking.csv\n"
    "* cluster-tracking compare --experiment digits --tracking-uri http://127.0.0.1:5000 "
    "--plot ranking.png\n"
    "* cluster-tracking compare --experiment sweep-a --experiment sweep-b --shuffles 20 --json\n\n"
    "A source that fails is reported on stderr and the others are still compared; the exit "
    "code is then that of the first failure (see cluster-tracking --help)."
)


def compare(
    sources: SourcesArgument = None,
    experiment: ExperimentOption = None,
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
    csv: CsvOption = None,
    plot: PlotOption = None,
    json_output: JsonOption = False,
    log_to_run: LogToRunOption = False,
    step: StepOption = None,
) -> None:
    """Audit many models or a whole MLflow experiment and rank them by clusterability.

    Every source is audited as by **audit** (same options) and one table is printed, sorted by
    z-score: the most clusterable model relative to its weight-shuffled networks first.
    """
    with cli_errors():
        from cluster_tracking.cli.audit_output import run_compare

        settings = audit_settings(
            k=k,
            shuffles=shuffles,
            method=method,
            seed=seed,
            jobs=jobs,
            backend=backend,
            scheduler=scheduler,
            layers=layers,
            arch=arch,
            input_shape=input_shape,
            norm=norm,
            preset=preset,
            trust_pickle=trust_pickle,
            tracking_uri=tracking_uri,
            max_memory=max_memory,
            allow_long_run=allow_long_run,
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
