"""The examples, run as the README says: every due step they promise lands in the run.

Each example runs as a subprocess, as a user runs it: the MLflow one against a SQLite store in the
test's folder (``MLFLOW_TRACKING_URI``), the W&B one offline (``WANDB_MODE=offline``, every W&B
folder in the test's folder; the run's record log is read back with :mod:`_wandb_offline`). The
steps checked are the ones the examples' docstrings and comments promise, written out here, so a
change of schedule in an example has to be made here too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from _wandb_offline import find_run_dir, read_offline_run
from mlflow import MlflowClient

from cluster_tracking.integrations.wandb import STEP_METRIC, image_caption
from cluster_tracking.report import METRIC_KEYS, SKIPPED_STEPS_METRIC

REPO = Path(__file__).resolve().parents[1]

#: examples/mlflow_training_loop.py: steps 0..300, measured every 50 (300 is on the schedule).
MLFLOW_STEPS = list(range(0, 301, 50))
#: examples/wandb_training_loop.py: steps 0..5999, measured every 1000, and the final weights
#: (5999) at close().
WANDB_STEPS = [*range(0, 6000, 1000), 5999]


def run_example(name: str, cwd: Path, env: dict[str, str]) -> str:
    """Run ``examples/<name>`` with ``env`` in ``cwd``; its stdout."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stdout


def printed_steps(stdout: str) -> list[int]:
    """The steps of the example's ``step <n>  n-cut ...`` lines."""
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("step ")]


@pytest.mark.slow
def test_mlflow_example_logs_every_due_step_up_to_the_last(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MLFLOW_") and not key.startswith("CLUSTER_TRACKING")
    }
    env["MLFLOW_TRACKING_URI"] = uri
    stdout = run_example("mlflow_training_loop.py", tmp_path, env)

    run_id = stdout.split("MLflow run ", 1)[1].split()[0]
    assert printed_steps(stdout) == MLFLOW_STEPS
    assert "skipped" not in stdout
    client = MlflowClient(uri)
    for key in METRIC_KEYS:
        logged = Counter(metric.step for metric in client.get_metric_history(run_id, key))
        assert logged == Counter(MLFLOW_STEPS), f"{key}: every due step, once"
    skipped = client.get_metric_history(run_id, SKIPPED_STEPS_METRIC)
    assert [metric.value for metric in skipped] == [0.0] * len(MLFLOW_STEPS)
    artifacts = {info.path for info in client.list_artifacts(run_id, "clusterability")}
    assert {f"clusterability/step-{step}" for step in MLFLOW_STEPS} <= artifacts
    assert "clusterability/report.html" in artifacts


@pytest.mark.slow
def test_wandb_example_logs_every_due_step_and_the_final_weights(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(
        {
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp_path),
            "WANDB_CACHE_DIR": str(tmp_path / "cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "config"),
            "WANDB_DATA_DIR": str(tmp_path / "data"),
            "WANDB_SILENT": "true",
            "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true",
            "WANDB_BASE_URL": "http://127.0.0.1:9",  # were anything to call out
        }
    )
    stdout = run_example("wandb_training_loop.py", tmp_path, env)

    run_id = stdout.split("W&B run ", 1)[1].split()[0]
    assert printed_steps(stdout) == WANDB_STEPS
    offline = read_offline_run(find_run_dir(tmp_path, run_id))
    for key in METRIC_KEYS:
        # series() fails on a step logged twice
        assert sorted(offline.series(key, STEP_METRIC)) == WANDB_STEPS, key
    assert set(offline.series(SKIPPED_STEPS_METRIC, STEP_METRIC).values()) == {0.0}
    assert offline.summary["clusterability/final_step"] == WANDB_STEPS[-1]
    assert offline.summary["clusterability/final_ncut"] == pytest.approx(
        offline.series("clusterability/ncut", STEP_METRIC)[WANDB_STEPS[-1]]
    )
    # Each measured step's images are in its row, captioned with the step they show; the row
    # lands at the W&B step current when it arrived, never before the step it measured.
    rows = offline.rows_with("clusterability/ncut")
    assert [row[STEP_METRIC] for row in rows] == WANDB_STEPS
    for row in rows:
        assert row["_step"] >= row[STEP_METRIC]
        for name in ("adjacency", "cluster_matrix", "composition"):
            image = row[f"clusterability/{name}"]
            assert image["caption"] == image_caption(row[STEP_METRIC])
            assert (offline.files / image["path"]).stat().st_size > 0
    # the loop's own rows are all there, at their steps
    assert sorted(offline.series("train/loss", "_step")) == list(range(6000))
