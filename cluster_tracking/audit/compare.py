"""``compare``: many audits ranked by z-score, and the MLflow experiments whose runs they come from.

The sources are audited as by :func:`~cluster_tracking.audit.run.audit_all`; this module checks
the command's own options (:func:`check_compare`), lists the runs of experiments that hold a
model (:func:`experiment_runs`, served by the platform registered for ``mlflow``) and orders the
results (:func:`rank_by_z`: most clusterable first, sources without a null model last).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cluster_tracking.audit.registry import platform
from cluster_tracking.audit.run import AuditResult
from cluster_tracking.audit.settings import check_output_paths
from cluster_tracking.errors import ConfigError, PlatformError, SourceError


@dataclass
class ExperimentRuns:
    """The runs of ``--experiment`` that hold a model.

    Attributes:
        sources: the URI of each run's best model, in run order.
        labels: URI -> the run's label (a ``models:/`` URI names no run by itself).
        skipped: the runs without a model (not audited).
        notes: what the user should know (logged models left out because they are not READY).
    """

    sources: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_compare(
    sources: Sequence[str],
    experiments: Sequence[str],
    csv_path: str | os.PathLike[str] | None,
    plot_path: str | os.PathLike[str] | None,
) -> None:
    """Refuse a ``compare`` with nothing to compare, or output files of the wrong kind.

    Raises:
        ConfigError: no source and no experiment, or a ``--csv``/``--plot`` extension.
    """
    if not sources and not experiments:
        raise ConfigError(
            "compare needs sources or --experiment NAME; e.g. cluster-tracking compare a.pt b.pt."
        )
    check_output_paths(
        None if csv_path is None else str(csv_path), None if plot_path is None else str(plot_path)
    )


def experiment_runs(experiments: Sequence[str], tracking_uri: str | None) -> ExperimentRuns:
    """Every run of MLflow ``experiments`` that holds a model: its newest READY logged model,
    else an MLflow model or weight file among its artifacts.

    Raises:
        SourceError: an experiment does not exist, or none of its runs holds a model.
        PlatformError: MLflow cannot be reached (or no installed integration lists experiments).
    """
    mlflow = platform("mlflow")
    if mlflow is None or mlflow.experiment_sources is None:
        raise PlatformError("--experiment needs the MLflow integration of cluster-tracking.")
    runs = ExperimentRuns()
    found, runs.skipped = mlflow.experiment_sources(
        experiments, tracking_uri=tracking_uri, notes=runs.notes
    )
    if not found:
        skipped = runs.skipped
        raise SourceError(
            f"no run of experiment {', '.join(repr(e) for e in experiments)} holds a logged "
            "model or a weight file artifact"
            + (f" (runs: {', '.join(skipped[:10])})." if skipped else " (it has no runs).")
        )
    for uri, label in found:
        runs.labels[uri] = label
        runs.sources.append(uri)
    return runs


def rank_by_z(results: Sequence[AuditResult], labels: dict[str, str]) -> list[AuditResult]:
    """``results`` sorted by z (most clusterable first; without a null model last, by n-cut),
    each ``models:/`` source of an experiment labelled by its run."""
    for result in results:
        if result.loaded.source in labels and result.loaded.source.startswith("models:/"):
            result.loaded.label = labels[result.loaded.source]
    return sorted(results, key=_z_order)


def _z_order(result: AuditResult) -> tuple[int, float, float]:
    baseline = result.report.baseline
    z = baseline.z_score if baseline is not None else None
    if z is None or not math.isfinite(z):
        return (1, 0.0, result.report.ncut)
    return (0, z, result.report.ncut)
