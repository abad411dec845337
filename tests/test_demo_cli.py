"""``cluster-tracking demo`` through the real CLI, in a subprocess, in an empty directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cluster_tracking.report import METRIC_KEYS


def cli(*arguments: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed ``cluster-tracking`` script (or the module when not installed)."""
    script = Path(sys.executable).with_name("cluster-tracking")
    found = str(script) if script.exists() else shutil.which("cluster-tracking")
    command = [found] if found else [sys.executable, "-m", "cluster_tracking.cli"]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["COLUMNS"] = "120"
    return subprocess.run(
        [*command, *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_demo_logs_a_run_to_the_local_mlflow_store(tmp_path: Path) -> None:
    result = cli("demo", "--epochs", "2", "--shuffles", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    out = result.stdout
    assert "n-cut" in out and "test acc." in out
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out
    assert (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "cluster-tracking-demo" / "clusterability" / "report.html").exists()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cluster-tracking-demo")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id in out
    assert run.info.status == "FINISHED"
    ncut = client.get_metric_history(run.info.run_id, "clusterability/ncut")
    steps = sorted(m.step for m in ncut)
    assert len(steps) == 3 and steps[0] == 0  # before training and after each of 2 epochs
    for key in METRIC_KEYS:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == steps
    accuracy = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert max(m.value for m in accuracy) > 0.8  # the MLP did learn the digits
    assert run.data.params["clusterability.k"] == "12"
    assert run.data.params["clusterability.shuffles"] == "4"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "clusterability")}
    assert {f"clusterability/step-{step}" for step in steps} <= artifacts
    assert "clusterability/report.html" in artifacts


def test_help_explains_every_command(tmp_path: Path) -> None:
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "demo" in result.stdout and "Train an MLP" in result.stdout
    demo = cli("demo", "--help", cwd=tmp_path)
    assert demo.returncode == 0
    for option in ("--epochs", "--shuffles", "--tracking-uri", "--seed"):
        assert option in demo.stdout


def test_a_bad_setting_is_one_red_line_and_exit_code_2(tmp_path: Path) -> None:
    result = cli("demo", "--shuffles", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "shuffles=1" in lines[0]
    assert not (tmp_path / "mlflow.db").exists(), "settings are checked before MLflow is touched"
