"""A Hugging Face model folder read in bounded memory (``model_folder_graph``): the architecture
traced on the meta device, each weight block read from the safetensors files afterwards.

It must give what loading the folder and tracing the live model gives (same layers, nodes,
blocks and edge weights; same labels and n-cut for the same seed), for the transformers people
audit (Llama's gated MLP and RMSNorm, GPT-2's Conv1D, BERT, ViT whose stored keys transformers
renames), from one file or shards, in bf16 or float32; and it must refuse what it cannot read
rather than guess.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from _tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from typer.testing import CliRunner

import cluster_tracking as ct
from cluster_tracking.audit.pretrained import load_model_folder
from cluster_tracking.errors import ConfigError, GraphError, SourceError
from cluster_tracking.graph import weight_graph
from cluster_tracking.graph.lazy import safetensors_graph
from cluster_tracking.graph.model_folder import (
    model_folder_extent,
    model_folder_graph,
    model_folder_size,
)


def _saved(
    make: Callable[[], transformers.PreTrainedModel],
    folder: Path,
    *,
    dtype: torch.dtype = torch.float32,
    shard: str | None = None,
) -> transformers.PreTrainedModel:
    """``make()``'s model with its normalisation weights away from 1 (so that folding them
    shows), saved to ``folder`` (in shards of ``shard`` when given)."""
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in name.lower():
                parameter.uniform_(0.5, 2.0)
    model = model.to(dtype)
    if shard is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=shard)
    return model


def _edit_config(folder: Path, **values: Any) -> None:
    """Set ``values`` in the folder's ``config.json``."""
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("make", "dtype", "shard"),
    [
        (tiny_llama, torch.float32, None),
        (tiny_llama, torch.bfloat16, "8KB"),
        (tiny_gpt2, torch.float32, None),
        (tiny_bert, torch.float16, None),
        (tiny_vit, torch.float32, None),
    ],
    ids=["llama", "llama-bf16-shards", "gpt2", "bert-fp16", "vit"],
)
def test_the_bounded_graph_of_a_folder_is_the_loaded_models(
    tmp_path: Path,
    make: Callable[[], transformers.PreTrainedModel],
    dtype: torch.dtype,
    shard: str | None,
) -> None:
    folder = tmp_path / "model"
    _saved(make, folder, dtype=dtype, shard=shard)
    if shard is not None:
        assert (folder / "model.safetensors.index.json").is_file()
    loaded = weight_graph(load_model_folder(folder))
    bounded = model_folder_graph(folder)

    assert not bounded.assembled  # no sparse adjacency: the blocks are the graph
    assert bounded.layer_names == loaded.layer_names
    assert bounded.widths == loaded.widths
    assert bounded.merged == loaded.merged
    assert [b.name for b in bounded.blocks] == [b.name for b in loaded.blocks]
    for ours, theirs in zip(bounded.blocks, loaded.blocks, strict=True):
        assert ours.weight.dtype == np.float32 and ours.magnitude  # 4 bytes per edge
        np.testing.assert_array_equal(ours.src, theirs.src)
        np.testing.assert_array_equal(ours.dst, theirs.dst)
        np.testing.assert_allclose(ours.edge_weights(), theirs.edge_weights(), rtol=2e-7)
    np.testing.assert_allclose(bounded.degrees, loaded.degrees, rtol=1e-6)
    assert model_folder_extent(folder) == (
        loaded.n_nodes,
        sum(block.weight.size for block in loaded.blocks),
    )

    ours_report = ct.measure(bounded, k=4, shuffles=3, seed=0, n_jobs=1)
    theirs_report = ct.measure(loaded, k=4, shuffles=3, seed=0, n_jobs=1)
    assert ours_report.partition.labels == theirs_report.partition.labels
    assert ours_report.ncut == pytest.approx(theirs_report.ncut, rel=1e-6)
    assert ours_report.baseline is not None and theirs_report.baseline is not None
    np.testing.assert_allclose(ours_report.baseline.ncuts, theirs_report.baseline.ncuts, rtol=1e-6)


def test_the_residual_stream_is_one_set_of_nodes_read_and_written_by_every_block(
    tmp_path: Path,
) -> None:
    """Written by hand for the tiny Llama (hidden 16, MLP 32, 4 query heads of 4 dims over 2
    key/value heads): one residual stream of 16 nodes that every block reads and writes. q, k,
    v and the gate/up units read it with the block's RMSNorm weight folded into their input
    columns. RoPE adds each head's dim i to its dim i + 2 (``rotate_half``), which identifies
    them: q keeps 8 nodes of its 16 outputs and k 4 of 8, and both hang off the stream (their
    product contracts them). v's 8 channels are carried through attention to o_proj, which
    reads each twice (2 query heads share a value head) and writes the stream; gate and up
    units are one node each (``gate * up``), which down_proj reads."""
    folder = tmp_path / "llama"
    model = _saved(tiny_llama, folder)
    graph = model_folder_graph(folder)
    stream = np.arange(16)
    assert graph.layer_names[0] == "model.embed_tokens"
    assert graph.widths == (16, 8, 4, 8, 32, 8, 4, 8, 32)
    blocks = {block.name: block for block in graph.blocks}
    for layer in range(2):
        prefix = f"model.layers.{layer}"

        def weight(name: str, prefix: str = prefix) -> np.ndarray:
            return np.abs(model.get_parameter(f"{prefix}.{name}.weight").detach().numpy())

        norm, post_norm = weight("input_layernorm"), weight("post_attention_layernorm")
        q, k, v = (blocks[f"{prefix}.self_attn.{p}_proj"] for p in "qkv")
        for block, name in ((q, "q"), (k, "k"), (v, "v")):
            np.testing.assert_array_equal(block.src, stream)
            np.testing.assert_allclose(
                block.weight, weight(f"self_attn.{name}_proj") * norm, rtol=1e-6
            )
        head = q.dst[:4]  # dims 0-3 of the first head: dims i and i + 2 are one node
        assert head[0] == head[2] and head[1] == head[3] and head[0] != head[1]
        assert len(np.unique(q.dst)) == 8 and len(np.unique(k.dst)) == 4
        assert len(np.unique(v.dst)) == 8
        o = blocks[f"{prefix}.self_attn.o_proj"]
        np.testing.assert_array_equal(o.src, v.dst)  # attention carries v's channels
        np.testing.assert_array_equal(o.dst, stream)  # back into the stream
        o_in = weight("self_attn.o_proj")  # columns: query head h reads value head h // 2
        by_value_channel = o_in.reshape(16, 2, 2, 4).sum(axis=2).reshape(16, 8)
        np.testing.assert_allclose(o.edge_weights(), by_value_channel, rtol=1e-6)
        gate, up, down = (blocks[f"{prefix}.mlp.{p}_proj"] for p in ("gate", "up", "down"))
        np.testing.assert_array_equal(gate.dst, up.dst)  # gate * up: one set of units
        np.testing.assert_allclose(up.weight, weight("mlp.up_proj") * post_norm, rtol=1e-6)
        np.testing.assert_array_equal(down.src, up.dst)
        np.testing.assert_array_equal(down.dst, stream)
    assert graph.merged["model.layers.1.mlp.down_proj"] == "model.embed_tokens"


