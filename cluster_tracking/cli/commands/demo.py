"""``cluster-tracking demo``: train a small network and track its clusterability in MLflow."""

from __future__ import annotations

from typing import Annotated

import typer

from cluster_tracking.cli.guard import cli_errors
from cluster_tracking.resources.limits import MAX_SHUFFLES


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
    with cli_errors():
        # The tracking URI is checked before torch and mlflow load: a dead server is one line
        # in seconds.
        from cluster_tracking.cli.demo import resolve_tracking_uri
        from cluster_tracking.integrations.tracking_uri import check_tracking_uri

        tracking_uri = resolve_tracking_uri(tracking_uri)
        check_tracking_uri(tracking_uri, existing=False)

        from cluster_tracking.cli.demo import run_demo
        from cluster_tracking.cli.demo_output import print_demo_result

        result = run_demo(
            epochs=epochs, shuffles=shuffles, tracking_uri=tracking_uri, seed=seed, out_dir=out
        )
        print_demo_result(result)
