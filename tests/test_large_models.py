"""Billion-parameter models in bounded memory: the safetensors reader that keeps float32
magnitudes and no sparse adjacency gives the in-memory path's graph, partition and n-cut, and a
measurement that would not fit is refused before it starts, with its estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cluster_tracking as ct
from cluster_tracking.errors import ConfigError, GraphError, SourceError
from cluster_tracking.graph import edges as graph_edges
from cluster_tracking.graph.degrees import block_degrees
from cluster_tracking.graph.lazy import safetensors_extent, safetensors_graph
from cluster_tracking.resources.estimate import estimate_peak
from cluster_tracking.resources.limits import format_size
from cluster_tracking.spectral.cuts import cluster_cuts
from cluster_tracking.spectral.eigensolver import DENSE_MAX_NODES

HIDDEN, INTERMEDIATE, N_LAYERS = 96, 384, 4
#: The MLP chain of a Llama-style model: each block's up_proj, then its down_proj.
MLP_LAYERS = [
    f"model.layers.{i}.mlp.{name}" for i in range(N_LAYERS) for name in ("up_proj", "down_proj")
]


def _llama_state_dict(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of a small Llama-style decoder (random weights), as a safetensors file holds
    them: embeddings, attention and gated MLP projections, norms."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    state = {"model.embed_tokens.weight": normal(50, HIDDEN)}
    for i in range(N_LAYERS):
        prefix = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{prefix}.self_attn.{name}.weight"] = normal(HIDDEN, HIDDEN)
        state[f"{prefix}.mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        state[f"{prefix}.mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        state[f"{prefix}.mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        state[f"{prefix}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=dtype)
    state["model.norm.weight"] = torch.ones(HIDDEN, dtype=dtype)
    return state


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16, torch.float32])
def llama_file(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _llama_state_dict(request.param)
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    save_file(state, str(path))
    return path, state


def test_bounded_graph_is_the_in_memory_graph(
    llama_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, state = llama_file
    in_memory = ct.weight_graph(state, layers=MLP_LAYERS)
    bounded = safetensors_graph(path, layers=MLP_LAYERS)
    assert bounded.layer_names == in_memory.layer_names
    assert bounded.widths == in_memory.widths
    assert not bounded.assembled and in_memory.assembled
    for lazy_block, block in zip(bounded.blocks, in_memory.blocks, strict=True):
        assert lazy_block.weight.dtype == np.float32  # 4 bytes per edge
        assert lazy_block.magnitude
        np.testing.assert_array_equal(lazy_block.weight, np.abs(block.weight))
    # degrees summed block by block, to the last bit, and equal to the adjacency's
    np.testing.assert_array_equal(bounded.degrees, block_degrees(in_memory.blocks, 2016))
    np.testing.assert_allclose(bounded.degrees, in_memory.degrees, rtol=1e-12)
    assert safetensors_extent(path, layers=MLP_LAYERS) == (
        HIDDEN + N_LAYERS * (HIDDEN + INTERMEDIATE),
        2 * N_LAYERS * HIDDEN * INTERMEDIATE,
    )


def test_bounded_and_in_memory_paths_give_identical_partitions(
    llama_file: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same labels and n-cut for the same seed: the float32 magnitudes are exact for bf16, fp16
    and float32 files, and the products and degrees do the same arithmetic on them. Also with
    the weights read in many row chunks (the path of graphs too large to cast whole)."""
    path, state = llama_file
    in_memory = ct.measure(ct.weight_graph(state, layers=MLP_LAYERS), shuffles=0, seed=3)
    graph = safetensors_graph(path, layers=MLP_LAYERS)
    assert graph.n_nodes - in_memory.nodes.removed > 2 * DENSE_MAX_NODES  # Krylov
    bounded = ct.measure(graph, shuffles=0, seed=3)
    assert bounded.partition.labels == in_memory.partition.labels
    assert bounded.ncut == in_memory.ncut
    np.testing.assert_allclose(bounded.eigenvalues, in_memory.eigenvalues, rtol=0, atol=1e-12)
    for mine, theirs in zip(bounded.partition.clusters, in_memory.partition.clusters, strict=True):
        assert mine.cut == pytest.approx(theirs.cut, rel=1e-12)
        assert mine.volume == pytest.approx(theirs.volume, rel=1e-12)

    monkeypatch.setattr(graph_edges, "CHUNK_ENTRIES", 5_000)  # dozens of row chunks per block
    chunked = ct.measure(graph, shuffles=0, seed=3)
    assert chunked.partition.labels == in_memory.partition.labels
    assert chunked.ncut == pytest.approx(in_memory.ncut, rel=1e-12)
    labels = np.array(in_memory.partition.labels)
    assert ct.ncut(graph, labels) == pytest.approx(in_memory.ncut, rel=1e-12)


