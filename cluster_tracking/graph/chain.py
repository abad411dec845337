"""Weight graphs read as chains: named layers (``layers=...``) and bare state_dicts.

A chain has no data flow to follow: each layer reads the previous one's output (a Linear after
a conv reads it flattened). That is right only for a network that *is* a chain, so a state_dict
whose keys or shapes show anything else is refused with the options that give the right graph.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.build import _BlockSpec, _Builder
from cluster_tracking.graph.features import STATE_DICT_ADVICE, _Feat
from cluster_tracking.graph.fx_trace import BATCHNORM_MODULES, CONV_MODULES
from cluster_tracking.graph.selection import list_names, select_layers
from cluster_tracking.graph.types import WeightSource
from cluster_tracking.graph.weights import batchnorm_scale, fold_scale, weight_array


@dataclass
class _ChainEntry:
    name: str
    label: str  # how messages call it: "layer 'fc1' (Linear)" or "weight '0.weight'"
    kind: Literal["linear", "conv", "batchnorm"]
    weight: np.ndarray | None = None
    groups: int = 1  # a state_dict does not say a conv's groups: 1, never inferred
    scale: np.ndarray | None = None  # BatchNorm: the per-channel factor to fold
    source: WeightSource | None = None  # a weight stored otherwise than [out, in] (Conv1D)


def _build_chain(builder: _Builder, entries: Sequence[_ChainEntry], *, strict: bool) -> None:
    """Each layer reads the previous one's output; a Linear after a conv reads it flattened."""
    feat = _Feat(None, origin="the model input", placeholder="input")
    last: _BlockSpec | None = None
    last_is_conv = False
    for entry in entries:
        if entry.kind == "batchnorm":
            assert entry.scale is not None
            if last is None or last.folded is not None:
                if strict:
                    raise GraphError(
                        f"{entry.label} is a BatchNorm that does not directly follow a Linear/Conv "
                        "layer in layers=; put it right after the layer it normalises, or drop it."
                    )
                continue  # a state_dict's BatchNorm before any layer: input normalisation
            builder.fold(last, entry.scale, entry.label, entry.name)
            continue
        assert entry.weight is not None
        conv = entry.kind == "conv"
        groups = entry.groups
        if conv and entry.label.startswith("weight ") and feat.nodes is not None:
            _refuse_inferred_groups(entry, len(feat.nodes))
        if not conv and last_is_conv:
            feat = replace(feat, flat=True)
        feat, last = builder.weight_layer(
            entry.name,
            entry.weight,
            conv=conv,
            groups=groups,
            inp=feat,
            label=entry.label,
            source=entry.source,
        )
        last_is_conv = conv


def _refuse_inferred_groups(entry: _ChainEntry, width: int) -> None:
    """A state_dict conv whose input channels match the previous layer only as a grouped conv:
    the file cannot say whether it is one (a ResNet's 1x1 downsample conv, read after ``conv2``,
    looks like a 2-group conv), so it is refused rather than guessed."""
    assert entry.weight is not None
    per_group = entry.weight.shape[1]
    if per_group == width or not per_group or width % per_group:
        return  # chains as it is, or does not chain at all (the builder says so)
    raise GraphError(
        f"{entry.label} reads {per_group} input channels per group, and the layer before it in "
        f"key order gives {width}: the two chain only if it is a {width // per_group}-group "
        "convolution, which a state_dict does not record (a second branch, such as a ResNet's "
        f"downsample conv, looks the same). {STATE_DICT_ADVICE}"
    )


def _list_names(names: Sequence[str]) -> str:
    return list_names(names, limit=40)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is
    stored ``[in, out]`` (duck-typed, so transformers stays optional)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_weight_layer(module: nn.Module) -> bool:
    """Whether a chain (``layers=``) can read ``module``: Linear, Conv or Conv1D."""
    return isinstance(module, (nn.Linear, *CONV_MODULES)) or is_conv1d(module)


def _module_chain_entries(model: nn.Module, selection: str | Sequence[str]) -> list[_ChainEntry]:
    modules = dict(model.named_modules())
    available = [n for n, m in modules.items() if is_weight_layer(m)]
    layers = select_layers(selection, available, what=type(model).__name__)
    if not layers:
        raise GraphError(
            f"layers= is empty, which selects no graph; name the Linear/Conv layers to use. "
            f"Available Linear/Conv layers: {_list_names(available)}."
        )
    entries = []
    for name in layers:
        module = modules.get(name)
        label = f"layer {name!r} ({type(module).__name__})"
        if layers.count(name) > 1:
            raise GraphError(f"layers= names {name!r} more than once; name each layer once.")
        if module is not None and is_conv1d(module):  # GPT-2's Conv1D: weight stored [in, out]
            weight = weight_array(module.weight, label).T
            source = WeightSource(f"{name}.weight", transposed=True)
            entries.append(_ChainEntry(name, label, "linear", weight, source=source))
        elif isinstance(module, nn.Linear):
            entries.append(
                _ChainEntry(name, label, "linear", weight_array(module.weight, label), 1)
            )
        elif isinstance(module, CONV_MODULES):
            weight = weight_array(module.weight, label)
            entries.append(_ChainEntry(name, label, "conv", weight, int(module.groups)))
        elif isinstance(module, BATCHNORM_MODULES):
            scale = batchnorm_scale(module, label)
            entries.append(_ChainEntry(name, label, "batchnorm", scale=scale))
        else:
            what = "not a module of the model" if module is None else f"a {type(module).__name__}"
            raise GraphError(
                f"layers= names {name!r}, which is {what}; layers= takes the names of "
                "Linear/Conv layers (and of BatchNorm layers to fold into the layer before them). "
                f"Available Linear/Conv layers: {_list_names(available)}."
            )
    return entries


