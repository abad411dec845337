"""Loading models for audits (``cluster_tracking.audit.sources``), in process.

What an auditor relies on: every checkpoint format gives back exactly the weights that were saved,
in an order the weight graph reads as the model's chain of layers; URIs are parsed without touching
the network; and nothing in a file is imported or run unless ``trust_pickle=True``.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _pickles import pickled_net
from safetensors.torch import save_file
from torch import nn

from cluster_tracking import measure
from cluster_tracking.audit.formats.checkpoint import strip_common_prefix
from cluster_tracking.audit.sources import LoadedModel, load_file, load_source, parse_source
from cluster_tracking.errors import SourceError

FAST: dict[str, Any] = {"k": 3, "shuffles": 4, "seed": 0, "n_jobs": 1}


def mlp(seed: int = 0, batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 4)]
    model = nn.Sequential(*layers)
    if batchnorm:  # non-trivial running statistics, so folding them changes the graph
        norm = model[3]
        assert isinstance(norm, nn.BatchNorm1d) and norm.running_var is not None
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def state_of(loaded: LoadedModel) -> dict[str, Any]:
    """The state_dict an audit read (not a module)."""
    assert isinstance(loaded.weights, dict)
    return loaded.weights


def same_tensors(loaded: dict[str, Any], expected: dict[str, torch.Tensor]) -> bool:
    return set(loaded) == set(expected) and all(
        torch.equal(loaded[key], expected[key]) for key in expected
    )


# ------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("uri", "fields"),
    [
        ("model.pt", {"kind": "file", "path": Path("model.pt")}),
        ("./ckpt/epoch=3.ckpt", {"kind": "file", "path": Path("ckpt/epoch=3.ckpt")}),
        ("C:\\models\\m.pt", {"kind": "file"}),
        ("file:///tmp/m.safetensors", {"kind": "file", "path": Path("/tmp/m.safetensors")}),
        (
            "runs:/0a1b2c/model",
            {"kind": "mlflow-run", "run_id": "0a1b2c", "artifact_path": "model"},
        ),
        ("runs:/0a1b2c/ckpt/w.pt", {"run_id": "0a1b2c", "artifact_path": "ckpt/w.pt"}),
        ("runs:/0a1b2c", {"kind": "mlflow-run", "run_id": "0a1b2c", "artifact_path": ""}),
        ("models:/mlp/3", {"kind": "mlflow-model", "model_name": "mlp", "version": "3"}),
        ("models:/mlp@champion", {"model_name": "mlp", "alias": "champion"}),
        ("models:/mlp/champion", {"model_name": "mlp", "alias": "champion", "version": None}),
        ("models:/mlp/latest", {"model_name": "mlp", "stage": "latest"}),
        ("models:/mlp/Production", {"model_name": "mlp", "stage": "Production"}),
        ("models:/m-0123abcd", {"kind": "mlflow-model", "model_id": "m-0123abcd"}),
        (
            "wandb-artifact://team/proj/model-x1:v4",
            {"kind": "wandb-artifact", "entity": "team", "project": "proj", "name": "model-x1"},
        ),
        ("wandb-artifact:///team/proj/model-x1", {"name": "model-x1", "alias": "latest"}),
        ("wandb-artifact://team/proj/model-x1:best", {"alias": "best"}),
    ],
)
def test_sources_are_parsed_without_touching_them(uri: str, fields: dict[str, Any]) -> None:
    ref = parse_source(uri)
    assert ref.uri == uri
    for name, value in fields.items():
        assert getattr(ref, name) == value, name
    assert ref.remote == (ref.kind != "file")


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("s3://bucket/model.pt", "unknown source scheme 's3:'"),
        ("hf://org/model", "unknown source scheme"),
        ("runs:/", "malformed MLflow run URI"),
        ("runs:/bad id/model", "malformed MLflow run URI"),
        ("models:/", "malformed MLflow model URI"),
        ("models:/a/b/c", "malformed MLflow model URI"),
        ("models:/@alias", "malformed MLflow model URI"),
        ("wandb-artifact://team/model", "malformed W&B artifact URI"),
        ("wandb-artifact://team/proj/a/b:v1", "malformed W&B artifact URI"),
        ("wandb-artifact://team/proj/na me:v1", "malformed W&B artifact URI"),
        ("", "an empty source"),
    ],
)
def test_a_malformed_source_is_a_source_error_saying_what_to_write(uri: str, says: str) -> None:
    with pytest.raises(SourceError, match=says):
        parse_source(uri)


def test_a_wandb_artifact_without_a_server_fails_in_seconds_with_a_platform_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from _servers import free_port

    from cluster_tracking.errors import PlatformError

    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    import wandb

    try:
        with pytest.raises(PlatformError, match="W&B"):
            load_source("wandb-artifact://team/proj/model:v0")
    finally:
        wandb.teardown()  # the next test's wandb reads its own environment


def test_platform_schemes_are_found_through_entry_points_and_the_core_imports_no_integration() -> (
    None
):
    """The audit core imports no integration: runs:/, models:/ and wandb-artifact:// are served
    by the platforms that the entry points of group cluster_tracking.sources register, loaded
    only when such a scheme is first parsed; an unknown scheme keeps its error."""
    import subprocess

    script = """
