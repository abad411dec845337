"""Shared test isolation.

MLflow keeps process-wide state: the active-run stack and the active experiment, which
``mlflow.set_experiment`` caches in a module global *and* writes into
``os.environ["MLFLOW_EXPERIMENT_ID"]``. A test that points MLflow at its own server would otherwise
leave the next test creating runs in an experiment id that only existed there. (Tests that
change the tracking URI restore it themselves.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

_MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
)


@pytest.fixture(autouse=True)
def _restore_mlflow_globals() -> Iterator[None]:
    saved_env = {name: os.environ.get(name) for name in _MLFLOW_ENV}
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.tracking.fluent._active_experiment_id = None
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