#: Keys of a checkpoint dict that hold the model's weights, in the order they are tried.
CHECKPOINT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "weights",
)


def unwrap_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    holders: tuple[type, ...] = (Mapping, nn.Module),
    max_depth: int = 4,
    followed: list[str] | None = None,
) -> Any:
    """The state_dict (or model) inside a checkpoint dict, e.g. ``{"state_dict": ...}``.

    Follows the first key of :data:`CHECKPOINT_KEYS` whose value is one of ``holders``, at most
    ``max_depth`` levels down; returns ``checkpoint`` itself when no key leads anywhere. The keys
    followed are appended to ``followed`` when a list is given.
    """
    found: Any = checkpoint
    for _ in range(max_depth):
        if not isinstance(found, Mapping):
            break
        for key in CHECKPOINT_KEYS:
            inner = found.get(key)
            if isinstance(inner, holders):
                found = inner
                if followed is not None:
                    followed.append(key)
                break
        else:
            break
    return found


class NameOrderedStateDict(dict):
    """A state_dict whose key order is its names' order, not the modules' declaration order
    (a safetensors file sorts its keys): read as a whole-file chain only when the names
    themselves say the order (see :func:`_refuse_non_chain`)."""


# Name parts that show a state_dict is not one chain: a second branch, attention, embeddings,
# GPT-2's Conv1D layers (stored [in, out]), several heads.
_BRANCH_WORDS = frozenset("downsample shortcut skip residual branch proj_skip".split())
_ATTENTION_WORDS = frozenset(
    "attn attention self_attn q_proj k_proj v_proj o_proj qkv query key value in_proj".split()
)
_EMBEDDING_WORDS = frozenset("embed embeds embedding embeddings embed_tokens wte wpe".split())
_CONV1D_WORDS = frozenset("c_attn c_fc c_proj".split())
# Transposed convolutions store [in, out, *kernel]: a state_dict cannot tell them from convs.
_TRANSPOSED = re.compile(r"^(up|ups|upconv|deconv|upsample|convtranspose|transpose|transposed)\d*$")
_LAYER_SUFFIXES = (
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
)


def _words(prefix: str) -> set[str]:
    parts = set(prefix.split("."))
    return parts | {piece for part in parts for piece in part.split("_")}


def _refuse_non_chain(
    tensors: Mapping[str, Any],
    found: Mapping[str, tuple[str, str]],
    *,
    ordered_by_name: bool,
) -> None:
    """Refuse a whole state_dict whose keys or shapes show it is not one chain of layers: reading
    it as a chain would give a wrong graph that looks right."""
    names = list(found)
    others = [
        key
        for key in tensors
        if key.rsplit(".", 1)[-1] not in _LAYER_SUFFIXES and key not in _LAYER_SUFFIXES
    ]
    seen: list[str] = []
    for name in names:
        words = _words(name)
        if words & _CONV1D_WORDS:
            seen.append(f"GPT-2-style Conv1D layers stored [in, out] ({name!r})")
        elif words & _ATTENTION_WORDS:
            seen.append(f"attention ({name!r})")
        elif words & _EMBEDDING_WORDS:
            seen.append(f"an embedding ({name!r})")
        elif words & _BRANCH_WORDS:
            seen.append(f"a second branch ({name!r})")
        elif any(_TRANSPOSED.match(word) for word in words):
            seen.append(f"what may be a transposed convolution, stored [in, out] ({name!r})")
        if seen:
            break
    if not seen and others:
        seen.append(f"tensors that are not layer weights ({_list_names(others[:4])})")
    heads = [name for name in names if "head" in _words(name) or "heads" in _words(name)]
    if not seen and len(heads) > 1:
        seen.append(f"several heads ({_list_names(heads)})")
    norms = [
        key.removesuffix(".weight")
        for key, value in tensors.items()
        if key.endswith(".weight")
        and getattr(value, "ndim", 0) == 1
        and key.removesuffix("weight") + "running_var" not in tensors
    ]
    if not seen and norms:
        seen.append(
            f"normalisation weights without running statistics ({_list_names(norms[:4])}: "
            "LayerNorm, GroupNorm or RMSNorm, which fold differently)"
        )
    if not seen and ordered_by_name and not _names_give_order(names):
        seen.append(
            "layer names that do not say their order (a safetensors file keeps no "
            f"declaration order; its layers are {_list_names(names)})"
        )
    if seen:
        raise GraphError(
            f"The state_dict shows {seen[0]}, so it is not a chain of layers and cannot be read "
            f"as one without guessing. {STATE_DICT_ADVICE}"
        )


