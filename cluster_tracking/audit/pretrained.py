"""Hugging Face model folders (``save_pretrained``: ``config.json`` and safetensors weights).

A bare state_dict cannot say a transformer's data flow, so a model folder is audited as the
live model is: the architecture is built from ``config.json`` by transformers itself (the class
named in ``architectures``, never code from the folder: ``trust_remote_code`` stays off and a
config that needs it is refused), the weights are read from safetensors (no pickle), and the
weight graph follows the model with ``torch.export`` exactly as for a model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster_tracking.errors import SourceError

__all__ = ["is_model_folder", "load_model_folder"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like a Hugging Face ``save_pretrained`` folder."""
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in (*_WEIGHTS, "pytorch_model.bin")
    )


def load_model_folder(folder: Path) -> Any:
    """The model of a ``save_pretrained`` folder, built by transformers from its config, with
    its safetensors weights.

    Raises:
        SourceError: transformers is not installed, the config needs remote code or names an
            architecture this transformers does not have, the weights are not safetensors, or
            they do not fit the architecture.
    """
    config = _read_config(folder)
    if "auto_map" in config:
        raise SourceError(
            f"{folder}/config.json maps the model to code of its own (auto_map), which "
            "cluster-tracking never runs (trust_remote_code stays off); audit a state_dict of the "
            "model with --layers, or load the model in Python yourself and call measure(model)."
        )
    if not any((folder / name).is_file() for name in _WEIGHTS):
        raise SourceError(
            f"{folder} holds pytorch_model.bin but no model.safetensors: the audit reads model "
            "folders without unpickling; save the model with safe_serialization=True (the "
            "default of save_pretrained) and audit that folder."
        )
    try:
        import transformers
    except ImportError as error:
        raise SourceError(
            f"{folder} is a Hugging Face model folder; reading it needs transformers: "
            "pip install 'cluster-tracking[transformers]'."
        ) from error
    names = config.get("architectures") or []
    model_class = getattr(transformers, str(names[0]), None) if names else None
    if model_class is None and names:
        raise SourceError(
            f"{folder}/config.json names the architecture {names[0]!r}, which this version of "
            "transformers does not have; upgrade transformers, or audit a state_dict with --arch."
        )
    if model_class is None:
        model_class = transformers.AutoModel
    transformers.logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(
            str(folder),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError) as error:
        first = " ".join((str(error).strip().splitlines() or [""])[0].split())[:300]
        raise SourceError(
            f"{folder}: transformers cannot build the model from its config.json and weights "
            f"({type(error).__name__}: {first})."
        ) from error
    model, info = model
    missing = [name for name in info.get("missing_keys", []) if name]
    missing += [f"unexpected {name}" for name in info.get("unexpected_keys", []) if name]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5])
        raise SourceError(
            f"{folder}: the weights and the architecture its config.json names differ in "
            f"{len(missing)} tensor(s) ({shown}); the folder does not match its config."
        )
    model.eval()
    return model


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path} cannot be read as JSON ({error}).") from error
    if not isinstance(config, dict):
        raise SourceError(f"{path} is not a JSON object.")
    return config
