"""MLflow as a source of audits: ``runs:/`` and ``models:/`` URIs, experiments, and write-back.

Registered with the audit's loader registry (:mod:`cluster_tracking.audit.registry`) by
:func:`register_platform`, which the entry points of ``pyproject.toml`` (group
``cluster_tracking.sources``) name: the audit core never imports this module.

Sources:

* ``runs:/<run_id>/<path>``: an artifact of an MLflow run (a weight file, a ``log_state_dict``
  folder, an MLflow model) or, in MLflow 3, a model the run logged under that name;
  ``runs:/<run_id>`` alone takes the run's model
  (:func:`~cluster_tracking.integrations.mlflow_store.run_model_uris`);
* ``models:/<name>/<version>``, ``models:/<name>@<alias>`` (also ``models:/<name>/<alias>``,
  ``.../latest``, ``.../<stage>``) and MLflow 3's ``models:/<model_id>``.

``--log-to-run`` writes an audit back into the run (:func:`log_to_mlflow`); ``compare
--experiment`` audits every run of an experiment that holds a model (:func:`experiment_sources`).
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cluster_tracking.audit.bundle import write_bundle
from cluster_tracking.audit.files import WEIGHT_SUFFIXES
from cluster_tracking.audit.registry import SourcePlatform, register
from cluster_tracking.audit.sources import LoadedModel, RunTarget, SourceRef, load_file
from cluster_tracking.audit.writeback import audit_info
from cluster_tracking.errors import ClusterTrackingError, SourceError
from cluster_tracking.graph.selection import list_names
from cluster_tracking.integrations.mlflow_store import (
    download,
    get_run,
    load_pickled_model,
    mlflow_client,
    mlflow_error,
    run_contents,
    run_label,
    run_model_uris,
)
from cluster_tracking.integrations.tracking_uri import check_tracking_uri_form

if TYPE_CHECKING:
    from cluster_tracking.audit.run import AuditResult

_RUN_ID = re.compile(r"^[A-Za-z0-9_\-]+$")

_STAGES = ("none", "staging", "production", "archived")


def _parse_runs_uri(text: str, rest: str) -> SourceRef:
    path = rest.lstrip("/")
    run_id, _, artifact_path = path.partition("/")
    if not run_id or not _RUN_ID.match(run_id):
        raise SourceError(
            f"malformed MLflow run URI {text!r}; write runs:/<run_id>/<artifact path>, e.g. "
            "runs:/0a1b2c.../model (or runs:/<run_id> for the run's model)."
        )
    return SourceRef(uri=text, kind="mlflow-run", run_id=run_id, artifact_path=artifact_path)


def _parse_models_uri(text: str, rest: str) -> SourceRef:
    parts = rest.lstrip("/").rstrip("/").split("/")
    usage = (
        f"malformed MLflow model URI {text!r}; write models:/<name>/<version>, "
        "models:/<name>@<alias>, models:/<name>/latest or models:/<model_id>."
    )
    if not parts[0] or len(parts) > 2:
        raise SourceError(usage)
    if len(parts) == 2:
        name, suffix = parts
        if not name or not suffix:
            raise SourceError(usage)
        if suffix.isdigit():
            return SourceRef(uri=text, kind="mlflow-model", model_name=name, version=suffix)
        if suffix.lower() == "latest" or suffix.lower() in _STAGES:
            stage = "latest" if suffix.lower() == "latest" else suffix
            return SourceRef(uri=text, kind="mlflow-model", model_name=name, stage=stage)
        return SourceRef(uri=text, kind="mlflow-model", model_name=name, alias=suffix)
    name, at, alias = parts[0].rpartition("@")
    if at:
        if not name or not alias:
            raise SourceError(usage)
        return SourceRef(uri=text, kind="mlflow-model", model_name=name, alias=alias)
    return SourceRef(uri=text, kind="mlflow-model", model_id=parts[0])


def _load_mlflow_run(client: Any, uri: str, ref: SourceRef, *, trust_pickle: bool) -> LoadedModel:
    run = get_run(client, str(ref.run_id), uri)
    label = run_label(run)
    artifact_path = ref.artifact_path.strip("/")
    notes: list[str] = []
    model_id = None
    if not artifact_path:
        found = run_model_uris(client, run)
        if not found:
            raise SourceError(
                f"MLflow run {label} has no logged model and no weight file artifact "
                f"({', '.join(WEIGHT_SUFFIXES)}); log one with mlflow.pytorch.log_model or "
                "mlflow.pytorch.log_state_dict, or name the artifact: runs:/<run_id>/<path>."
            )
        download_uri = found[0]
        if len(found) > 1:
            notes.append(f"the run has {len(found)} models; audited {download_uri}.")
        if download_uri.startswith("models:/"):
            model_id = download_uri.removeprefix("models:/")
        shown = f"{label}"
    else:
        download_uri = f"runs:/{run.info.run_id}/{artifact_path}"
        shown = f"{label}/{artifact_path}"
    with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
        local = download(download_uri, scratch, uri, lambda: run_contents(client, run))
        loaded = load_file(local, trust_pickle=trust_pickle, source=ref.uri)
    loaded.label = shown
    loaded.notes = notes + loaded.notes
    loaded.run = RunTarget(
        platform="mlflow",
        run_id=run.info.run_id,
        tracking_uri=uri,
        model_id=model_id,
        label=label,
    )
    return loaded


def _load_mlflow_model(client: Any, uri: str, ref: SourceRef, *, trust_pickle: bool) -> LoadedModel:
    run_id: str | None
    if ref.model_id is not None:
        try:
            logged = client.get_logged_model(ref.model_id)
        except Exception as error:
            raise mlflow_error(error, f"logged model {ref.model_id!r}", uri) from error
        run_id, model_id = logged.source_run_id, logged.model_id
        download_uri = f"models:/{logged.model_id}"
        label = f"{logged.name} ({logged.model_id})"
    else:
        version = _model_version(client, ref, uri)
        run_id, model_id = version.run_id, getattr(version, "model_id", None)
        source = str(getattr(version, "source", "") or "")
        if model_id is None and re.fullmatch(r"models:/m-[0-9a-f]+", source):
            model_id = source.removeprefix("models:/")  # MLflow 3: registered from a logged model
        download_uri = f"models:/{version.name}/{version.version}"
        label = f"{version.name} v{version.version}"
    with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
        local = download(download_uri, scratch, uri, None)
        loaded = load_file(local, trust_pickle=trust_pickle, source=ref.uri)
    loaded.label = label
    if run_id:
        loaded.run = RunTarget(
            platform="mlflow", run_id=run_id, tracking_uri=uri, model_id=model_id, label=label
        )
    return loaded


def _model_version(client: Any, ref: SourceRef, uri: str) -> Any:
    what = f"registered model {ref.model_name!r}"
    try:
        if ref.version is not None:
            what += f" version {ref.version}"
            return client.get_model_version(ref.model_name, ref.version)
        if ref.alias is not None:
            what += f" alias {ref.alias!r}"
            return client.get_model_version_by_alias(ref.model_name, ref.alias)
        stages = None if ref.stage == "latest" else [ref.stage]
        what += " (latest version)" if stages is None else f" stage {ref.stage!r}"
        versions = client.get_latest_versions(ref.model_name, stages)
    except Exception as error:
        raise mlflow_error(error, what, uri) from error
    if not versions:
        raise SourceError(f"{what} has no versions at {uri}.")
    return max(versions, key=lambda v: int(v.version))


def experiment_sources(
    experiments: Sequence[str],
    *,
    tracking_uri: str | None = None,
    notes: list[str] | None = None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """Every run of MLflow experiments that holds a model: ``([(uri, run label)], skipped)``.

    Each run gives its best model (:func:`run_model_uris`): its newest READY logged model, else
    an MLflow model or weight file among its artifacts. Deleted runs are left out; ``skipped``
    names the runs without any model; logged models left out because they are not READY are
    described in ``notes``, one line each, when a list is given.

    Raises:
        SourceError: an experiment does not exist.
        PlatformError: MLflow cannot be reached.
    """
    from mlflow.entities import ViewType

    found: list[tuple[str, str]] = []
    skipped: list[str] = []
    with mlflow_client(tracking_uri) as (client, uri):
        for name in experiments:
            experiment = _experiment(client, name, uri)
            runs: list[Any] = []
            token = None
            try:
                while True:
                    page = client.search_runs(
                        [experiment.experiment_id],
                        run_view_type=ViewType.ACTIVE_ONLY,
                        max_results=1000,
                        order_by=["attributes.start_time ASC"],
                        page_token=token,
                    )
                    runs.extend(page)
                    token = page.token
                    if not token:
                        break
            except Exception as error:
                raise mlflow_error(error, f"the runs of experiment {name!r}", uri) from error
            for run in runs:
                uris = run_model_uris(client, run, notes=notes)
                if uris:
                    found.append((uris[0], run_label(run)))
                else:
                    skipped.append(run_label(run))
    return found, skipped


def _experiment(client: Any, name: str, uri: str) -> Any:
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None and name.isdigit():
            experiment = client.get_experiment(name)
    except Exception as error:
        code = getattr(error, "error_code", "")
        if code == "RESOURCE_DOES_NOT_EXIST":
            experiment = None
        else:
            raise mlflow_error(error, f"experiment {name!r}", uri) from error
    if experiment is None:
        try:
            names = [e.name for e in client.search_experiments(max_results=50)]
        except Exception:
            names = []
        raise SourceError(
            f"no MLflow experiment named {name!r} at {uri}; experiments there: "
            f"{list_names(names, 20)}."
        )
    return experiment


def load_mlflow_source(
    ref: SourceRef, *, trust_pickle: bool = False, tracking_uri: str | None = None
) -> LoadedModel:
    """Read a ``runs:/`` or ``models:/`` source (see the module docstring).

    Raises:
        SourceError: no such run, artifact or model.
        PlatformError: MLflow cannot be reached, refuses, or is not installed.
    """
    with mlflow_client(tracking_uri) as (client, uri):
        if ref.kind == "mlflow-run":
            return _load_mlflow_run(client, uri, ref, trust_pickle=trust_pickle)
        return _load_mlflow_model(client, uri, ref, trust_pickle=trust_pickle)


#: Artifact folder of ``--log-to-run`` in an MLflow run (``-2``, ``-3``... if taken).
AUDIT_ARTIFACT_DIR = "clusterability/audit"


def log_to_mlflow(result: AuditResult, target: RunTarget, step: int | None) -> str:
    """Write an audit into the MLflow run that logged the model (see
    :func:`~cluster_tracking.audit.writeback.log_to_run`); returns where, in words."""
    from mlflow.entities import Metric

    with mlflow_client(target.tracking_uri) as (client, uri):
        try:
            run = client.get_run(target.run_id)
        except Exception as error:
            raise mlflow_error(error, f"MLflow run {target.run_id!r}", uri) from error
        label = run_label(run)
        if run.info.lifecycle_stage == "deleted":
            raise SourceError(f"MLflow run {label} is deleted; restore it to log into it.")
        try:
            if step is None:
                step = _last_step(client, run)
            folder = _free_folder(client, target.run_id)
            with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
                write_bundle(result, scratch, extra=audit_info(result, step, folder))
                client.log_artifacts(target.run_id, scratch, folder)
            now = int(time.time() * 1000)
            metrics = [
                Metric(key, value, now, step, model_id=target.model_id)
                for key, value in result.report.metrics().items()
            ]
            client.log_batch(target.run_id, metrics=metrics, synchronous=True)
        except ClusterTrackingError:
            raise
        except Exception as error:
            raise mlflow_error(error, f"MLflow run {label}", uri) from error
    return f"MLflow run {label}: metrics clusterability/* at step {step}, artifacts {folder}/"


def _last_step(client: Any, run: Any) -> int:
    """The largest step of any metric of the run (0 without metrics)."""
    last = 0
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        last = max([last, *(int(metric.step) for metric in history)])
    return last


def _free_folder(client: Any, run_id: str) -> str:
    """``clusterability/audit``, or the first of ``-2``, ``-3``... not yet in the run."""
    parent = AUDIT_ARTIFACT_DIR.rsplit("/", 1)[0]
    taken = {item.path for item in client.list_artifacts(run_id, parent)}
    candidate, number = AUDIT_ARTIFACT_DIR, 1
    while candidate in taken:
        number += 1
        candidate = f"{AUDIT_ARTIFACT_DIR}-{number}"
    return candidate


def register_platform() -> None:
    """Register MLflow with the audit's loader registry (what the entry points name)."""
    register(
        SourcePlatform(
            name="mlflow",
            schemes={"runs": _parse_runs_uri, "models": _parse_models_uri},
            kinds=("mlflow-run", "mlflow-model"),
            load=load_mlflow_source,
            log_to_run=log_to_mlflow,
            experiment_sources=experiment_sources,
            check_uri_form=check_tracking_uri_form,
            load_pickled_model=load_pickled_model,
        )
    )
