"""Hugging Face model folders (``save_pretrained``: ``config.json`` and safetensors weights).

A bare state_dict cannot say a transformer's data flow, so a model folder is audited as the
live model is: the architecture is built from ``config.json`` by transformers itself (the class
named in ``architectures``, never code from the folder: ``trust_remote_code`` stays off and a
config that needs it is refused), the weights are read from safetensors (no pickle), and the
weight graph follows the model with ``torch.export`` exactly as for a model in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster_tracking.errors import SourceError, first_line
from cluster_tracking.graph.model_folder import is_model_folder, model_class_for

__all__ = ["is_model_folder", "load_model_folder", "model_class_for"]


def load_model_folder(folder: Path) -> Any:
    """The model of a ``save_pretrained`` folder, built by transformers from its config, with
    its safetensors weights.

    Raises:
        SourceError: transformers is not installed, the config needs remote code or names an
            architecture this transformers does not have, the weights are not safetensors, or
            they do not fit the architecture.
    """
    model_class = model_class_for(folder)
    import transformers

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
        raise SourceError(
            f"{folder}: transformers cannot build the model from its config.json and weights "
            f"({type(error).__name__}: {first_line(error)})."
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
