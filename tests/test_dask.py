"""Null networks on a real Dask cluster (scheduler, 2 workers on 127.0.0.1) match the local run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import cluster_tracking as ct

pytest.importorskip("distributed", reason="the dask extra is part of the test install")


def _dask_command(*args: str) -> list[str]:
    executable = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    assert executable is not None, (
        "the `dask` command is missing: pip install 'cluster-tracking[dask]'"
    )
    return [executable, *args]


@pytest.fixture(scope="module")
def dask_scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("dask")
    scheduler_file = workdir / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    common = {"cwd": workdir, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    processes = [
        subprocess.Popen(
            _dask_command(
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ),
            **common,  # type: ignore[call-overload]
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scheduler_file.exists(), "the dask scheduler did not start within 60 s"
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for _ in range(2):
            processes.append(
                subprocess.Popen(
                    _dask_command(
                        "worker",
                        address,
                        "--host",
                        "127.0.0.1",
                        "--nworkers",
                        "1",
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                    ),
                    **common,  # type: ignore[call-overload]
                )
            )
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.slow
def test_dask_cluster_gives_the_local_numbers(dask_scheduler: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 6)
    )
    local = ct.measure(model, k=4, shuffles=10, seed=3, n_jobs=1)
    remote = ct.measure(model, k=4, shuffles=10, seed=3, backend="dask", scheduler=dask_scheduler)
    assert local.baseline is not None and remote.baseline is not None
    assert remote.ncut == local.ncut
    assert remote.baseline.ncuts == local.baseline.ncuts
    assert remote.baseline.z_score == local.baseline.z_score
    assert remote.config["backend"] == "dask"


def test_unreachable_scheduler_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ct.ConfigError, match="cannot reach the Dask scheduler"):
        ct.measure(model, k=3, shuffles=4, seed=0, backend="dask", scheduler="tcp://127.0.0.1:9")
