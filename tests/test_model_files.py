"""Every route to a weight graph agrees: a saved file gives the live model's graph, or is refused.

Hugging Face model folders are built from their config by transformers and read from
safetensors; plain chains are read from their state_dicts; anything a state_dict cannot describe
(a second branch, attention, Conv1D...) is refused with exit 4 instead of a wrong graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from _tiny_models import ResNetBlock, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from safetensors.torch import save_file
from torch import nn

import cluster_tracking as ct
from cluster_tracking.audit.pretrained import load_model_folder
from cluster_tracking.audit.sources import load_source
from cluster_tracking.errors import SourceError
from cluster_tracking.graph import WeightGraph, weight_graph

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cluster_tracking"]


def _assert_same_graph(a: WeightGraph, b: WeightGraph) -> None:
    assert a.layer_names == b.layer_names
    assert a.widths == b.widths
    np.testing.assert_allclose(a.adjacency.toarray(), b.adjacency.toarray(), rtol=1e-12)


@pytest.mark.parametrize(
    "make", [tiny_llama, tiny_gpt2, tiny_bert, tiny_vit], ids=["llama", "gpt2", "bert", "vit"]
)
def test_a_hugging_face_folder_gives_the_live_models_graph(
    tmp_path: Path, make: Callable[[], transformers.PreTrainedModel]
) -> None:
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # LayerNorm/RMSNorm weights away from 1, so folding them shows
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in name.lower():
                parameter.uniform_(0.5, 2.0)
    model.save_pretrained(tmp_path / "model")
    loaded = load_source(str(tmp_path / "model"))
    assert "Hugging Face model folder" in loaded.format
    assert isinstance(loaded.weights, nn.Module)
    _assert_same_graph(weight_graph(loaded.weights), weight_graph(model))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.mark.slow
def test_the_audit_of_a_llama_folder_gives_the_live_models_ncut(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    live = ct.measure(model, k=4, shuffles=6, seed=0, n_jobs=1)
    done = _cli(
        "audit", "llama", "--k", "4", "--shuffles", "6", "--seed", "0", "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    audited = json.loads(done.stdout)
    report = audited[0] if isinstance(audited, list) else audited
    found = report.get("ncut", report.get("report", {}).get("ncut"))
    assert found == pytest.approx(live.ncut, rel=1e-9)


def test_a_folder_whose_config_needs_remote_code_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "remote")
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (tmp_path / "remote" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"auto_map.*trust_remote_code stays off"):
        load_model_folder(tmp_path / "remote")


def test_a_state_dict_that_is_not_a_chain_exits_4_naming_what_to_pass(tmp_path: Path) -> None:
    torch.save(ResNetBlock().state_dict(), tmp_path / "resnet.pt")
    save_file(
        {"conv4.weight": torch.randn(2, 4, 3), "stft_conv.weight": torch.randn(4, 1, 3)},
        str(tmp_path / "named.safetensors"),
    )
    for name, seen in [("resnet.pt", "a second branch"), ("named.safetensors", "order")]:
        done = _cli("audit", name, "--shuffles", "0", cwd=tmp_path)
        assert done.returncode == 4, (name, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert seen in lines[0] and "--layers" in lines[0] and "config.json" in lines[0]
        assert "--arch" in lines[0]


def test_a_chain_reads_the_same_from_its_state_dict_and_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "chain.pt")
    save_file(model.state_dict(), str(tmp_path / "chain.safetensors"))
    live = weight_graph(model)
    for name in ("chain.pt", "chain.safetensors"):
        loaded = load_source(str(tmp_path / name))
        _assert_same_graph(weight_graph(loaded.weights), live)


def test_arch_rebuilds_a_state_dicts_model_and_gives_the_live_graph() -> None:
    from cluster_tracking.audit.architectures import load_into_architecture

    torch.manual_seed(2)
    live = ResNetBlock()
    model = load_into_architecture("_tiny_models:ResNetBlock", live.state_dict())
    _assert_same_graph(
        weight_graph(model, example_inputs=torch.zeros(1, 4, 8, 8)), weight_graph(live)
    )
    wrong = {**live.state_dict(), "extra.weight": torch.ones(2, 2)}
    with pytest.raises(SourceError, match=r"does not fit --arch.*unexpected 'extra\.weight'"):
        load_into_architecture("_tiny_models:ResNetBlock", wrong)


def test_an_unknown_arch_names_what_it_tried() -> None:
    from cluster_tracking.audit.architectures import build_architecture
    from cluster_tracking.errors import ConfigError

    with pytest.raises(ConfigError, match=r"not a model of .*torchvision.*timm"):
        build_architecture("no_such_net")
    with pytest.raises(ConfigError, match="no function 'Nope'"):
        build_architecture("_tiny_models:Nope")


@pytest.mark.slow
def test_the_audit_with_arch_gives_the_live_models_ncut(tmp_path: Path) -> None:
    torch.manual_seed(3)
    live = ResNetBlock()
    torch.save(live.state_dict(), tmp_path / "block.pt")
    expected = ct.measure(live, k=3, shuffles=6, seed=0, n_jobs=1)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run(
        [
            *CLI,
            "audit",
            "block.pt",
            "--arch",
            "_tiny_models:ResNetBlock",
            "--k",
            "3",
            "--shuffles",
            "6",
            "--seed",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[0])
    assert report["ncut"] == pytest.approx(expected.ncut, rel=1e-9)
    assert report["baseline"]["z_score"] == pytest.approx(expected.baseline.z_score, rel=1e-6)
