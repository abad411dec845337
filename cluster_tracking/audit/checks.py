"""The weights a reader returned, checked before they reach the weight graph.

Weights whose magnitudes mean nothing alone are refused, not measured: bool masks, integer
(quantized) weights without their scales, layers without neurons, all-zero models. PyTorch's own
quantized tensors carry their scales and are dequantized first.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.selection import list_names


def _is_weight(name: str, value: Any) -> bool:
    """A tensor the weight graph reads as edges: a ``weight`` of two or more dimensions."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() >= 2
        and name.rsplit(".", 1)[-1] in ("weight", "weight_orig")
    )


def _all_zero(value: torch.Tensor) -> bool:
    """Whether every value of ``value`` is zero, without materialising a view larger than its
    storage (a weight expanded from one stored element: its values are its storage's)."""
    storage = value.untyped_storage()
    if value.numel() * value.element_size() > storage.nbytes():
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        return not bool(raw.any())
    if not value.numel():
        return True
    # A slab of rows at a time: ``value.any()`` would hold a bool copy of the whole weight.
    rows = max(1, (1 << 20) // max(1, value.numel() // value.shape[0]))
    return not any(bool(part.any()) for part in value.split(rows, 0))


def checked_weights(
    weights: nn.Module | dict[str, Any], shown: str
) -> tuple[nn.Module | dict[str, Any], list[str]]:
    """The weights a reader returned, checked before they reach the weight graph.

    PyTorch's quantized tensors are dequantized (their scales are stored with them). Refused
    with a :class:`~cluster_tracking.errors.GraphError` (exit 4): bool weights (a mask's 0/1
    would be measured as a graph), integer weights (quantized values whose scales are stored
    elsewhere: their magnitudes mean nothing alone), a layer without neurons (a dimension of
    size 0), and a model whose weights are all zero (a graph without edges).
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    notes: list[str] = []
    dequantized = [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_quantized
    ]
    if dequantized and isinstance(weights, dict):
        weights = copy.copy(weights)  # keeps its type (a name-ordered state_dict stays one)
        for key in dequantized:
            weights[key] = weights[key].dequantize()
        state = weights
        notes.append(
            f"PyTorch-quantized tensors {list_names(dequantized, 4)} were dequantized with their "
            "stored scales before measuring."
        )
    graph_weights = {key: value for key, value in state.items() if _is_weight(key, value)}
    for key, value in graph_weights.items():
        shape = list(value.shape)
        if value.dtype == torch.bool:
            raise GraphError(
                f"{shown}: {key} holds bool values (shape {shape}): a mask, not weights; a 0/1 "
                "graph says nothing about clusterability. Audit the weights the mask applies to "
                "(e.g. weight_orig * weight_mask of a pruned layer)."
            )
        if value.is_quantized:
            raise GraphError(
                f"{shown}: {key} is a quantized tensor inside a pickled module; save "
                "model.dequantize().state_dict() or audit the float model."
            )
        if not (value.is_floating_point() or value.is_complex()):
            raise GraphError(
                f"{shown}: {key} holds integer values ({str(value.dtype).removeprefix('torch.')}, "
                f"shape {shape}): quantized weights, whose magnitudes mean nothing without the "
                "scales and zero points stored beside them, which this reader does not know. "
                "Dequantize the model and audit its float weights."
            )
        if value.numel() == 0:
            raise GraphError(
                f"{shown}: {key} has shape {shape}: a layer without neurons, so there is no "
                "weight graph to measure."
            )
    if graph_weights and all(_all_zero(value) for value in graph_weights.values()):
        raise GraphError(
            f"{shown}: every weight is zero ({len(graph_weights)} weight tensors): the weight "
            "graph has no edges, so it has no clusters to measure (an untrained or wiped model?)."
        )
    return weights, notes
