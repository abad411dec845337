"""``cluster-tracking audit``: the clusterability of saved or logged models, one by one."""

from __future__ import annotations

from typing import Annotated

import typer

from cluster_tracking.cli.guard import cli_errors
from cluster_tracking.cli.options import (
    AllowLongRunOption,
    ArchOption,
    BackendOption,
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
    OutOption,
    Preset,
    PresetOption,
    SchedulerOption,
    SeedOption,
    ShufflesOption,
    StepOption,
    TrackingUriOption,
    TrustOption,
    audit_settings,
)
from cluster_tracking.errors import exit_codes_summary

#: The end of ``audit --help``: examples, and the exit codes in a few words.
AUDIT_EPILOG = (
    "**Examples**\n\n"
    "* cluster-tracking audit model.pt\n"
    "* cluster-tracking audit checkpoints/epoch=9.ckpt --k 8 --shuffles 100\n"
    "* cluster-tracking audit weights.safetensors --layers fc1,fc2,fc3 --json > report.json\n"
    "* cluster-tracking audit runs:/0a1b2c3d4e5f/model --out audit/ --log-to-run\n"
    "* cluster-tracking audit models:/digits-mlp/3 --tracking-uri http://127.0.0.1:5000\n"
    "* cluster-tracking audit models:/digits-mlp@champion --log-to-run\n"
    "* cluster-tracking audit wandb-artifact://team/project/model-abc123:v4\n\n"
    f"Exit codes: {exit_codes_summary()}."
)


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
    out: OutOption = None,
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
    with cli_errors():
        from cluster_tracking.cli.audit_output import run_audit

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
        code = run_audit(
            sources, settings, json_output=json_output, out=out, log_run=log_to_run, step=step
        )
    if code:
        raise typer.Exit(code)
