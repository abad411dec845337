"""Reading weights from a model: float64 copies, BatchNorm scales, and the live weights of a graph.

:func:`live_weights` reads every block of a :class:`~cluster_tracking.graph.types.WeightGraph`
again from the model's parameters, applying what :class:`~cluster_tracking.graph.types.WeightSource`
records (transposes, gate sums, column orders, folded normalisations), so that a graph traced
once is refreshed at every due step without tracing again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.types import EdgeBlock, WeightGraph, WeightSource

__all__ = ["layer_weight", "live_weights"]


def weight_array(tensor: Any, label: str) -> np.ndarray:
    """A float64 CPU copy of a weight tensor; GraphError naming ``label`` if it is not finite."""
    if isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
        raise GraphError(
            f"{label} is a lazy module that has not been initialised; run one forward pass "
            "through the model before measuring it."
        )
    if isinstance(tensor, np.ndarray):
        array = np.array(tensor, dtype=np.float64)
    elif isinstance(tensor, torch.Tensor):
        t = tensor.detach()
        if t.is_meta:
            raise GraphError(
                f"{label} has its weights on the meta device (no values); load real weights "
                "(e.g. model.load_state_dict(..., assign=True)) before measuring."
            )
        if t.is_quantized:
            t = t.dequantize()
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_complex():
            raise GraphError(f"{label} has complex weights; a weight graph needs real ones.")
        if not t.is_floating_point():
            what = "a mask" if t.dtype == torch.bool else "quantized weights without their scales"
            raise GraphError(
                f"{label} holds {t.dtype} values ({what}); their magnitudes are not weights. "
                "Measure the float weights (apply the mask, or dequantize with the scales first)."
            )
        array = t.to(device="cpu", dtype=torch.float64, copy=True).numpy()
    else:
        raise GraphError(f"{label} is a {type(tensor).__name__}, not a weight tensor.")
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise GraphError(
            f"{label} has {bad} NaN/Inf weight value(s); a weight graph needs finite weights. "
            "The training run has probably diverged: measure an earlier checkpoint, or lower the "
            "learning rate / clip gradients."
        )
    return array


def batchnorm_scale(module: Any, label: str) -> np.ndarray:
    """``|gamma| / sqrt(running_var + eps)`` per channel (``|gamma|`` without running stats)."""
    n = int(module.num_features)
    if module.affine and module.weight is not None:
        gamma = weight_array(module.weight, label)
    else:
        gamma = np.ones(n)
    if module.running_var is None:
        return np.abs(gamma)
    return fold_scale(gamma, weight_array(module.running_var, label), float(module.eps), label)


def fold_scale(gamma: np.ndarray, running_var: np.ndarray, eps: float, label: str) -> np.ndarray:
    if (running_var < 0).any():
        raise GraphError(f"{label} has a negative running_var; the checkpoint is corrupt.")
    return np.abs(gamma) / np.sqrt(running_var + eps)


def fetch_attr(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def unwrap_module(model: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    for _ in range(4):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            break
    return model


def layer_weight(model: nn.Module, block: EdgeBlock) -> torch.Tensor:
    """The parameter holding ``block``'s weight in ``model`` (a module called twice shares it):
    ``model.get_submodule(name).weight``, or ``model.get_parameter(name)`` for a functional layer,
    or the parameter its :class:`~cluster_tracking.graph.types.WeightSource` names.

    Raises :class:`~cluster_tracking.errors.GraphError` when there is none, or when its shape is
    no longer the one the graph read.
    """
    name = block.name.split("#", 1)[0]  # "layer#2": the second call of a shared layer
    found: object = None
    if block.source is not None:
        found = _parameter(model, block.source.parameter)
    else:
        try:
            found = getattr(model.get_submodule(name), "weight", None)
        except AttributeError:
            pass
        if not isinstance(found, torch.Tensor):
            found = _parameter(model, name)
    if not isinstance(found, torch.Tensor):
        raise GraphError(
            f"Layer {block.name!r} of the weight graph has no weight tensor at "
            f"model.get_submodule({name!r}).weight or model.get_parameter({name!r}); reading a "
            "traced graph's weights again (the regulariser, the clusterable initialisation, the "
            "tracker's later steps) needs each layer's weight to be a parameter of the model "
            "(use nn.Linear/nn.Conv modules, or pass layers=[...])."
        )
    expected = block.weight.shape if block.source is None else None
    if expected is not None and tuple(found.shape) != expected:
        raise GraphError(
            f"Layer {block.name!r} has a weight of shape {tuple(found.shape)} but the weight graph "
            f"read {expected}; the model changed shape since its graph was traced (build "
            "the regulariser after the model's final shapes are set, e.g. after lazy modules have "
            "run once)."
        )
    return found


def _parameter(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        pass
    try:
        found = model.get_buffer(name)
    except AttributeError:
        return None
    return found if isinstance(found, torch.Tensor) else None


def effective_weight(raw: np.ndarray, source: WeightSource, read: Any, label: str) -> np.ndarray:
    """A block's weight from its parameter's values ``raw`` as ``source`` says (transpose, gate
    sum, column order, folded scales); ``read(name)`` gives the float64 values of a parameter
    named in ``source``. The tracers build blocks through this function and
    :func:`live_weights` reads them again through it, so both give the same numbers. ``raw`` is
    a fresh copy the caller hands over (:func:`weight_array`'s): it may be scaled in place."""
    weight = np.swapaxes(raw, 0, 1) if source.transposed else raw
    if source.gates > 1:
        if weight.shape[0] % source.gates:
            raise GraphError(
                f"{label}: {weight.shape[0]} rows do not split into {source.gates} gates."
            )
        weight = np.abs(weight).reshape(source.gates, -1, *weight.shape[1:]).sum(axis=0)
    if source.columns is not None:
        weight = weight[:, source.columns]
    else:
        weight = np.ascontiguousarray(weight)  # a copy only where transposed
    for name, index, offset in source.input_scales:
        factor = np.abs(offset + np.asarray(read(name)).reshape(-1)[index])
        per_group = weight.shape[1]
        if len(factor) != per_group:  # a grouped conv: output b reads its group's channels
            groups = len(factor) // per_group
            by_group = factor.reshape(groups, 1, per_group)
            factor_2d = np.repeat(by_group, weight.shape[0] // groups, axis=1)
            weight *= factor_2d.reshape((weight.shape[0], per_group) + (1,) * (weight.ndim - 2))
            continue
        weight *= factor.reshape((1, -1) + (1,) * (weight.ndim - 2))
    for name, index, offset in source.output_scales:
        factor = np.abs(offset + np.asarray(read(name)).reshape(-1)[index])
        weight *= factor.reshape((-1,) + (1,) * (weight.ndim - 1))
    return weight


def deferred_placeholder(shape: tuple[int, ...], source: WeightSource, label: str) -> np.ndarray:
    """A zero-stride stand-in (ones, no memory) of the shape :func:`effective_weight` would give
    a parameter of ``shape``: for a graph whose weights are read later, block by block."""
    out = list(shape)
    if source.transposed:
        out[0], out[1] = out[1], out[0]
    if source.gates > 1:
        if out[0] % source.gates:
            raise GraphError(f"{label}: {out[0]} rows do not split into {source.gates} gates.")
        out[0] //= source.gates
    if source.columns is not None:
        out[1] = len(source.columns)
    return np.broadcast_to(np.float32(1.0), tuple(out))


def live_weights(model: nn.Module, graph: WeightGraph) -> list[np.ndarray]:
    """The effective weight of every block of ``graph`` read again from ``model``'s parameters.

    ``graph`` must have been built from ``model`` (or a model of the same structure): each
    block's weight is copied to the CPU in float64 (:func:`layer_weight`), what its
    :class:`~cluster_tracking.graph.types.WeightSource` records applied again (transposes, gate
    sums, folded LayerNorm/RMSNorm weights) and the folded BatchNorm's
    ``|gamma| / sqrt(running_var + eps)``, so ``graph.with_weights(live_weights(model, graph))``
    is ``weight_graph(model)`` without tracing the model again (what the tracker does at every
    due step after the first). Raises :class:`~cluster_tracking.errors.GraphError` when a layer
    is missing or its weight changed shape: trace again then.
    """
    model = unwrap_module(model)

    def read(name: str) -> np.ndarray:
        found = _parameter(model, name)
        if found is None:
            raise GraphError(f"Parameter {name!r} of the weight graph is not in the model.")
        return weight_array(found, f"parameter {name!r}")

    weights = []
    for block in graph.blocks:
        label = f"layer {block.name!r}"
        weight = weight_array(layer_weight(model, block), label)
        if block.source is not None:
            weight = effective_weight(weight, block.source, read, label)
        if block.batchnorm is not None:
            try:
                batchnorm = model.get_submodule(block.batchnorm)
            except AttributeError as error:
                raise GraphError(f"BatchNorm {block.batchnorm!r} is not in the model.") from error
            scale = batchnorm_scale(batchnorm, f"layer {block.batchnorm!r}")
            weight *= scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        if weight.shape != block.weight.shape:
            raise GraphError(
                f"Layer {block.name!r} now gives a weight of shape {weight.shape} but the weight "
                f"graph read {block.weight.shape}; the model changed shape since its graph was "
                "traced: build the graph again."
            )
        weights.append(weight)
    return weights
