"""Example inputs for exporting a model (``torch.export`` needs one call's worth of inputs): small
ones for a model whose input is known without the user saying it (a Hugging Face model, from its
config; a timm model, from its ``pretrained_cfg``), and the LM head of a language model, left out
of its weight graph unless embeddings are included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.export_units import _EXPORT_HINT


def is_hugging_face(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (duck-typed: transformers stays
    optional)."""
    return (
        hasattr(model, "config")
        and hasattr(model, "main_input_name")
        and callable(getattr(model, "get_input_embeddings", None))
    )


def example_inputs_for(model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Small example inputs for a model whose input is known without the user saying it: a
    Hugging Face model (from its config) or a timm model (its ``pretrained_cfg`` input size).
    ``None`` when there is no way to know."""
    device = _device_of(model)
    if is_hugging_face(model):
        return (), _hugging_face_inputs(model, device)
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(config, Mapping) and isinstance(config.get("input_size"), (tuple, list)):
        size = tuple(int(s) for s in config["input_size"])
        return (torch.zeros((1, *size), device=device, dtype=_float_dtype_of(model)),), {}
    return None


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's weights are (example inputs go there too; the meta device for a model
    whose weights are all there, traced for its shapes alone)."""
    tensors = (*model.parameters(), *model.buffers())
    for tensor in tensors:
        if not tensor.is_meta:
            return tensor.device
    return torch.device("meta" if tensors else "cpu")


def _float_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (a bf16 model takes bf16 images)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _hugging_face_inputs(model: nn.Module, device: torch.device) -> dict[str, Any]:
    import inspect

    floats: dict[str, Any] = {"device": device, "dtype": _float_dtype_of(model)}
    config: Any = model.config
    main = str(getattr(model, "main_input_name", "input_ids"))
    parameters = inspect.signature(model.forward).parameters
    inputs: dict[str, Any] = {}
    tokens = 8
    if main == "input_ids":
        vocabulary = int(getattr(config, "vocab_size", 32) or 32)
        ids = torch.arange(tokens, device=device) % max(vocabulary - 1, 1)
        inputs[main] = ids.reshape(1, tokens) + 1
    elif main == "pixel_values":
        channels = int(getattr(config, "num_channels", 3) or 3)
        size = getattr(config, "image_size", 32)
        if isinstance(size, (list, tuple)):
            height, width = int(size[0]), int(size[-1])
        else:
            height = width = int(size or 32)
        inputs[main] = torch.zeros(1, channels, height, width, **floats)
    elif main == "input_features":
        mels = int(getattr(config, "num_mel_bins", 80) or 80)
        frames = 2 * int(getattr(config, "max_source_positions", 1500) or 1500)
        inputs[main] = torch.zeros(1, mels, frames, **floats)
    elif main == "input_values":
        inputs[main] = torch.zeros(1, 16000, **floats)
    else:
        raise GraphError(
            f"{type(model).__name__} takes {main!r} as its main input, for which the weight graph "
            f"has no example; {_EXPORT_HINT}."
        )
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        start = int(getattr(config, "decoder_start_token_id", 0) or 0)
        inputs["decoder_input_ids"] = torch.full((1, 4), start, dtype=torch.long, device=device)
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    return inputs


def lm_head_parameters(model: nn.Module) -> frozenset[str]:
    """The parameter names of a Hugging Face model's output embeddings (its LM head)."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return frozenset()
    try:
        head = get()
    except (AttributeError, NotImplementedError, TypeError):
        return frozenset()
    if not isinstance(head, nn.Module):
        return frozenset()
    ids = {id(p) for p in head.parameters()}
    return frozenset(
        name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in ids
    )