import sys
from cluster_tracking.audit.sources import parse_source
from cluster_tracking.errors import SourceError
from cluster_tracking.integrations.tracking_uri import check_tracking_uri_form
assert parse_source("model.pt").kind == "file"
loaded = sorted(m for m in sys.modules if m.startswith("cluster_tracking.integrations."))
assert loaded == ["cluster_tracking.integrations.tracking_uri"], loaded
assert parse_source("runs:/abc123/model").kind == "mlflow-run"
assert "cluster_tracking.integrations.mlflow_source" in sys.modules
assert "cluster_tracking.integrations.wandb_source" not in sys.modules
assert parse_source("wandb-artifact://a/b/c:v1").kind == "wandb-artifact"
assert "mlflow" not in sys.modules and "wandb" not in sys.modules
try:
    parse_source("s3://bucket/model.pt")
except SourceError as error:
    print(error)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "unknown source scheme 's3:' in 's3://bucket/model.pt'; audit reads local files and "
        "folders, runs:/<run_id>/<path>, models:/<name>/<version or alias> and "
        "wandb-artifact://<entity>/<project>/<name>:<alias>."
    )


def test_the_audit_registry_serves_a_scheme_a_plugin_registers() -> None:
    from cluster_tracking.audit.registry import SourcePlatform, platform_for_scheme, register
    from cluster_tracking.audit.sources import LoadedModel, SourceRef

    def load(ref: SourceRef, **options: Any) -> LoadedModel:
        return LoadedModel(source=ref.uri, label="plugin", weights=mlp().state_dict(), format="x")

    register(
        SourcePlatform(
            name="test-plugin",
            schemes={"plugin": lambda uri, rest: SourceRef(uri=uri, kind="wandb-artifact")},
            kinds=("plugin-kind",),
            load=load,
        )
    )
    try:
        assert parse_source("plugin://anything").kind == "wandb-artifact"
        assert platform_for_scheme("PLUGIN") is not None
        assert load_source(SourceRef(uri="p", kind="plugin-kind")).label == "plugin"  # type: ignore[arg-type]
    finally:
        from cluster_tracking.audit import registry

        registry._PLATFORMS.pop("test-plugin")


# ------------------------------------------------------------------------- local formats