def test_unassembled_graph_assembles_on_request(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_llama_state_dict(torch.float32), str(path))
    graph = safetensors_graph(path, layers=MLP_LAYERS[:2])
    assert graph.adjacency.nnz == 0  # a placeholder: nothing reads it while assembled is False
    assembled = graph.assemble()
    assert assembled.assembled and assembled.adjacency.nnz == 2 * 2 * HIDDEN * INTERMEDIATE
    labels = np.arange(graph.n_nodes) % 3
    assert ct.ncut(graph, labels) == pytest.approx(ct.ncut(assembled, labels), rel=1e-12)
    cuts, volumes = cluster_cuts(graph, labels, 3)
    expected_cuts, expected_volumes = cluster_cuts(assembled, labels, 3)
    np.testing.assert_allclose(cuts, expected_cuts, rtol=1e-12)
    np.testing.assert_allclose(volumes, expected_volumes, rtol=1e-12)


def test_null_models_on_magnitudes(tmp_path: Path) -> None:
    """Permutation nulls apply to magnitudes; nulls drawing new signed values are refused."""
    path = tmp_path / "model.safetensors"
    state = _llama_state_dict(torch.float32)
    save_file(state, str(path))
    graph = safetensors_graph(path, layers=MLP_LAYERS[:4])
    in_memory = ct.weight_graph(state, layers=MLP_LAYERS[:4])
    ours = ct.measure(graph, shuffles=4, seed=1, n_jobs=1)
    theirs = ct.measure(in_memory, shuffles=4, seed=1, n_jobs=1)
    assert ours.baseline is not None and theirs.baseline is not None
    # the same permutations of |W| as of W: the same null networks
    np.testing.assert_allclose(ours.baseline.ncuts, theirs.baseline.ncuts, rtol=1e-6)
    with pytest.raises(ConfigError, match="keeps the magnitudes"):
        ct.measure(graph, shuffles=4, shuffle="layer_nonzero_distribution", seed=1)


def test_memory_precheck_refuses_with_the_estimate(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_llama_state_dict(torch.bfloat16), str(path))
    nodes, edges = safetensors_extent(path, layers=MLP_LAYERS)
    estimate = estimate_peak(nodes, edges, shuffles=50, workers=2, bipartite=True)
    limit = estimate.total - 1
    with pytest.raises(ConfigError) as caught:
        safetensors_graph(path, layers=MLP_LAYERS, shuffles=50, workers=2, max_memory=limit)
    message = str(caught.value)
    assert "\n" not in message
    assert format_size(estimate.total) in message  # the estimate
    assert format_size(limit) in message  # the limit
    assert f"{nodes:,} nodes, {edges:,} edges" in message
    assert "--layers" in message and "shuffles=0" in message and "Dask" in message
    # without the null networks it fits
    safetensors_graph(path, layers=MLP_LAYERS, shuffles=0, max_memory=limit)
    assert estimate_peak(nodes, edges, bipartite=True).total < limit


