"""Reaching an MLflow tracking store for audits: the client, its errors, a run's models.

:func:`mlflow_client` fails fast on a server that does not answer (MLflow alone retries for
minutes); :func:`mlflow_error` turns MLflow's exceptions into the package's errors;
:func:`run_model_uris` finds the models a run holds. mlflow is imported only when called, so a
missing package is one :class:`~cluster_tracking.errors.PlatformError` naming the pip extra. Used
by :mod:`cluster_tracking.integrations.mlflow_source`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from cluster_tracking.audit.files import WEIGHT_SUFFIXES
from cluster_tracking.errors import PlatformError, SourceError
from cluster_tracking.graph.safetensors_header import first_line
from cluster_tracking.graph.selection import list_names
from cluster_tracking.integrations.tracking_uri import check_tracking_uri

_MLFLOW_HINT = "pip install 'cluster-tracking[mlflow]'"


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set to ``values`` for the duration, restored after."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def mlflow_client(tracking_uri: str | None = None) -> Iterator[tuple[Any, str]]:
    """``(MlflowClient, tracking URI)`` on ``tracking_uri``, failing fast when the server is down.

    MLflow retries an unanswered request for minutes by default; inside this context it retries
    once (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``, backoff 1 s, 10 s timeout, unless the user set
    them), the artifact progress bars are off, and an HTTP server's ``/health`` is checked
    first (a few seconds at most). A local store (``sqlite:///...``, a folder) must exist: an
    audit never creates one.

    Raises:
        PlatformError: mlflow is not installed, the server does not answer, or the store does
            not exist.
    """
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError as error:
        raise PlatformError(
            f"runs:/ and models:/ sources need the mlflow package: {_MLFLOW_HINT}"
        ) from error
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": os.environ.get(
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"
        ),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    with environment(**settings):
        check_tracking_uri(uri)
        with _mlflow_uris(mlflow, uri):
            yield MlflowClient(tracking_uri=uri, registry_uri=uri), uri


@contextmanager
def _mlflow_uris(mlflow: Any, uri: str) -> Iterator[None]:
    """MLflow's current tracking and registry URIs set to ``uri`` for the duration: some of its
    downloads (``models:/`` URIs) ask the current registry, whatever URI they were given, and
    would otherwise open (and create) the default local store."""
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)


def mlflow_error(error: BaseException, what: str, uri: str) -> SourceError:
    """An MLflow exception as a SourceError (not found) or PlatformError (anything else)."""
    code = getattr(error, "error_code", "")
    message = first_line(getattr(error, "message", None) or error)
    if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
        return SourceError(f"{what} not found at {uri} ({message}).")
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return PlatformError(f"MLflow at {uri} refused access to {what} ({message}).")
    if isinstance(error, (ConnectionError, socket.timeout)) or "Max retries" in message:
        return PlatformError(f"lost the MLflow server at {uri} while reading {what} ({message}).")
    return PlatformError(f"MLflow at {uri} failed to read {what} ({message}).")


def get_run(client: Any, run_id: str, uri: str) -> Any:
    """``client.get_run(run_id)``, its failures as :func:`mlflow_error`."""
    try:
        return client.get_run(run_id)
    except Exception as error:
        raise mlflow_error(error, f"MLflow run {run_id!r}", uri) from error


def run_label(run: Any) -> str:
    """How messages name a run: its name and short id, or its id."""
    name = getattr(run.info, "run_name", None)
    return f"{name} ({run.info.run_id[:8]})" if name else run.info.run_id


def download(uri: str, scratch: str, tracking_uri: str, contents: Any) -> Path:
    """Download an artifact or model URI into ``scratch``; ``contents()`` (if given) says what
    the run holds when nothing is found there."""
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=scratch, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
    except Exception as error:
        code = getattr(error, "error_code", "")
        missing = code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or isinstance(
            error, (FileNotFoundError, OSError)
        )
        if missing and contents is not None:
            raise SourceError(
                f"{uri}: no such artifact or logged model; the run has {contents()}."
            ) from error
        raise mlflow_error(error, uri, tracking_uri) from error
    path = Path(local)
    if not path.exists():
        raise SourceError(f"{uri}: nothing was downloaded.")
    return path


def run_contents(client: Any, run: Any) -> str:
    """What a run holds, for messages: its top-level artifacts and logged models."""
    try:
        artifacts = [item.path for item in client.list_artifacts(run.info.run_id)]
    except Exception:
        artifacts = []
    models = [m.name for m in _logged_models(client, run)]
    return (
        f"artifacts {list_names(artifacts, 20)} and logged models {list_names(models, 20)}"
        if models
        else f"artifacts {list_names(artifacts, 20)}"
    )


def _logged_models(client: Any, run: Any) -> list[Any]:
    """MLflow 3 logged models whose source is ``run``, newest first (none on MLflow 2)."""
    search = getattr(client, "search_logged_models", None)
    if search is None:
        return []
    try:
        found = list(
            search(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run.info.run_id}'",
            )
        )
    except Exception:
        return []
    return sorted(found, key=lambda m: getattr(m, "creation_timestamp", 0) or 0, reverse=True)


def _model_status(model: Any) -> str:
    """A logged model's status as text (``READY``, ``FAILED``, ``PENDING``...)."""
    status = getattr(model, "status", None)
    return str(getattr(status, "value", status) or "UNSPECIFIED").upper()


def run_model_uris(
    client: Any,
    run: Any,
    *,
    max_depth: int = 4,
    max_items: int = 2000,
    notes: list[str] | None = None,
) -> list[str]:
    """The models an MLflow run holds, as URIs, best first.

    In this order: the MLflow 3 logged models of the run (``models:/<model_id>``, newest first)
    whose status is READY, MLflow models among its artifacts (folders with an ``MLmodel`` file),
    then weight files (:data:`WEIGHT_SUFFIXES`) among its artifacts (``runs:/<run_id>/<path>``).
    A logged model that is not READY (FAILED: its ``log_model`` raised; PENDING: still being
    written or abandoned) has no complete files, so it is left out, with one line in ``notes``
    when a list is given. The artifacts under ``clusterability/`` (written by the tracker and by
    audits) are not searched.
    """
    uris: list[str] = []
    for model in _logged_models(client, run):
        status = _model_status(model)
        if status == "READY":
            uris.append(f"models:/{model.model_id}")
        elif notes is not None:
            notes.append(
                f"run {run_label(run)}: logged model {getattr(model, 'name', '')!r} "
                f"({model.model_id}) is {status}, not READY; skipped."
            )
    model_dirs: list[str] = []
    files: list[str] = []
    seen = 0
    pending: list[tuple[str | None, int]] = [(None, 0)]
    while pending and seen < max_items:
        folder, depth = pending.pop(0)
        try:
            items = client.list_artifacts(run.info.run_id, folder)
        except Exception:
            continue
        names = {item.path.rsplit("/", 1)[-1] for item in items}
        if folder is not None and "MLmodel" in names:
            model_dirs.append(folder)
            continue
        for item in items:
            seen += 1
            if item.is_dir:
                if item.path.split("/")[0] != "clusterability" and depth < max_depth:
                    pending.append((item.path, depth + 1))
            elif item.path.lower().endswith(WEIGHT_SUFFIXES):
                files.append(item.path)
    preferred = [f for f in files if f.endswith("state_dict.pth")]
    others = [f for f in files if f not in preferred]
    run_id = run.info.run_id
    return uris + [f"runs:/{run_id}/{path}" for path in (*model_dirs, *preferred, *others)]


def load_pickled_model(folder: Path) -> nn.Module | None:
    """``mlflow.pytorch.load_model`` with pickle allowed; ``None`` if the class is missing."""
    import mlflow.pytorch

    with environment(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="true"):
        try:
            model = mlflow.pytorch.load_model(str(folder), map_location="cpu")
        except (ImportError, AttributeError):
            return None
        except Exception as error:
            raise SourceError(
                f"mlflow.pytorch.load_model failed on {folder.name!r} ({first_line(error)})."
            ) from error
    return model if isinstance(model, nn.Module) else None


# ---------------------------------------------------------------------------------------------
# MLflow runs and registered models
# ---------------------------------------------------------------------------------------------