def test_a_state_dict_and_a_checkpoint_dict_give_back_the_saved_weights(tmp_path: Path) -> None:
    model = mlp(batchnorm=True)
    optimiser = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    optimiser.step()  # an optimizer state with tensors of its own
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    checkpoint = {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimiser.state_dict(),
        "loss": 0.25,
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")

    plain = load_file(tmp_path / "sd.pt")
    full = load_file(tmp_path / "checkpoint.pth")
    assert same_tensors(plain.weights, model.state_dict())  # type: ignore[arg-type]
    assert same_tensors(full.weights, model.state_dict())  # type: ignore[arg-type]
    assert list(state_of(plain)) == list(model.state_dict())  # the chain's order is kept
    assert "model_state_dict" in full.format and plain.notes == [] and plain.prefix == ""


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "net", "network", "weights"])
def test_one_checkpoint_unwrapper_serves_the_readers_and_weight_graph(
    tmp_path: Path, key: str
) -> None:
    """graph.chain.unwrap_checkpoint follows every key of CHECKPOINT_KEYS, for the audit's
    reader and for weight_graph alike (weight_graph once knew only three of them)."""
    from cluster_tracking.graph import weight_graph
    from cluster_tracking.graph.chain import CHECKPOINT_KEYS

    assert key in CHECKPOINT_KEYS and len(CHECKPOINT_KEYS) == 8
    model = mlp()
    checkpoint = {"epoch": 3, key: model.state_dict()}
    torch.save(checkpoint, tmp_path / "ck.pt")
    loaded = load_file(tmp_path / "ck.pt")
    assert same_tensors(loaded.weights, model.state_dict())  # type: ignore[arg-type]
    assert f"[{key!r}]" in loaded.format
    graph = weight_graph(checkpoint)
    assert graph.n_nodes == weight_graph(model.state_dict()).n_nodes == 8 + 16 + 16 + 4


def test_a_lightning_checkpoint_loses_its_attribute_prefix(tmp_path: Path) -> None:
    model = mlp()
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save(
        {
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "2.6.0",
            "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": []}],
            "hyper_parameters": {"lr": 0.1},
        },
        tmp_path / "epoch=1.ckpt",
    )
    loaded = load_file(tmp_path / "epoch=1.ckpt")
    assert loaded.prefix == "model."
    assert same_tensors(loaded.weights, model.state_dict())  # type: ignore[arg-type]
    assert loaded.layer_names(["model.0", "2"]) == ["0", "2"]
    assert "Lightning" in loaded.format


@pytest.mark.parametrize(
    ("keys", "prefix"),
    [
        (["model.0.weight", "model.0.bias", "model.2.weight"], "model."),
        (["model.net.fc1.weight", "model.net.fc2.weight"], "model.net."),
        (["model.fc.weight", "model.fc.bias"], "model."),  # never the layer's own name
        (["encoder.0.weight", "decoder.0.weight"], ""),
        (["model.0.weight", "scale"], ""),
    ],
)
def test_only_a_prefix_shared_by_every_layer_is_removed(keys: list[str], prefix: str) -> None:
    stripped, found = strip_common_prefix({key: torch.zeros(1) for key in keys})
    assert found == prefix
    assert list(stripped) == [key.removeprefix(prefix) for key in keys]


def test_safetensors_layers_come_back_in_natural_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    widths = [3] + [4] * 11 + [2]
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(widths)])
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = load_file(tmp_path / "model.safetensors")
    assert same_tensors(loaded.weights, model.state_dict())  # type: ignore[arg-type]
    weights = [key for key in state_of(loaded) if key.endswith(".weight")]
    assert weights == [f"{i}.weight" for i in range(12)]  # 2 before 10, unlike sorted()
    assert any("order" in note for note in loaded.notes)


def test_a_torch_export_archive_is_read_without_torch_export_load(tmp_path: Path) -> None:
    model = mlp(batchnorm=True)
    program = torch.export.export(model, (torch.randn(2, 8),))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = load_file(tmp_path / "model.pt2")
    assert same_tensors(loaded.weights, model.state_dict())  # type: ignore[arg-type]
    # Grouped by module (the archive lists parameters before buffers): BatchNorm "3" comes
    # before layer "5", so it is folded into layer "2", as in the model.
    assert list(state_of(loaded)) == list(model.state_dict())
    reference = measure(model.state_dict(), **FAST)
    assert measure(loaded.weights, **FAST).ncut == reference.ncut