def test_bad_files_and_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        safetensors_graph(tmp_path / "missing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    save_file({"fc1.weight": torch.ones(4, 3)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-8])
    with pytest.raises(SourceError, match="corrupt"):
        safetensors_graph(truncated)
    nan = tmp_path / "nan.safetensors"
    weight = torch.ones(4, 3)
    weight[2, 1] = float("nan")
    save_file({"fc1.weight": weight, "fc2.weight": torch.ones(2, 4)}, str(nan))
    with pytest.raises(GraphError, match="NaN/Inf"):
        safetensors_graph(nan)
    quantized = tmp_path / "int8.safetensors"
    save_file({"fc1.weight": torch.ones(4, 3, dtype=torch.int8)}, str(quantized))
    with pytest.raises(GraphError, match="quantized"):
        safetensors_graph(quantized, layers=["fc1"])
    attention = tmp_path / "llama.safetensors"
    save_file(_llama_state_dict(torch.float16), str(attention))
    with pytest.raises(GraphError, match="not a chain"):
        safetensors_graph(attention)  # the whole file: attention and embeddings


def test_whole_file_chain_matches_weight_graph(tmp_path: Path) -> None:
    """Without layers=, a file that is one chain (names that say the order) is read whole, in
    natural name order, BatchNorm folded, as weight_graph reads its state_dict."""
    generator = torch.Generator().manual_seed(5)
    state = {
        "fc1.weight": torch.randn(12, 6, generator=generator),
        "bn1.weight": torch.rand(12, generator=generator) + 0.5,
        "bn1.bias": torch.zeros(12),
        "bn1.running_mean": torch.zeros(12),
        "bn1.running_var": torch.rand(12, generator=generator) + 0.5,
        "fc2.weight": torch.randn(10, 12, generator=generator),
        "fc10.weight": torch.randn(3, 10, generator=generator),
    }
    path = tmp_path / "chain.safetensors"
    save_file(state, str(path))
    order = ["fc1", "bn1", "fc2", "fc10"]
    bounded = safetensors_graph(path, layers=order)
    in_memory = ct.weight_graph(state, layers=order)
    assert bounded.layer_names == in_memory.layer_names == ("input", "fc1", "fc2", "fc10")
    np.testing.assert_allclose(bounded.degrees, in_memory.degrees, rtol=1e-6)

    plain = {key: value for key, value in state.items() if not key.startswith("bn1")}
    save_file(plain, str(path))
    whole = safetensors_graph(path)  # fc1, fc2, fc10: natural order, not string order
    assert whole.layer_names == ("input", "fc1", "fc2", "fc10")
    np.testing.assert_allclose(whole.degrees, ct.weight_graph(plain).degrees, rtol=1e-6)


@pytest.mark.slow
def test_cli_audits_a_large_safetensors_file_in_bounded_memory(tmp_path: Path) -> None:
    """A file whose MLP chain has 2^24 edges goes through the bounded reader: refused with exit 4
    and the estimate when it would not fit --max-memory, measured when it does."""
    from cluster_tracking.audit.run import BOUNDED_MIN_EDGES
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
    layers = ",".join(
        f"model.layers.{i}.mlp.{name}" for i in range(2) for name in ("up_proj", "down_proj")
    )
    nodes, edges = safetensors_extent(path, layers=layers.split(","))
    assert edges >= BOUNDED_MIN_EDGES

    refused = cli(
        "audit",
        str(path),
        "--layers",
        layers,
        "--shuffles",
        "50",
        "--max-memory",
        "256MiB",
        cwd=tmp_path,
    )
    assert refused.returncode == 2, refused.stderr  # an option to change, as in memory
    line = one_error_line(refused)
    estimate = estimate_peak(nodes, edges, shuffles=50, workers=2, bipartite=True)
    assert "measuring it needs about" in line and f"{edges:,} edges" in line
    assert "256.0 MiB" in line and "--layers" in line

    done = cli(
        "audit",
        str(path),
        "--layers",
        layers,
        "--shuffles",
        "0",
        "--k",
        "4",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    (report,) = json_reports(done.stdout)
    assert "bounded memory" in report.config["source_format"]
    in_memory = ct.measure(
        ct.weight_graph(state, layers=layers.split(",")), k=4, shuffles=0, seed=0
    )
    assert report.partition.labels == in_memory.partition.labels
    assert report.ncut == pytest.approx(in_memory.ncut, rel=1e-9)
    assert estimate.total > 256 * 2**20


def test_stages_are_reported_in_order(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_llama_state_dict(torch.bfloat16), str(path))
    seen: list[tuple[str, int, int]] = []

    def stage(name: str, done: int, total: int) -> None:
        seen.append((name, done, total))

    graph = safetensors_graph(path, layers=MLP_LAYERS[:4], stage=stage)
    ct.measure(graph, k=[3, 4], shuffles=2, seed=0, n_jobs=1, stage=stage)
    assert [entry for entry in seen if entry[0] == "reading"] == [
        ("reading", i, 4) for i in (1, 2, 3, 4)
    ]
    names = [name for name, _, _ in seen]
    order = ["reading", "eigen", "k-means", "nulls"]
    assert sorted(set(names), key=order.index) == order
    assert names == sorted(names, key=order.index)  # each stage after the one before
    assert ("eigen", 2, 2) in seen and ("k-means", 2, 2) in seen and seen[-1] == ("nulls", 2, 2)
    graph_stages = []
    ct.measure(
        _llama_state_dict(torch.float32),
        k=3,
        shuffles=0,
        layers=MLP_LAYERS[:2],
        stage=lambda name, done, total: graph_stages.append((name, done, total)),
    )
    assert graph_stages[:2] == [("graph", 0, 1), ("graph", 1, 1)]


def test_cli_progress_bar_names_the_stages_of_a_bounded_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal, the bounded path's progress bar shows each stage as it starts: reading,
    eigen, k-means, then the null networks."""
    import re

    from typer.testing import CliRunner

    from cluster_tracking.audit import run as audit
    from cluster_tracking.cli.app import app

    path = tmp_path / "model.safetensors"
    save_file(_llama_state_dict(torch.bfloat16), str(path))
    monkeypatch.setattr(audit, "BOUNDED_MIN_EDGES", 1000)  # this small file takes that path
    options = ["--layers", ",".join(MLP_LAYERS), "--shuffles", "4", "--k", "4", "--jobs", "1"]
    result = CliRunner().invoke(
        app,
        ["audit", str(path), *options],
        env={"COLUMNS": "150", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"},  # a terminal
    )
    assert result.exit_code == 0, result.output
    assert "read in bounded memory" in result.output
    shown = re.findall(r"model\.safetensors: ([a-z-]+)", result.output)
    first_seen = sorted(set(shown), key=shown.index)
    assert [name for name in first_seen if name != "shuffles"] == [
        "reading",
        "eigen",
        "k-means",
        "nulls",
    ]
