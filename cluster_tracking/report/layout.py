"""What a dashboard reads: the metric keys, the artifact layout and the summary's schema.

Every sink logs the same names (public: dashboards and scripts rely on them):

* at every measured step, the metrics of :data:`METRIC_KEYS` and :data:`SKIPPED_STEPS_METRIC`
  (:func:`logged_metrics`), and under :func:`step_artifact_dir` (``clusterability/step-<step>/``)
  the files of :data:`STEP_ARTIFACTS`;
* at the end, under :data:`ARTIFACT_ROOT` (``clusterability/``), the files of
  :data:`SUMMARY_ARTIFACTS`; ``summary.json`` is :func:`summary_document` (schema
  :data:`~cluster_tracking.report.types.SCHEMA_VERSION`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cluster_tracking.report.types import SCHEMA_VERSION, ClusterabilityReport

#: Folder of every artifact the tracker logs, in every sink.
ARTIFACT_ROOT = "clusterability"

#: Metric keys logged at each measured step.
METRIC_KEYS = (
    "clusterability/ncut",
    "clusterability/z_score",
    "clusterability/p_value",
    "clusterability/shuffle_mean",
    "clusterability/shuffle_std",
    "clusterability/ave_in_out",
)

#: The metric logged with every measurement besides the report's own: how many due steps were
#: skipped so far because measuring could not keep up (see the tracker's ``max_overhead``).
SKIPPED_STEPS_METRIC = f"{ARTIFACT_ROOT}/skipped_steps"

#: The run param (W&B: config key) naming the procedure of the logged numbers (``default`` or
#: ``filan2021``); a sink warns when a run already holds another one.
PROCEDURE_PARAM = "clusterability.procedure"

#: Per-step artifact names the tracker writes (under ``clusterability/step-<step>/``).
STEP_ARTIFACTS = ("report.json", "adjacency.png", "cluster_matrix.png", "composition.png")
#: Summary artifact names written at ``close()`` (under ``clusterability/``).
SUMMARY_ARTIFACTS = ("summary.json", "trajectory.png", "report.html")


def step_artifact_dir(step: int) -> str:
    """The artifact folder of one measured step: ``clusterability/step-<step>``."""
    return f"{ARTIFACT_ROOT}/step-{int(step)}"


def logged_metrics(report: ClusterabilityReport) -> dict[str, float]:
    """The metrics a platform sink logs for one measurement: ``report.metrics()`` and, for a
    tracker's report, :data:`SKIPPED_STEPS_METRIC` (the tracker records it in
    ``report.config["skipped_steps"]``)."""
    metrics = report.metrics()
    skipped = report.config.get("skipped_steps")
    if isinstance(skipped, int) and not isinstance(skipped, bool):
        metrics[SKIPPED_STEPS_METRIC] = float(skipped)
    return metrics


def short_metrics(report: ClusterabilityReport) -> dict[str, float]:
    """``report.metrics()`` without the ``clusterability/`` prefix (``ncut``, ``z_score``...)."""
    return {key.split("/", 1)[1]: value for key, value in report.metrics().items()}


def summary_document(
    reports: Sequence[ClusterabilityReport],
    params: Mapping[str, Any],
    skipped: Sequence[int],
    failed: Sequence[int],
) -> dict[str, Any]:
    """The content of ``clusterability/summary.json`` (schema :data:`SCHEMA_VERSION`).

    Keys: ``schema_version``; ``params`` (the tracker's settings); ``steps`` (the measured
    steps, in order); ``skipped_steps`` and ``failed_steps``; ``trajectory`` (per measured step,
    ``step`` and its :func:`short_metrics`); ``reports`` (every report's JSON form).
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "params": dict(params),
        "steps": [report.step for report in reports],
        "skipped_steps": list(skipped),
        "failed_steps": list(failed),
        "trajectory": [{"step": report.step, **short_metrics(report)} for report in reports],
        "reports": [report.to_dict() for report in reports],
    }
