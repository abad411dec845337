"""Where ``cluster-tracking demo`` logs: its MLflow experiment, parameters and trained model, and
how to open the run afterwards.

mlflow is imported only when the demo runs (:func:`import_mlflow`), so the CLI checks the tracking
URI first and a dead server is one line within seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster_tracking.errors import SinkError

if TYPE_CHECKING:
    from torch import nn

#: MLflow experiment of the demo's runs.
EXPERIMENT_NAME = "cluster-tracking-demo"
#: The experiment tag MLflow 3's UI reads to choose an experiment's view, and the value of its
#: model-training view (runs, metrics, artifacts) rather than the GenAI view (traces), which
#: MLflow 3 opens for an experiment without it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Name of the trained model the demo logs (an MLflow 3 logged model, torch.export format).
MODEL_NAME = "digits-mlp"
#: Where ``mlflow ui`` serves by default.
MLFLOW_UI_URL = "http://127.0.0.1:5000"


def import_mlflow() -> Any:
    """The ``mlflow`` module; a :class:`~cluster_tracking.errors.SinkError` with the install
    command when it is not installed."""
    from cluster_tracking.integrations.mlflow import INSTALL_HINT

    try:
        import mlflow
    except ImportError as error:
        raise SinkError(
            f"the demo logs to MLflow, which is not installed: {INSTALL_HINT}"
        ) from error
    return mlflow


def open_experiment(mlflow: Any, tracking_uri: str) -> Any:
    """The demo's experiment (:data:`EXPERIMENT_NAME`), made active and tagged for MLflow's
    model-training view; a :class:`~cluster_tracking.errors.SinkError` naming the store when
    MLflow cannot use it."""
    try:
        experiment = mlflow.set_experiment(EXPERIMENT_NAME)
        mlflow.MlflowClient().set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
        )
    except Exception as error:
        raise SinkError(
            f"cannot use the MLflow tracking store {tracking_uri!r}: {str(error).splitlines()[0]}"
        ) from error
    return experiment


def log_demo_params(mlflow: Any, *, epochs: int, batch_size: int, learning_rate: float) -> None:
    """The run's parameters: what the demo trains, on what, and how."""
    mlflow.log_params(
        {
            "demo.model": "MLP 64-128-128-10",
            "demo.dataset": "sklearn load_digits",
            "demo.epochs": epochs,
            "demo.batch_size": batch_size,
            "demo.learning_rate": learning_rate,
        }
    )


def log_model(mlflow: Any, model: nn.Module, example: np.ndarray, notes: list[str]) -> str | None:
    """Log the trained model to the active run (an MLflow 3 logged model, in torch.export form:
    no pickle), so that ``compare --experiment`` finds it; its URI, or ``None`` with a note when
    MLflow refuses it (the run and its clusterability are still complete)."""
    try:
        info = mlflow.pytorch.log_model(
            model, name=MODEL_NAME, input_example=example, pip_requirements=["torch"]
        )
    except Exception as error:
        text = str(error).strip().splitlines()
        notes.append(
            f"the trained model was not logged ({type(error).__name__}: "
            f"{text[0] if text else 'no message'}); compare --experiment will skip this run."
        )
        return None
    model_id = getattr(info, "model_id", None)
    return f"models:/{model_id}" if model_id else str(info.model_uri)


def is_server(tracking_uri: str) -> bool:
    """Whether ``tracking_uri`` is a tracking server (``http(s)://``) rather than a local store."""
    return tracking_uri.startswith(("http://", "https://"))


def mlflow_executable() -> str:
    """The ``mlflow`` command of this environment (``.venv/bin/mlflow`` when run from the
    project), relative to the working directory when it lies inside it; else plain ``mlflow``."""
    found = Path(sys.executable).with_name("mlflow")
    if not found.exists():
        return "mlflow"
    try:
        return str(found.relative_to(Path.cwd()))
    except ValueError:
        return str(found)


def dashboard_command(tracking_uri: str) -> str:
    """How to see a run logged to ``tracking_uri`` in the MLflow UI: for a local store, the
    ``mlflow ui`` command (this environment's ``mlflow``) that serves it on
    :data:`MLFLOW_UI_URL`; for a tracking server, its address."""
    if is_server(tracking_uri):
        return f"open {tracking_uri} in a browser"
    return f"{mlflow_executable()} ui --backend-store-uri {tracking_uri} --port 5000"
