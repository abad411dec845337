"""What ``cluster-tracking demo`` prints: the table of its measured steps and where to look next."""

from __future__ import annotations

from cluster_tracking.cli.console import console as make_console
from cluster_tracking.cli.demo import DemoResult
from cluster_tracking.cli.demo_mlflow import dashboard_command, is_server
from cluster_tracking.report import (
    MISSING,
    P_FLOOR_NOTE,
    format_diff,
    format_ncut,
    format_null,
    format_p,
    format_z,
    p_at_floor,
)


def print_demo_result(result: DemoResult) -> None:
    """Print the demo's table (step, n-cut, null, diff, z, p, test accuracy) and where to look
    next: the run's URL and the command that serves it."""
    from rich.table import Table

    console = make_console()
    table = Table(title="Clusterability of an MLP learning digits (k = 12 clusters)")
    for name in ("step", "epoch", "n-cut", "null mean ± std", "diff (rel.)", "z", "p", "test acc."):
        table.add_column(name, justify="right")
    for row in result.rows:
        table.add_row(
            str(row.step),
            "init" if row.epoch is None else str(row.epoch + 1),
            format_ncut(row.ncut),
            format_null(row.baseline),
            format_diff(row.baseline),
            format_z(row.z_score),
            format_p(row.baseline) if row.baseline else MISSING,
            f"{row.test_accuracy:.1%}",
        )
    console.print(table)
    console.print(
        "Lower n-cut = more clusterable; z < 0 and small p: more clusterable than the "
        "weight-shuffled networks. diff = n-cut - null mean."
    )
    if any(row.baseline is not None and p_at_floor(row.baseline) for row in result.rows):
        console.print(P_FLOOR_NOTE)
    if result.skipped_steps:
        listed = ", ".join(str(step) for step in result.skipped_steps)
        console.print(f"Skipped steps (measuring could not keep up): {listed}.")
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    console.print(
        f"MLflow run [bold]{result.run_id}[/bold] in experiment '{result.experiment}' at "
        f"{result.tracking_uri} ({result.seconds:.0f} s).",
        markup=True,
    )
    if not is_server(result.tracking_uri):
        console.print(f"Dashboard: [bold]{dashboard_command(result.tracking_uri)}[/bold]")
    console.print(f"Run:       {result.run_url}", markup=False)
    if result.model_uri:
        console.print(
            f"Model:     {result.model_uri} (cluster-tracking compare --experiment "
            f"{result.experiment} ranks the experiment's runs)",
            markup=False,
        )
    console.print(f"Report:    {result.report_html}", markup=False)