def test_embeddings_and_a_tied_head_are_read_as_the_live_model_reads_them(tmp_path: Path) -> None:
    """``include_embeddings=True``: vocabulary and position tables become blocks (the stored
    ``[vocab, hidden]`` table transposed), and GPT-2's LM head, tied to its token embedding and
    stored once, counts once."""
    folder = tmp_path / "gpt2"
    _saved(tiny_gpt2, folder)
    loaded = weight_graph(load_model_folder(folder), include_embeddings=True)
    bounded = model_folder_graph(folder, include_embeddings=True)
    assert bounded.layer_names == loaded.layer_names
    assert bounded.layer_names[:2] == ("transformer.wte.index", "transformer.wpe.index")
    assert [b.name for b in bounded.blocks] == [b.name for b in loaded.blocks]
    for ours, theirs in zip(bounded.blocks, loaded.blocks, strict=True):
        np.testing.assert_allclose(ours.edge_weights(), theirs.edge_weights(), rtol=2e-7)


def test_the_memory_check_refuses_before_reading_with_the_estimate(tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    _saved(tiny_llama, folder)
    with pytest.raises(
        ConfigError, match=r"needs about .* more than the memory limit of 1\.0 MiB"
    ) as e:
        model_folder_graph(folder, max_memory=2**20)
    assert "--layers" in str(e.value) and "Dask" not in str(e.value)  # options that apply
    nodes, edges = model_folder_size(folder)  # from the headers alone: an upper bound
    assert (nodes, edges) >= model_folder_extent(folder)


def test_a_folder_that_does_not_hold_what_its_config_names_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    _saved(tiny_llama, folder)
    _edit_config(folder, num_hidden_layers=3)  # the file holds 2 blocks
    with pytest.raises(SourceError, match=r"model\.layers\.2\..*none of its safetensors files"):
        model_folder_graph(folder)


def test_a_folder_holding_more_than_its_config_names_is_refused_not_cut(tmp_path: Path) -> None:
    """A config naming fewer blocks than the files hold would audit part of the model: refused,
    as loading it refuses the unexpected tensors."""
    folder = tmp_path / "llama"
    _saved(tiny_llama, folder)
    _edit_config(folder, num_hidden_layers=1)  # the files hold 2 blocks
    with pytest.raises(SourceError, match=r"not parameters of the architecture.*layers\.1\."):
        model_folder_graph(folder)


def test_a_batchnorm_to_fold_is_refused_not_guessed(tmp_path: Path) -> None:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
    )
    folder = tmp_path / "resnet"
    _saved(lambda: transformers.ResNetForImageClassification(config), folder)
    with pytest.raises(GraphError, match=r"BatchNorm .*audit the model in memory"):
        model_folder_graph(folder)


def test_remote_code_and_single_file_readers_point_to_the_right_route(tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    _saved(tiny_llama, folder)
    with pytest.raises(SourceError, match=r"is a folder.*model_folder_graph\(folder\)"):
        safetensors_graph(folder)
    _edit_config(folder, auto_map={"AutoModel": "modeling_evil.EvilModel"})
    with pytest.raises(SourceError, match=r"auto_map.*trust_remote_code stays off"):
        model_folder_graph(folder)


def test_the_cli_audits_a_large_folder_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the bounded path's size the CLI takes it by itself for a model folder, and prints
    the in-memory path's n-cut (exit 0, no traceback)."""
    from cluster_tracking.audit import run as audit
    from cluster_tracking.cli.app import app

    folder = tmp_path / "llama"
    _saved(tiny_llama, folder, dtype=torch.bfloat16)
    expected = ct.measure(weight_graph(load_model_folder(folder)), k=4, shuffles=0, seed=0)
    monkeypatch.setattr(audit, "BOUNDED_MIN_EDGES", 1000)  # this small folder takes that path
    result = CliRunner().invoke(
        app, ["audit", str(folder), "--k", "4", "--shuffles", "0", "--seed", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert "traced on the meta device" in report["config"]["source_format"]
    assert report["ncut"] == pytest.approx(expected.ncut, rel=1e-6)
