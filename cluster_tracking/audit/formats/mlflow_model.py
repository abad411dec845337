"""MLflow model folders (a folder with an ``MLmodel`` file), read as local files.

Every path the ``MLmodel`` file names must stay inside the model's folder. A pickled model is
unpickled for real only with ``trust_pickle=True``, by the MLflow integration
(:attr:`~cluster_tracking.audit.registry.SourcePlatform.load_pickled_model`); otherwise its
``data/model.pth`` is read as any ``torch.save`` file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from cluster_tracking.audit.files import file_mode, weight_files
from cluster_tracking.audit.formats.checkpoint import WeightFileRead
from cluster_tracking.audit.formats.detect import read_weight_file
from cluster_tracking.audit.formats.pt2 import read_pt2
from cluster_tracking.audit.formats.torch_file import read_torch_file
from cluster_tracking.audit.registry import platform
from cluster_tracking.errors import SourceError
from cluster_tracking.graph.safetensors_header import MAX_HEADER_BYTES, first_line
from cluster_tracking.graph.selection import list_names


def read_mlflow_model_dir(folder: Path, *, trust_pickle: bool) -> WeightFileRead:
    """``(weights, format, prefix, notes)`` of an MLflow PyTorch model folder: its ``.pt2``, its
    weight file, or its pickled ``data/model.pth`` (stand-ins; for real with ``trust_pickle``)."""
    import yaml

    spec_file = folder / "MLmodel"
    file_mode(spec_file, f"{folder}/MLmodel")
    if spec_file.stat().st_size > MAX_HEADER_BYTES:
        raise SourceError(f"{folder}/MLmodel is larger than any MLmodel file; is it one?")
    try:
        spec = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as error:
        raise SourceError(f"{folder}/MLmodel cannot be read ({first_line(error)}).") from error
    if spec is None:
        spec = {}
    flavors = spec.get("flavors") if isinstance(spec, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(flavors, (Mapping, type(None))):
        raise SourceError(
            f"{folder}/MLmodel is not an MLflow model file (a YAML mapping with 'flavors'); the "
            "folder may not hold an MLflow model."
        )
    flavors = flavors or {}
    pytorch = flavors.get("pytorch")
    if not isinstance(pytorch, Mapping):
        raise SourceError(
            f"the MLflow model in {folder.name!r} is not a PyTorch model (flavors: "
            f"{list_names(sorted(str(name) for name in flavors), 20)}); audit models logged with "
            "mlflow.pytorch or a state_dict."
        )
    for flavor in flavors.values():
        for key in _MLMODEL_PATH_KEYS:
            if isinstance(flavor, Mapping) and flavor.get(key) is not None:
                _inside(folder, flavor[key], f"its {key!r} path")
    data = _inside(folder, pytorch.get("model_data", "data"), "its 'model_data' path")
    exported, pickled = data / "model.pt2", data / "model.pth"
    if exported.is_file():
        _inside(folder, exported, "its data/model.pt2")
        return read_pt2(exported), "MLflow PyTorch model (torch.export archive)", "", []
    if not pickled.is_file():
        files = weight_files(data) if data.is_dir() else []
        if len(files) == 1:
            return read_weight_file(
                _inside(folder, files[0], "its weight file"), trust_pickle=trust_pickle
            )
        raise SourceError(
            f"the MLflow model in {folder.name!r} has neither data/model.pt2 nor data/model.pth."
        )
    if trust_pickle:
        module = _load_pickled(folder)
        if module is not None:
            return (
                module,
                f"MLflow PyTorch model (pickled {type(module).__name__})",
                "",
                ["unpickled with --trust-pickle (code from the model was run)."],
            )
    weights, what, prefix, notes = read_torch_file(
        _inside(folder, pickled, "its data/model.pth"), trust_pickle=False
    )
    return weights, f"MLflow PyTorch model ({what})", prefix, notes


#: Keys of an MLmodel flavor that name a path inside the model's folder.
_MLMODEL_PATH_KEYS = ("model_data", "data", "code", "model_path", "artifacts_path")


def _inside(folder: Path, named: Any, what: str) -> Path:
    """``folder / named``, refused unless it resolves (symlinks followed) inside ``folder``.

    An ``MLmodel`` file names paths; one that is absolute, climbs out with ``..`` or leads out
    through a symlink would make the audit read a file the source does not hold.
    """
    if not isinstance(named, (str, os.PathLike)) or not str(named).strip():
        raise SourceError(f"{folder}/MLmodel: {what} is not a path ({str(named)[:80]!r}).")
    root = folder.resolve()
    try:
        target = (folder / named).resolve()
    except (OSError, RuntimeError, ValueError) as error:
        raise SourceError(f"{folder}/MLmodel: {what} cannot be resolved ({error}).") from error
    if target != root and root not in target.parents:
        raise SourceError(
            f"{folder}/MLmodel: {what} {str(named)[:120]!r} leads outside the model's folder "
            f"(to {target}); refusing to read a file the source does not hold."
        )
    return folder / named


def _load_pickled(folder: Path) -> nn.Module | None:
    """The model of an MLflow model folder, unpickled for real by the MLflow integration;
    ``None`` when its class cannot be imported here."""
    mlflow = platform("mlflow")
    if mlflow is None or mlflow.load_pickled_model is None:
        raise SourceError(
            f"{folder.name!r} is a pickled MLflow model and no installed integration unpickles "
            "MLflow models; audit it without --trust-pickle."
        )
    model = mlflow.load_pickled_model(folder)
    return model if isinstance(model, nn.Module) else None
