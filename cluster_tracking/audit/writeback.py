"""``--log-to-run``: an audit written back into the run that logged the audited model.

The platform of the run (:attr:`~cluster_tracking.audit.sources.RunTarget.platform`) does the
writing: it registered with :mod:`cluster_tracking.audit.registry`
(:mod:`cluster_tracking.integrations.mlflow_source`,
:mod:`cluster_tracking.integrations.wandb_source`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cluster_tracking.audit.registry import platform
from cluster_tracking.audit.run import AuditFailure
from cluster_tracking.errors import ClusterTrackingError, ConfigError, PlatformError, SourceError

if TYPE_CHECKING:
    from cluster_tracking.audit.run import AuditResult


def log_to_run(result: AuditResult, *, step: int | None = None) -> str:
    """Write the audit back into the run that logged the audited model.

    MLflow: the ``clusterability/*`` metrics of the report at ``step`` (default: the run's last
    logged step, 0 for a run without metrics), linked to the logged model when the source was one;
    and the files of :func:`write_bundle` plus ``audit.json`` under ``clusterability/audit/``
    (``clusterability/audit-2/``, ... when that folder exists: nothing already in the run is
    replaced). No params are written, so an audit never collides with the run's params.

    W&B: resumes the run (``resume="allow"``), logs the metrics at the run's next step (W&B steps
    only grow; ``step`` if given and ahead of the run), and logs the files as a new version of
    the artifact ``clusterability-audit-<run id>`` (type ``clusterability-audit``). Implemented
    against W&B's public API, untested here without a W&B server.

    MLflow's writer is :func:`cluster_tracking.integrations.mlflow_source.log_to_mlflow`, W&B's
    :func:`cluster_tracking.integrations.wandb_source.log_to_wandb`.

    Returns:
        Where it was written, in words.

    Raises:
        ConfigError: the source has no run (a local file, a registered model without a source
            run).
        SourceError, PlatformError: the run cannot be found or written.
    """
    target = result.loaded.run
    if target is None:
        raise SourceError(
            f"{result.label}: --log-to-run needs the run that logged the model, and this source "
            "has none (a local file, or a registered model without a source run)."
        )
    if step is not None and step < 0:
        raise ConfigError(f"--step must be >= 0, got {step}.")
    writer = platform(target.platform)
    if writer is None or writer.log_to_run is None:
        raise PlatformError(
            f"{result.label}: no installed integration writes into {target.platform} runs."
        )
    return writer.log_to_run(result, target, step)


def audit_info(result: AuditResult, step: int | None, folder: str | None) -> dict[str, Any]:
    """``audit.json``: what was audited, how it was read, its metrics, when, and where it was
    logged (``folder``)."""
    from cluster_tracking.measure import versions

    return {
        "source": result.loaded.source,
        "label": result.label,
        "read_as": result.loaded.format,
        "prefix_removed": result.loaded.prefix or None,
        "notes": result.loaded.notes,
        "metrics": result.report.metrics(),
        "step": step,
        "artifact_folder": folder,
        "audited_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def log_all(
    results: Sequence[AuditResult], failures: list[AuditFailure], *, step: int | None
) -> None:
    """:func:`log_to_run` for each result (its ``logged`` set); a failure is appended to
    ``failures`` and the others go on."""
    for result in results:
        try:
            result.logged = log_to_run(result, step=step)
        except ClusterTrackingError as error:
            failures.append(AuditFailure(result.loaded.source, error))
