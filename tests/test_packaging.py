"""The installed distribution as a user's code and tools see it: type-checked by mypy, complete as
a wheel, runnable as ``python -m cluster_tracking``, with its licence."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Third-party packages mypy need not analyse to type-check the user script against
# cluster_tracking (their types become Any): torch alone takes a minute of mypy's time.
_SKIPPED = "torch.*,numpy.*,scipy.*,matplotlib.*,mlflow.*,rich.*,typer.*,sklearn.*,joblib.*"

USER_SCRIPT = """\
from cluster_tracking import ClusterabilityTracker
from cluster_tracking.integrations.mlflow import MlflowSink

tracker = ClusterabilityTracker(sinks=[MlflowSink()], every_n_steps=10)
reveal_type(tracker)
reveal_type(MlflowSink)
MlflowSink(retries="three")
"""


def _outside_the_checkout(tmp_path: Path) -> dict[str, str]:
    """An environment in which only the installed package can be found (no PYTHONPATH, no
    MYPYPATH), for a process started in ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env["HOME"] = str(tmp_path)  # no user-level mypy configuration
    return env


@pytest.mark.slow
def test_mypy_type_checks_a_user_script_against_the_installed_package(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_SCRIPT, encoding="utf-8")
    (tmp_path / "mypy.ini").write_text(f"[mypy]\n[mypy-{_SKIPPED}]\nfollow_imports = skip\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "user.py"],
        cwd=tmp_path,
        env=_outside_the_checkout(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert "import-not-found" not in out and "Cannot find implementation" not in out, out
    assert 'Revealed type is "cluster_tracking.tracking.tracker.ClusterabilityTracker"' in out, out
    assert "-> cluster_tracking.integrations.mlflow.MlflowSink" in out, out
    # the package's types are checked, not taken as Any: the bad argument is the one error
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("user.py:7:"), out
    assert '"retries"' in errors[0] and "arg-type" in errors[0], out


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_the_type_marker(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            *("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"),
            *("-q", "-w", str(tmp_path), str(ROOT)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("cluster_tracking-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"cluster_tracking/{path.relative_to(ROOT / 'cluster_tracking').as_posix()}"
        for path in (ROOT / "cluster_tracking").rglob("*.py")
    } | {
        f"cluster_tracking/integrations/{path.name}"
        for path in (ROOT / "integrations").glob("*.py")
    }
    assert "cluster_tracking/graph/api.py" in expected
    assert "cluster_tracking/integrations/mlflow.py" in expected
    assert expected <= names, sorted(expected - names)
    assert "cluster_tracking/py.typed" in names
    assert not {name for name in names if name.startswith(("tests/", "benchmarks/", "examples/"))}
    assert any(name.endswith("/licenses/LICENSE") for name in names), sorted(names)


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "cluster_tracking", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("cluster-tracking ")
    mistake = subprocess.run(
        [sys.executable, "-m", "cluster_tracking", "audit", "--no-such-option"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert mistake.returncode == 2
    assert mistake.stderr.count("\n") == 1 and "Traceback" not in mistake.stderr


def test_the_declared_mit_licence_ships_as_a_file() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