def test_a_folder_with_one_weight_file_is_read_and_several_are_refused(tmp_path: Path) -> None:
    torch.save(mlp().state_dict(), tmp_path / "state_dict.pth")
    assert isinstance(load_file(tmp_path), LoadedModel)
    (tmp_path / "sub").mkdir()
    torch.save(mlp(1).state_dict(), tmp_path / "sub" / "a.pt")
    torch.save(mlp(2).state_dict(), tmp_path / "sub" / "b.pt")
    with pytest.raises(SourceError, match="several weight files"):
        load_file(tmp_path / "sub")
    with pytest.raises(SourceError, match="holds no model"):
        (tmp_path / "empty").mkdir()
        load_file(tmp_path / "empty")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 not really a zip", "not a readable PyTorch checkpoint"),
        (b"hello, world", "not a readable PyTorch checkpoint"),
    ],
)
def test_a_damaged_file_is_a_source_error(tmp_path: Path, content: bytes, says: str) -> None:
    (tmp_path / "model.pt").write_bytes(content)
    with pytest.raises(SourceError, match=says):
        load_file(tmp_path / "model.pt")


def test_a_dict_without_weights_names_its_keys(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "meta.pt")
    with pytest.raises(SourceError, match=r"keys: 'epoch', 'config'"):
        load_file(tmp_path / "meta.pt")


# ------------------------------------------------------------------------------- pickles


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("payload", [_System, _Eval])
def test_a_malicious_pickle_is_never_run(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    torch.save(payload(marker), tmp_path / "evil.pt")
    with pytest.raises(SourceError, match="--trust-pickle"):
        load_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_weights_next_to_a_payload_are_read_and_the_payload_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = mlp()
    torch.save({"state_dict": model.state_dict(), "extra": _Eval(marker)}, tmp_path / "ck.pt")
    loaded = load_file(tmp_path / "ck.pt")
    assert same_tensors(loaded.weights, model.state_dict())  # type: ignore[arg-type]
    assert not marker.exists()
    assert any("builtins.eval" in note for note in loaded.notes)


def test_a_pickled_module_is_read_without_importing_its_class(tmp_path: Path) -> None:
    path = pickled_net(tmp_path)
    loaded = load_file(path)
    assert not (tmp_path / "imported").exists(), "netdef was imported"
    assert "netdef" not in sys.modules
    assert isinstance(loaded.weights, dict)
    assert list(loaded.weights) == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "out.weight",
        "out.bias",
    ]
    assert same_tensors(loaded.weights, torch.load(tmp_path / "sd.pt", weights_only=True))

    sys.path.insert(0, str(tmp_path))
    try:
        trusted = load_file(path, trust_pickle=True)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("netdef", None)
    assert isinstance(trusted.weights, nn.Module)
    assert (tmp_path / "imported").exists()  # --trust-pickle: the user's explicit choice
    assert same_tensors(loaded.weights, trusted.weights.state_dict())
    chain = measure(loaded.weights, **FAST)
    traced = measure(trusted.weights, **FAST)
    assert chain.ncut == traced.ncut
    assert [layer.name for layer in traced.layers] == ["input", "fc1", "fc2", "out"]


def test_trust_pickle_without_the_class_falls_back_to_the_weights(tmp_path: Path) -> None:
    path = pickled_net(tmp_path)  # netdef is not on sys.path here
    loaded = load_file(path, trust_pickle=True)
    assert isinstance(loaded.weights, dict) and "fc1.weight" in loaded.weights
    assert any("cannot be imported" in note for note in loaded.notes)
