"""What ``cluster-tracking audit`` and ``compare`` print: tables, details, progress bars, errors.

The audit package returns data (:class:`~cluster_tracking.audit.run.AuditResult`,
:class:`~cluster_tracking.audit.run.AuditBatch`); :func:`run_audit` and :func:`run_compare` run
a command over it and print the result with Rich: a table (n-cut, null mean ± std, z, p, nodes,
k) or the report JSON (``--json``) on stdout; notes, progress and errors on stderr. They return
the command's exit code (:data:`~cluster_tracking.errors.EXIT_CODES`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster_tracking.audit.bundle import (
    BUNDLE_FILES,
    comparison_figure,
    make_folder,
    out_folders,
    save_figure,
    write_bundle,
    write_csv,
)
from cluster_tracking.audit.compare import check_compare, experiment_runs, rank_by_z
from cluster_tracking.audit.run import (
    AuditBatch,
    AuditFailure,
    AuditResult,
    ProgressFactory,
    audit_all,
    check_sources,
)
from cluster_tracking.audit.settings import AuditSettings, capped_jobs
from cluster_tracking.audit.sources import SourceRef, parse_source
from cluster_tracking.audit.writeback import log_all
from cluster_tracking.cli.console import console, print_error
from cluster_tracking.errors import EXIT_OK, exit_code
from cluster_tracking.report import (
    MISSING,
    P_FLOOR_NOTE,
    format_diff,
    format_ncut,
    format_null,
    format_p,
    format_z,
    mixed_procedures,
    p_at_floor,
)


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
    writes :func:`~cluster_tracking.audit.bundle.write_bundle`'s files into ``out`` (into
    ``out/<source>/`` for several sources), and with ``log_run`` writes the audit back into each
    source's run (:func:`~cluster_tracking.audit.writeback.log_to_run`).

    Returns:
        The exit code: 0, or that of the first source that failed (the others are still audited).

    Raises:
        ClusterTrackingError: a setting or a source is invalid (before anything is measured).
    """
    refs = check_sources(sources, settings, log_run=log_run, step=step)
    settings = _with_capped_jobs(settings)
    if out is not None:
        make_folder(Path(out))
    batch = _audit_with_progress(refs, settings)
    folders: dict[int, Path] = {}
    if out is not None:
        folders = out_folders(batch.results, Path(out))
    for index, result in enumerate(batch.results):
        if index in folders:
            write_bundle(result, folders[index])
        if log_run:
            log_all([result], batch.failures, step=step)
    if json_output:
        _print_json(batch.results)
        for result in batch.results:
            if result.logged:
                _stderr().print(f"logged to {result.logged}", markup=False)
    elif batch.results:
        console = _stdout()
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
    check_compare(listed, experiments, csv_path, plot_path)
    check_sources(listed, settings, log_run=log_run, step=step)
    settings = _with_capped_jobs(settings)
    labels: dict[str, str] = {}
    skipped: list[str] = []
    if experiments:
        runs = experiment_runs(experiments, settings.tracking_uri)
        for note in runs.notes:
            _stderr().print(f"note: {note}", markup=False)
        labels, skipped = runs.labels, runs.skipped
        listed.extend(runs.sources)
    batch = _audit_with_progress([parse_source(source) for source in listed], settings)
    ordered = rank_by_z(batch.results, labels)
    mixed = mixed_procedures(result.report for result in ordered)
    if mixed is not None:
        _stderr().print(f"warning: {mixed}", markup=False)
    if log_run:
        log_all(ordered, batch.failures, step=step)
    if csv_path is not None and ordered:
        write_csv(ordered, csv_path)
    if plot_path is not None and ordered:
        save_figure(comparison_figure(ordered), plot_path)
    if json_output:
        _print_json(ordered)
    elif ordered:
        _print_comparison(ordered, settings, skipped, csv_path, plot_path)
    return _report_failures(batch.failures)


def _print_comparison(
    ordered: Sequence[AuditResult],
    settings: AuditSettings,
    skipped: Sequence[str],
    csv_path: str | os.PathLike[str] | None,
    plot_path: str | os.PathLike[str] | None,
) -> None:
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


def _print_json(results: Sequence[AuditResult]) -> None:
    for result in results:
        sys.stdout.write(result.report.to_json() + "\n")
    sys.stdout.flush()


def _with_capped_jobs(settings: AuditSettings) -> AuditSettings:
    capped, note = capped_jobs(settings)
    if note:
        _stderr().print(f"note: {note}", markup=False)
    return capped


def _audit_with_progress(refs: Sequence[SourceRef], settings: AuditSettings) -> AuditBatch:
    with _progress_bars(settings.shuffles) as progress_for:
        return audit_all(refs, settings, progress_for)


def _report_failures(failures: Sequence[AuditFailure]) -> int:
    for failure in failures:
        print_error(f"{failure.source}: {failure.error}")
    return exit_code(failures[0].error) if failures else EXIT_OK


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
    return console()


def _stderr() -> Any:
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
