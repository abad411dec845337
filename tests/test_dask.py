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

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# Large models on Dask: the weights travel as a path, never as arrays
# ---------------------------------------------------------------------------------------------


def _llama_file(folder: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    from tests.test_large_models import _llama_state_dict

    state = _llama_state_dict(torch.bfloat16, seed=seed)
    path = folder / "model.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.slow
def test_null_networks_of_a_file_map_it_from_its_path_on_the_workers(
    dask_scheduler: str, tmp_path: Path
) -> None:
    """Each null network is a Dask task that maps the weights from the file's path on its
    worker: the local numbers for the same seed, and a file changed under that path after the
    graph was read is refused there, not measured (it would be if the weights travelled)."""
    from cluster_tracking.errors import SourceError
    from cluster_tracking.graph.lazy import safetensors_graph
    from tests.test_large_models import MLP_LAYERS

    path, _ = _llama_file(tmp_path)
    graph = safetensors_graph(path, layers=MLP_LAYERS)
    assert graph.source is not None and graph.source.path == str(path.absolute())
    local = ct.measure(graph, k=6, shuffles=6, seed=3, n_jobs=1)
    stages: list[tuple[str, int, int]] = []
    remote = ct.measure(
        graph,
        k=6,
        shuffles=6,
        seed=3,
        backend="dask",
        scheduler=dask_scheduler,
        stage=lambda name, done, total: stages.append((name, done, total)),
    )
    assert local.baseline is not None and remote.baseline is not None
    assert remote.baseline.ncuts == local.baseline.ncuts
    assert remote.baseline.z_score == local.baseline.z_score
    assert remote.ncut == local.ncut
    assert stages[-1] == ("nulls", 6, 6)

    _llama_file(tmp_path, seed=1)  # the same shapes, other weights, at the same path
    with pytest.raises(SourceError, match="not the file being measured"):
        ct.measure(graph, k=6, shuffles=6, seed=3, backend="dask", scheduler=dask_scheduler)
    path.unlink()
    with pytest.raises(SourceError, match="no such file on this Dask worker"):
        ct.measure(graph, k=6, shuffles=6, seed=3, backend="dask", scheduler=dask_scheduler)


@pytest.mark.slow
def test_null_networks_of_a_model_folder_give_the_local_numbers_on_dask(
    dask_scheduler: str, tmp_path: Path
) -> None:
    """A Hugging Face folder's graph (read in bounded memory; its blocks are not single stored
    tensors, so the weights travel to the tasks): the local numbers for the same seed."""
    from _tiny_models import tiny_llama

    from cluster_tracking.graph.model_folder import model_folder_graph

    tiny_llama().save_pretrained(tmp_path / "llama")
    graph = model_folder_graph(tmp_path / "llama")
    local = ct.measure(graph, k=4, shuffles=6, seed=3, n_jobs=1)
    remote = ct.measure(graph, k=4, shuffles=6, seed=3, backend="dask", scheduler=dask_scheduler)
    assert local.baseline is not None and remote.baseline is not None
    assert remote.ncut == local.ncut
    assert remote.partition.labels == local.partition.labels
    assert remote.baseline.ncuts == local.baseline.ncuts


@pytest.fixture(scope="module")
def limited_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    """A LocalCluster of 2 worker processes on 127.0.0.1 whose per-worker memory limit lies
    between what a worker keeping half the model's layers needs and what measuring the whole
    model in one process needs (both estimated)."""
    from distributed import LocalCluster

    from cluster_tracking.graph.lazy import safetensors_extent
    from cluster_tracking.resources.estimate import estimate_peak, estimate_worker_blocks
    from tests.test_large_models import MLP_LAYERS

    path, _ = _llama_file(tmp_path_factory.mktemp("limited"))
    nodes, edges = safetensors_extent(path, layers=MLP_LAYERS)
    whole = estimate_peak(nodes, edges, bipartite=True).total
    half = estimate_worker_blocks(edges // 2)
    limit = (whole + half) // 2
    assert half < limit < whole
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit=limit,
    ) as cluster:
        yield cluster.scheduler_address, path, limit


@pytest.mark.slow
def test_weights_on_workers_give_the_local_and_in_memory_partition(
    limited_cluster: tuple[str, Path, int],
) -> None:
    """Below the memory a one-process run needs (refused by the pre-check, with its
    estimate), the graph's blocks kept on 2 workers give the in-memory and the bounded local
    paths' labels, n-cut and eigenvalues for the same seed."""
    from cluster_tracking.errors import ConfigError, GraphError
    from cluster_tracking.graph.lazy import safetensors_extent, safetensors_graph
    from cluster_tracking.resources.estimate import estimate_peak
    from cluster_tracking.resources.limits import format_size
    from cluster_tracking.spectral import eigensolver as spectral
    from tests.test_large_models import MLP_LAYERS, _llama_state_dict

    address, path, limit = limited_cluster
    nodes, edges = safetensors_extent(path, layers=MLP_LAYERS)
    with pytest.raises(ConfigError) as refused:
        safetensors_graph(path, layers=MLP_LAYERS, max_memory=limit)
    assert format_size(estimate_peak(nodes, edges, bipartite=True).total) in str(refused.value)
    assert format_size(limit) in str(refused.value)

    in_memory = ct.measure(
        ct.weight_graph(_llama_state_dict(torch.bfloat16), layers=MLP_LAYERS), shuffles=0, seed=3
    )
    bounded = safetensors_graph(path, layers=MLP_LAYERS)
    local = ct.measure(bounded, shuffles=0, seed=3)
    seen: list[tuple[str, int, int]] = []
    graph = safetensors_graph(
        path,
        layers=MLP_LAYERS,
        scheduler=address,
        stage=lambda name, done, total: seen.append((name, done, total)),
    )
    try:
        assert graph.remote is not None
        assert all(block.weight.size == 0 for block in graph.blocks)  # none of it here
        assert seen[-1] == ("reading", 8, 8)
        assert graph.n_nodes - local.nodes.removed > 2 * spectral.DENSE_MAX_NODES  # Krylov
        remote = ct.measure(graph, shuffles=0, seed=3)
        assert remote.partition.labels == local.partition.labels == in_memory.partition.labels
        assert remote.ncut == local.ncut
        assert remote.ncut == pytest.approx(in_memory.ncut, rel=1e-6)
        assert remote.eigenvalues == local.eigenvalues
        for mine, theirs in zip(remote.partition.clusters, local.partition.clusters, strict=True):
            assert mine.cut == theirs.cut and mine.volume == theirs.volume
        np.testing.assert_array_equal(graph.degrees, bounded.degrees)
        labels = np.array(local.partition.labels)
        assert ct.ncut(graph, labels) == ct.ncut(bounded, labels)
        with pytest.raises(GraphError, match="stay on the Dask workers"):
            graph.assemble()
        started: list[str] = []
        with pytest.raises(ct.ConfigError, match="with backend='dask'"):
            ct.measure(graph, shuffles=4, seed=3, n_jobs=1, stage=lambda *a: started.append(a[0]))
        assert not started  # refused before the partition, not after it
    finally:
        graph.release()
    with pytest.raises(GraphError, match="released"):
        ct.measure(graph, shuffles=0, seed=3)

    # a side of at most DENSE_MAX_NODES / 2 nodes: the dense solver, on blocks fetched once
    two = MLP_LAYERS[:2]
    small = safetensors_graph(path, layers=two, scheduler=address)
    try:
        assert min(small.widths[0] + small.widths[2], small.widths[1]) <= 300
        remote = ct.measure(small, k=4, shuffles=0, seed=3)
        local = ct.measure(safetensors_graph(path, layers=two), k=4, shuffles=0, seed=3)
        assert remote.partition.labels == local.partition.labels
        assert remote.ncut == local.ncut and remote.eigenvalues == local.eigenvalues
    finally:
        small.release()


@pytest.mark.slow
def test_null_networks_that_would_not_fit_a_worker_are_refused_with_the_estimate(
    limited_cluster: tuple[str, Path, int],
) -> None:
    """A null network needs the whole graph on one worker: refused before any task starts,
    naming the worker, the estimate and its limit."""
    from cluster_tracking.errors import GraphError
    from cluster_tracking.graph.lazy import safetensors_extent, safetensors_graph
    from cluster_tracking.resources.estimate import estimate_null_task
    from cluster_tracking.resources.limits import format_size
    from tests.test_large_models import MLP_LAYERS

    address, path, limit = limited_cluster
    nodes, edges = safetensors_extent(path, layers=MLP_LAYERS)
    graph = safetensors_graph(path, layers=MLP_LAYERS)
    with pytest.raises(GraphError) as refused:
        ct.measure(graph, k=12, shuffles=4, seed=3, backend="dask", scheduler=address)
    message = str(refused.value)
    assert "\n" not in message and "Dask worker tcp://127.0.0.1:" in message
    assert format_size(estimate_null_task(nodes, edges, k=12)) in message
    assert format_size(limit) in message and "add workers" in message


@pytest.mark.slow
def test_cli_keeps_a_file_too_large_for_this_machine_on_the_workers(
    dask_scheduler: str, tmp_path: Path
) -> None:
    """`audit --backend dask --scheduler`: a file whose graph does not fit --max-memory here
    (exit 4 without the scheduler) is audited with its weight blocks kept on the workers and
    its null networks mapped there from its path, with the bounded local path's labels, n-cut
    and null n-cuts."""
    from safetensors.torch import save_file

    from cluster_tracking.audit.run import BOUNDED_MIN_EDGES
    from cluster_tracking.graph.lazy import safetensors_extent, safetensors_graph
    from cluster_tracking.resources.estimate import estimate_peak
    from tests.test_audit_cli import cli, json_reports, one_error_line

    hidden, intermediate = 1024, 4096
    generator = torch.Generator().manual_seed(0)
    state = {}
    for i in range(2):
        for name, shape in (
            ("up_proj", (intermediate, hidden)),
            ("down_proj", (hidden, intermediate)),
        ):
            weight = torch.randn(*shape, generator=generator).to(torch.bfloat16)
            state[f"model.layers.{i}.mlp.{name}.weight"] = weight
    path = tmp_path / "mlp.safetensors"
    save_file(state, str(path))
    layers = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj")]
    nodes, edges = safetensors_extent(path, layers=layers)
    assert edges >= BOUNDED_MIN_EDGES
    here = estimate_peak(nodes, edges, k=4, bipartite=True).total
    solver_only = estimate_peak(nodes, 0, k=4, bipartite=True).total
    limit = f"{(here + solver_only) // 2 // 2**20}MiB"
    arguments = ["audit", str(path), "--layers", ",".join(layers), "--k", "4"]

    refused = cli(*arguments, "--shuffles", "0", "--max-memory", limit, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    line = one_error_line(refused)
    assert "measuring it needs about" in line and "keep the weights on a Dask cluster" in line

    done = cli(
        *arguments,
        "--shuffles",
        "4",
        "--max-memory",
        limit,
        "--backend",
        "dask",
        "--scheduler",
        dask_scheduler,
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    (report,) = json_reports(done.stdout)
    assert "kept on the Dask workers" in report.config["source_format"]
    local = ct.measure(safetensors_graph(path, layers=layers), k=4, shuffles=4, seed=0, n_jobs=1)
    assert report.partition.labels == local.partition.labels
    assert report.ncut == local.ncut
    assert report.baseline is not None and local.baseline is not None
    assert report.baseline.ncuts == local.baseline.ncuts  # null networks run on the workers
