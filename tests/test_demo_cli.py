"""``cluster-tracking demo`` through the real CLI, in a subprocess, in an empty directory."""

from __future__ import annotations

import os
import re
import shutil
import socket
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
    command = [found] if found else [sys.executable, "-m", "cluster_tracking"]
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
    mlflow_ui = str(Path(sys.executable).with_name("mlflow"))
    assert f"{mlflow_ui} ui --backend-store-uri sqlite:///mlflow.db --port 5000" in out
    assert (tmp_path / "mlflow.db").exists()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cluster-tracking-demo")
    assert experiment is not None
    # the model-training view in MLflow 3's UI, not the GenAI one (traces)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id in out
    url = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    assert url in out.split()
    run_dir = tmp_path / "cluster-tracking-demo" / run.info.run_id  # each run in its own folder
    assert (run_dir / "clusterability" / "report.html").exists()
    (model,) = client.search_logged_models(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    assert str(model.status) in ("READY", "LoggedModelStatus.READY")
    assert f"models:/{model.model_id}" in out
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
    step_files = {
        a.path for a in client.list_artifacts(run.info.run_id, f"clusterability/step-{steps[-1]}")
    }
    assert f"clusterability/step-{steps[-1]}/cluster_matrix.png" in step_files

    # the demo's own experiment can be compared (it holds the trained model)
    compared = cli(
        "compare",
        "--experiment",
        "cluster-tracking-demo",
        "-n",
        "4",
        "--tracking-uri",
        "sqlite:///mlflow.db",
        cwd=tmp_path,
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "digits-mlp" in compared.stdout


def test_a_dead_tracking_server_is_one_line_and_exit_5(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = cli("demo", "--tracking-uri", f"http://127.0.0.1:{port}", cwd=tmp_path, timeout=120)
    assert result.returncode == 5, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the MLflow server" in lines[0], result.stderr
    assert not (tmp_path / "cluster-tracking-demo").exists()


def test_a_server_address_without_http_is_refused_with_the_fix(tmp_path: Path) -> None:
    result = cli("demo", "--tracking-uri", "127.0.0.1:5123", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "write http://127.0.0.1:5123" in lines[0], result.stderr


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


def _unwrapped(text: str) -> str:
    """A help page without Rich's wrapping and box lines: one space between words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_exit_codes_in_help_and_docs_come_from_the_one_table() -> None:
    from typer.testing import CliRunner

    from cluster_tracking import errors
    from cluster_tracking.cli.app import app

    runner = CliRunner()
    top = _unwrapped(runner.invoke(app, ["--help"], env={"COLUMNS": "150"}).output)
    audit = _unwrapped(runner.invoke(app, ["audit", "--help"], env={"COLUMNS": "150"}).output)
    markdown = errors.exit_codes_markdown().splitlines()
    assert len(markdown) == 2 + len(errors.EXIT_STATUSES)
    for status in errors.EXIT_STATUSES:
        assert getattr(errors, status.name) == status.code  # the constants are the table's
        assert errors.EXIT_CODES[status.code] == status.meaning
        assert f"{status.code} {status.summary}" in top, status
        assert " ".join(status.details.split()) in top, status
        assert f"{status.code} {status.summary}" in audit, status
        assert f"| {status.code} | `{status.name}` | {status.meaning} |" in markdown


def test_exit_code_is_that_of_the_nearest_error_class_in_the_table() -> None:
    from cluster_tracking.errors import (
        ConfigError,
        GraphError,
        LimitError,
        PlatformError,
        SinkError,
        SourceError,
        exit_code,
    )

    class ModelValueError(GraphError, ValueError):
        pass

    class SlowSinkError(SinkError):
        pass

    cases = [
        (LimitError("too big"), 3),  # a SourceError: the source's code, not the generic 2
        (PlatformError("down"), 5),  # a SourceError too, but the platform's class is nearer
        (ModelValueError("odd"), 4),
        (SlowSinkError("no mlflow"), 5),
        (ConfigError("bad k"), 2),
        (SourceError("missing"), 3),
        (RuntimeError("a bug"), 1),
        (KeyboardInterrupt(), 1),  # signals are the guard's, not the table's classes
    ]
    for error, code in cases:
        assert exit_code(error) == code, error


# A command body under the guard, run as the CLI runs it (typer.Exit becomes the exit status).
GUARDED = """
import os, signal, sys
import typer
from cluster_tracking.cli.guard import cli_errors
from cluster_tracking.errors import ConfigError

kind = sys.argv[1]
try:
    with cli_errors():
        if kind == "config":
            raise ConfigError("k must be at least 2,\\n got 1.")
        if kind == "bug":
            raise RuntimeError("first line\\nsecond line")
        if kind == "interrupt":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
except typer.Exit as done:
    sys.exit(done.exit_code)
"""


@pytest.mark.parametrize(
    ("kind", "code", "line"),
    [
        ("config", 2, "error: k must be at least 2, got 1."),
        ("bug", 1, "error: unexpected RuntimeError: first line (a bug; please report it"),
        ("interrupt", 130, "error: interrupted."),
        ("sigterm", 143, "error: terminated."),
    ],
)
def test_the_guard_makes_every_error_one_line_and_its_exit_code(
    tmp_path: Path, kind: str, code: int, line: str
) -> None:
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    env = {key: value for key, value in os.environ.items() if key != "CLUSTER_TRACKING_TRACEBACK"}
    result = subprocess.run(
        [sys.executable, str(script), kind], env=env, capture_output=True, text=True, timeout=60
    )
    lines = [text for text in result.stderr.splitlines() if text.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith(line), result.stderr
