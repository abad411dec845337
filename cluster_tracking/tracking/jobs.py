"""The tracker's jobs in its measuring child process: one snapshot's report and plots, and the
summary artifacts of a run.

The child (:class:`~cluster_tracking.parallel.child.WorkerProcess`) runs them by dotted name
(:data:`MEASURE_STEP`, :data:`RENDER_SUMMARY`), importing this module there; the tracker runs the
same functions in a thread when it has no child. This module imports no torch: the child starts in
well under a second instead of competing with the training loop for the seconds torch takes to
import.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster_tracking.errors import describe
from cluster_tracking.graph.types import WeightGraph
from cluster_tracking.measure import measure
from cluster_tracking.report import ClusterabilityReport, summary_document

if TYPE_CHECKING:
    from torch import nn

#: The dotted name of :func:`measure_step`, for :meth:`WorkerProcess.call
#: <cluster_tracking.parallel.child.WorkerProcess.call>`.
MEASURE_STEP = "cluster_tracking.tracking.jobs:measure_step"
#: The dotted name of :func:`render_summary`.
RENDER_SUMMARY = "cluster_tracking.tracking.jobs:render_summary"
#: The module of the measuring job, for a child to import as it starts (without the plots).
MEASURING_MODULES = MEASURE_STEP.partition(":")[0]
#: The modules the jobs' plots need, for the child to import as it starts (its
#: :data:`~cluster_tracking.parallel.child.PRELOAD_VARIABLE`).
PLOT_MODULES = "cluster_tracking.viz.plots,cluster_tracking.viz.html_report"


def measure_step(
    graph: WeightGraph,
    step: int,
    options: Mapping[str, Any],
    plots: bool,
    module: nn.Module | None = None,
    weights: Sequence[np.ndarray] | None = None,
) -> tuple[ClusterabilityReport, dict[str, bytes], str | None]:
    """Measure one snapshot's weight graph and draw its plots (the worker's job).

    Args:
        graph: the snapshot's weight graph, or with ``weights`` its topology.
        step: its training step.
        options: keyword arguments of :func:`~cluster_tracking.measure.measure` (k, shuffles,
            shuffle, seed, n_jobs, ...).
        plots: draw ``adjacency``, ``cluster_matrix`` and ``composition``.
        module: the model, for the ``random_init`` null model (which re-initialises it).
        weights: the snapshot's weights, one per block of ``graph``: the graph is rebuilt from
            them here (its sparse adjacency assembled in the worker, not in the training
            process, where it would hold the GIL that the training thread needs), and the time
            it takes is the report's ``graph`` timing.

    Returns:
        The report (with its ``step``), PNG bytes by plot name, and the error of the plots, if
        they failed (the report is still good).
    """
    rebuild_seconds = 0.0
    if weights is not None:
        started = time.perf_counter()
        graph = graph.with_weights(weights)
        rebuild_seconds = time.perf_counter() - started
    report = measure(module if module is not None else graph, **options)
    report.step = step
    report.timings["graph"] = report.timings.get("graph", 0.0) + rebuild_seconds
    report.timings["total"] = report.timings.get("total", 0.0) + rebuild_seconds
    images: dict[str, bytes] = {}
    if not plots:
        return report, images, None
    started = time.perf_counter()
    try:
        from cluster_tracking.viz import plots as figures

        images["adjacency"] = figures.png_bytes(
            figures.adjacency_figure(
                graph,
                report.partition.labels,
                title=f"Weight graph ordered by cluster, step {step}",
            )
        )
        images["cluster_matrix"] = figures.png_bytes(
            figures.cluster_matrix_figure(
                figures.cluster_matrix(graph, report.partition.labels),
                title=f"Edge weight between clusters / volume, step {step}",
            )
        )
        images["composition"] = figures.png_bytes(figures.composition_figure(report))
    except Exception as error:
        return report, images, describe(error)
    finally:  # not part of "total" (the measurement): the tracker budgets the plots apart
        report.timings["plots"] = time.perf_counter() - started
    return report, images, None


def render_summary(
    reports: Sequence[ClusterabilityReport],
    last_images: Mapping[str, bytes],
    params: Mapping[str, Any],
    skipped: Sequence[int],
    failed: Sequence[int],
    plots: bool,
) -> tuple[dict[str, bytes], str | None]:
    """The summary artifacts: ``summary.json``, ``trajectory.png`` and ``report.html``.

    Returns:
        File contents by name, and the error of the plots or HTML, if they failed.
    """
    summary = summary_document(reports, params, skipped, failed)
    files = {"summary.json": json.dumps(summary, indent=1, allow_nan=False).encode("utf-8")}
    if not plots:
        return files, None
    try:
        from cluster_tracking.viz import html_report
        from cluster_tracking.viz import plots as figures

        files["trajectory.png"] = figures.png_bytes(
            figures.trajectory_figure(reports, skipped_steps=skipped)
        )
        html = html_report.render_html(
            reports,
            images={"trajectory": files["trajectory.png"], **last_images},
            params=params,
            skipped_steps=skipped,
            failed_steps=failed,
        )
        files["report.html"] = html.encode("utf-8")
    except Exception as error:
        return files, describe(error)
    return files, None
