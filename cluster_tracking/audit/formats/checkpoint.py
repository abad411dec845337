"""Where a model's weights are in what a ``torch.save`` file held.

A state_dict, a checkpoint dict (``{"state_dict": ...}``, a Lightning ``.ckpt``, the keys of
:data:`~cluster_tracking.graph.chain.CHECKPOINT_KEYS`, followed by
:func:`~cluster_tracking.graph.chain.unwrap_checkpoint`), a pickled module, or one read with
stand-ins.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cluster_tracking.audit.formats.stand_ins import (
    TRUST_HINT,
    StandIn,
    is_stand_in_module,
    stand_in_state_dict,
    walk_objects,
)
from cluster_tracking.errors import SourceError
from cluster_tracking.graph.chain import CHECKPOINT_KEYS, unwrap_checkpoint
from cluster_tracking.graph.selection import list_names

#: ``(weights, format, prefix, notes)``: what a reader found in one file.
WeightFileRead = tuple["nn.Module | dict[str, Any]", str, str, list[str]]


def from_checkpoint(loaded: Any, path: Path, trusted: bool, notes: list[str]) -> WeightFileRead:
    """Find the weights in what a file held: a state_dict, a checkpoint dict, a module."""
    weights, where = _find_weights(loaded, path)
    prefix = ""
    lightning = isinstance(loaded, Mapping) and (
        "pytorch-lightning_version" in loaded
        or (path.name.lower().endswith(".ckpt") and "state_dict" in loaded)
    )
    if isinstance(weights, nn.Module):
        kind = f"pickled module {type(weights).__name__} (unpickled with --trust-pickle)"
    elif lightning:
        weights, prefix = strip_common_prefix(weights)
        kind = "Lightning checkpoint, state_dict"
        if prefix:
            notes.append(
                f"the LightningModule attribute prefix {prefix!r} was removed from the layer "
                "names (--layers takes names with or without it)."
            )
    else:
        kind = where
    stand_ins = sorted(
        {type(value).qualified_name for value in walk_objects(loaded) if isinstance(value, StandIn)}
    )
    if stand_ins:
        notes.append(
            "read without running code from the file: "
            f"{list_names(stand_ins, 4)} {'was' if len(stand_ins) == 1 else 'were'} neither "
            "imported nor called (--trust-pickle would unpickle it for real)."
        )
    elif trusted and not isinstance(weights, nn.Module):
        notes.append("unpickled with --trust-pickle.")
    return weights, kind, prefix, notes


def _find_weights(value: Any, path: Path, where: str = "", depth: int = 0) -> tuple[Any, str]:
    """``(weights, description)``: a module, or a state_dict of string keys and tensors."""
    label = f"{path}{where}"
    inside = f", under {where}" if where else ""
    if depth > 8:
        raise SourceError(f"{path}: checkpoint dicts nested too deep to hold a model's weights.")
    if isinstance(value, nn.Module):
        return value, "module"
    if isinstance(value, StandIn):
        short = value.qualified_name.rsplit(".", 1)[-1]
        if is_stand_in_module(value):
            state = stand_in_state_dict(value)
            if state:
                return state, f"pickled module {short}{inside}, weights read without its code"
            raise SourceError(f"{label} is a pickled module without weights.")
        raise SourceError(
            f"{label} is a pickle of {value.qualified_name}, not weights that can be read "
            f"without running code from it; {TRUST_HINT}."
        )
    if isinstance(value, Mapping):
        tensors = {str(k): v for k, v in value.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors, f"checkpoint, state_dict{inside}" if where else "state_dict"
        followed: list[str] = []
        inner = unwrap_checkpoint(
            value, holders=(Mapping, nn.Module, StandIn), max_depth=1, followed=followed
        )
        if followed:
            return _find_weights(inner, path, f"{where}[{followed[0]!r}]", depth + 1)
        nested = [
            key
            for key, inner in value.items()
            if isinstance(inner, Mapping)
            and any(isinstance(v, torch.Tensor) for v in inner.values())
        ]
        if len(nested) == 1:
            return _find_weights(value[nested[0]], path, f"{where}[{nested[0]!r}]", depth + 1)
        keys = list_names([str(key) for key in value.keys()], 12)
        raise SourceError(
            f"{label} is a dict without a model's weights (keys: {keys}); audit a state_dict or "
            f"a checkpoint holding one under {' / '.join(repr(k) for k in CHECKPOINT_KEYS[:3])}."
        )
    raise SourceError(
        f"{label} holds a {type(value).__name__}, not a model's weights; save "
        "model.state_dict() (torch.save or safetensors) and audit that."
    )


def strip_common_prefix(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove the dotted prefix every layer name shares (``model.`` of ``self.model``), keeping
    at least one component of each layer's own name."""
    modules = [key.split(".")[:-1] for key in state]
    if not modules or any(not parts for parts in modules):
        return state, ""
    common: list[str] = []
    for components in zip(*modules, strict=False):
        if len(set(components)) != 1:
            break
        common.append(components[0])
    common = common[: min(len(parts) for parts in modules) - 1]
    if not common:
        return state, ""
    prefix = ".".join(common) + "."
    return {key.removeprefix(prefix): value for key, value in state.items()}, prefix