def _refuse_conv1d(layers: Sequence[str]) -> None:
    conv1d = [name for name in layers if _words(name) & _CONV1D_WORDS]
    if conv1d:
        raise GraphError(
            f"layers= names {_list_names(conv1d)}, GPT-2-style Conv1D layers, whose weights are "
            "stored [in, out] where a Linear stores [out, in]; a state_dict does not say which. "
            "Measure the model itself (in the CLI: a Hugging Face model folder with its "
            "config.json)."
        )


def _names_give_order(names: Sequence[str]) -> bool:
    """Whether layer names alone give their order: all the same but for their numbers
    (``0, 2, 4``; ``fc1, fc2, fc3``; ``layers.0.linear, layers.1.linear``)."""
    stems = {re.sub(r"\d+", "#", name) for name in names}
    return len(stems) <= 1


def _state_dict_tensors(state: Mapping[Any, Any]) -> dict[str, Any]:
    tensors = {str(k): v for k, v in state.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    if not tensors:
        raise GraphError(
            "The dict holds no tensors; weight_graph takes a state_dict (name -> tensor) or a "
            "checkpoint holding one under 'state_dict' or 'model_state_dict'."
        )
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel / torch.compile
        if all(key.startswith(prefix) for key in tensors):
            tensors = {key.removeprefix(prefix): value for key, value in tensors.items()}
    applied: dict[str, Any] = {}
    for key, value in tensors.items():  # torch.nn.utils.prune: weight = weight_orig * weight_mask
        if key.endswith("_mask") and key.removesuffix("_mask") + "_orig" in tensors:
            continue
        mask = tensors.get(key.removesuffix("_orig") + "_mask") if key.endswith("_orig") else None
        if mask is not None:
            applied[key.removesuffix("_orig")] = _as_cpu(value) * _as_cpu(mask)
        else:
            applied[key] = value
    return applied


def _as_cpu(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)


def _state_dict_entries(
    state: Mapping[Any, Any], selection: str | Sequence[str] | None
) -> list[_ChainEntry]:
    tensors = _state_dict_tensors(state)
    found: dict[str, tuple[Literal["linear", "conv", "batchnorm"], str]] = {}
    for key, value in tensors.items():
        if key.endswith(".running_var") or key == "running_var":
            prefix = key.removesuffix("running_var").removesuffix(".")
            found[prefix or "batchnorm"] = ("batchnorm", key)
        elif key.endswith(".weight") or key == "weight":
            prefix = key.removesuffix("weight").removesuffix(".")
            if value.ndim == 2:
                found[prefix or "weight"] = ("linear", key)
            elif 3 <= value.ndim <= 5:
                found[prefix or "weight"] = ("conv", key)
    available = [name for name, (kind, _) in found.items() if kind != "batchnorm"]
    layers = (
        None if selection is None else select_layers(selection, available, what="the state_dict")
    )
    if layers is None:
        _refuse_non_chain(tensors, found, ordered_by_name=isinstance(state, NameOrderedStateDict))
        selected = list(found)
    else:
        _refuse_conv1d(layers)
        unknown = [name for name in layers if name not in found]
        if not layers:
            raise GraphError(
                "layers= is empty, which selects no graph; name the Linear/Conv layers to use. "
                f"Available layers: {_list_names(available)}."
            )
        if unknown:
            raise GraphError(
                f"layers= names {_list_names(unknown)}, not Linear/Conv weights of the "
                f"state_dict. Available layers: {_list_names(available)}."
            )
        selected = list(layers)
    entries = []
    for name in selected:
        kind, key = found[name]
        label = f"weight {key!r}"
        if kind != "batchnorm":
            weight = weight_array(tensors[key], label)
            entries.append(_ChainEntry(name, label, kind, weight))
            continue
        prefix = key.removesuffix("running_var")
        running_var = weight_array(tensors[key], label)
        gamma_value = tensors.get(prefix + "weight")
        gamma = (
            np.ones_like(running_var) if gamma_value is None else weight_array(gamma_value, label)
        )
        scale = fold_scale(gamma, running_var, 1e-5, label)
        entries.append(_ChainEntry(name, f"BatchNorm {key!r}", "batchnorm", scale=scale))
    return entries
