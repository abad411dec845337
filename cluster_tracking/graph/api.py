"""Weight graphs: a network's neurons as nodes, its weight magnitudes as edges.

Filan et al. (2021), section 2. Every neuron is a node, and two neurons of consecutive layers
are joined by an edge weighing the magnitude of the weight between them:

* ``nn.Linear`` with weight ``W`` of shape ``[out, in]``: every unit of every layer is a node,
  the input layer included, and edge (input i, output j) weighs ``|W[j, i]|``.
* ``nn.Conv1d/2d/3d`` with kernel ``W`` of shape ``[out, in / groups, *kernel]``: every
  *channel* is a node, and edge (input channel a, output channel b) weighs the L1 norm of the
  kernel slice, ``sum |W[b, a, ...]|`` (``norm="l2"``: its L2 norm). A grouped or depthwise
  convolution only joins channels of the same group.
* A ``BatchNorm1d/2d/3d`` that directly consumes a Linear/Conv output (and is that output's only
  reader) is folded in first: output unit b's weights are multiplied by
  ``|gamma_b| / sqrt(running_var_b + eps)`` (``gamma = 1`` without affine parameters; a
  BatchNorm without running statistics folds ``|gamma_b|`` only). A BatchNorm elsewhere (e.g.
  after a residual add) is a per-channel scaling and passes through unfolded.
* A conv output flattened (``nn.Flatten``, ``torch.flatten``, ``x.view(x.size(0), -1)``,
  ``x.reshape(...)``) into a Linear with ``in_features = C * S`` gives a ``"flatten"`` block:
  channel c and output unit j are joined by ``sum_s |W[j, c * S + s]|``, the sum over the S
  flattened positions of channel c (channel-major, as ``flatten`` lays them out). After global
  pooling (``in_features == C``) it is a plain ``"linear"`` block from the channel nodes.

For a model the graph follows the real data flow, traced with ``torch.fx.symbolic_trace`` (not
the modules' declaration order). Activations, dropout, identity, pooling, padding, upsampling,
normalisation layers without cross-unit weights (LayerNorm, GroupNorm, InstanceNorm, unfolded
BatchNorm), softmax and scaling by constants pass nodes through unchanged. A residual add
(``+``, ``+=``, ``torch.add``; also ``-``, ``*`` and ``/`` between two feature tensors, e.g.
squeeze-and-excitation gating) *identifies* the units it combines: unit i of one operand is
the same node as unit i of the other. A merged node belongs to the earliest layer among its
members; a layer all of whose nodes were merged into earlier layers is left out of
``layer_names`` and recorded in ``WeightGraph.merged``. A concatenation along the channel dim
(``torch.cat(..., dim=1)``) keeps units apart: its nodes are the operands' nodes, in order.
A module called several times gets one layer per call, named ``name``, ``name#2``, ...

Node order is public and stable: layer by layer from the input, in data-flow order, and by
index inside a layer. ``layer_names`` are the modules' qualified names (``"0"``, ``"2"`` in an
``nn.Sequential``; ``"fc1"``, ``"layer1.0.conv1"`` in a custom module), the input layer is
``"input"`` (``"input.<argument>"`` for each of several model inputs) and its width is what the
first layer reading it reads: ``in_features`` (e.g. 784 pixels of a flattened image) or
``in_channels``.

:func:`weight_graph` builds the graph from a model (following its real data flow with
``torch.fx``), from a chain of named layers, or from a bare ``state_dict``. The graph types
(:class:`WeightGraph`, :class:`EdgeBlock`) live in :mod:`cluster_tracking.graph.types`, which
needs no torch, and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from torch import nn

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph.build import _Builder
from cluster_tracking.graph.chain import (
    _build_chain,
    _module_chain_entries,
    _state_dict_entries,
    unwrap_checkpoint,
)
from cluster_tracking.graph.example_inputs import (
    example_inputs_for,
    is_hugging_face,
    lm_head_parameters,
)
from cluster_tracking.graph.export import ExportWalker
from cluster_tracking.graph.fx_trace import FxWalker
from cluster_tracking.graph.selection import parse_layers
from cluster_tracking.graph.types import KernelNorm, Preset, WeightGraph
from cluster_tracking.graph.weights import unwrap_module

__all__ = ["weight_graph", "weight_topology"]


def weight_graph(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    *,
    norm: Literal["l1", "l2"] = "l1",
    preset: Preset = "default",
    layers: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    include_embeddings: bool = False,
) -> WeightGraph:
    """The weight graph of a network (Filan et al. 2021, section 2), ready for spectral clustering.

    Every neuron is a node, and two neurons of consecutive layers are joined by an edge weighing
    the magnitude of the weight between them (Linear, Conv, BatchNorm folding and flattened
    feature maps: see :mod:`cluster_tracking.graph.api`). For a model the graph follows its real
    data flow, and nodes come in the public order (same module).

    Args:
        model_or_state_dict: an ``nn.Module`` (``DataParallel``/``DistributedDataParallel`` and
            ``torch.compile`` wrappers are unwrapped), or a bare ``state_dict`` (``name ->
            tensor``), or a checkpoint dict holding one under ``"state_dict"``,
            ``"model_state_dict"`` or ``"model"``. A state_dict has no data flow to follow, so it
            is read as a chain: its ``*.weight`` tensors (2-D Linear, 3- to 5-D conv) in key order
            (the modules' declaration order), each layer reading the previous one; conv groups are
            inferred from the widths; BatchNorm entries (a ``running_var`` next to a 1-D weight)
            are folded into the layer before them with the default ``eps = 1e-5``; a leading
            ``module.``/``_orig_mod.`` prefix is stripped and pruned weights (``weight_orig`` times
            ``weight_mask``) are applied.
        norm: how a conv kernel slice becomes one edge weight: ``"l1"`` (sum of magnitudes) or
            ``"l2"`` (Euclidean norm).
        preset: ``"default"`` (the module's rules) or ``"filan2021"``, the choices of the
            published code of Filan et al. (2021). For networks with convolutions it differs from
            the default in three ways: (1) only conv-to-conv edges are kept, so the node layers are
            the conv layers' output channels only (no input-channel layer, no Linear layer, no
            flatten block; a convolution that also reads input channels is left out); (2) the
            kernel "L1" norm is numpy's induced matrix 1-norm of the 2-D slice ``|W[b, a]|`` (its
            largest column sum, ``np.linalg.norm(slice, 1)``), not the sum of all its entries (1-D
            and 3-D kernels fall back to the entry sum); (3) ``norm`` must stay ``"l1"``. For
            networks without convolutions it equals the default. BatchNorm folding, residual
            merging and node order are the same in both presets.
        layers: names of the Linear/Conv modules (or state_dict prefixes) to use, in data-flow
            order. The graph is then the chain of these layers, each reading the previous one's
            output (a Linear after a conv reads it flattened), with no tracing: the way to measure
            a model that ``torch.fx`` cannot trace or whose other layers the graph cannot follow.
            A BatchNorm name placed right after a layer's name is folded into that layer.

    Returns:
        The :class:`WeightGraph`: ``layer_names``, ``widths``, the symmetric ``[n_nodes, n_nodes]``
        float64 ``adjacency`` (scipy CSR, no self-loops; parallel edges add up), and the weight
        ``blocks`` (effective float64 tensors, BatchNorm folded) that null models shuffle.

    Raises:
        GraphError: the input is not a module or a dict of tensors; it has no Linear/Conv layer;
            ``torch.fx`` cannot trace the model; the data flow goes through a layer or an operation
            that mixes units without Linear/Conv weights (``nn.LSTM``, ``nn.MultiheadAttention``,
            ``torch.matmul``, ``permute``...); a weight holds NaN/Inf; a state_dict's layers do not
            chain; ``layers`` names an unknown layer. Each message names the layer and what to do.
        ConfigError: an unknown ``norm`` or ``preset``, or ``preset="filan2021"`` with
            ``norm="l2"``.

    Weights are detached, copied to the CPU as float64 (any device, any float dtype); the model is
    not modified, run or switched between train and eval mode.
    """
    return _build_graph(
        model_or_state_dict,
        norm,
        preset,
        layers,
        assemble=True,
        example_inputs=example_inputs,
        include_embeddings=include_embeddings,
    )


def weight_topology(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    *,
    norm: Literal["l1", "l2"] = "l1",
    preset: Preset = "default",
    layers: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    include_embeddings: bool = False,
) -> WeightGraph:
    """:func:`weight_graph` without its sparse adjacency (an empty ``[n, n]`` matrix): the layers
    and the weight blocks, from which ``graph.with_weights(weights)`` assembles the adjacency
    elsewhere. The tracker's training thread takes this at a first due step, so that the
    adjacency (the larger part of the work for an MLP) is assembled in the background."""
    return _build_graph(
        model_or_state_dict,
        norm,
        preset,
        layers,
        assemble=False,
        example_inputs=example_inputs,
        include_embeddings=include_embeddings,
    )


def _build_graph(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    norm: Literal["l1", "l2"],
    preset: Preset,
    layers: str | Sequence[str] | None,
    *,
    assemble: bool,
    example_inputs: Any = None,
    include_embeddings: bool = False,
) -> WeightGraph:
    check_graph_options(norm, preset)
    selection = layers if parse_layers(layers) is not None else None

    source: object = model_or_state_dict
    if isinstance(source, Mapping):
        source = unwrap_checkpoint(source)
    builder = _Builder(norm)
    if isinstance(source, nn.Module):
        model = unwrap_module(source)
        what = f"the model {type(model).__name__}"
        if selection is None:
            builder = _trace(model, norm, example_inputs, include_embeddings)
        else:
            _build_chain(builder, _module_chain_entries(model, selection), strict=True)
    elif isinstance(source, Mapping):
        what = "the state_dict"
        entries = _state_dict_entries(source, selection)
        _build_chain(builder, entries, strict=selection is not None)
    else:
        raise GraphError(
            f"weight_graph takes an nn.Module or a state_dict (a dict of name -> tensor), got "
            f"{type(model_or_state_dict).__name__}. Load the checkpoint first (torch.load) and "
            "pass the model, its state_dict, or the checkpoint dict."
        )
    return builder.finish(preset, what, assemble=assemble)


def check_graph_options(norm: str, preset: str) -> None:
    """Refuse an unknown ``norm`` or ``preset``, or ``preset="filan2021"`` with ``norm="l2"``
    (:class:`ConfigError`)."""
    if norm not in ("l1", "l2"):
        raise ConfigError(f"norm must be 'l1' or 'l2', got {norm!r}.")
    if preset not in ("default", "filan2021"):
        raise ConfigError(f"preset must be 'default' or 'filan2021', got {preset!r}.")
    if preset == "filan2021" and norm != "l1":
        raise ConfigError(
            "preset='filan2021' fixes the kernel norm (numpy's induced matrix 1-norm, as in the "
            "published code); use preset='default' for norm='l2'."
        )


def _trace(
    model: nn.Module,
    norm: KernelNorm,
    example_inputs: Any,
    include_embeddings: bool,
    deferred: Callable[[str], np.ndarray] | None = None,
) -> _Builder:
    """Follow the model's data flow: ``torch.export`` with example inputs where there are some
    (given, or known for Hugging Face and timm models), ``torch.fx`` otherwise (and
    ``torch.export`` after all when fx cannot follow a model whose inputs are known).

    ``deferred``: the model's weights are not in it (the meta device) but read later, block by
    block; it gives a parameter's values as the walker asks for them (see
    :attr:`~cluster_tracking.graph.export_base._WalkerBase.deferred`). Export only."""
    inputs = _as_inputs(example_inputs) if example_inputs is not None else None
    if inputs is None and (include_embeddings or is_hugging_face(model) or deferred):
        inputs = example_inputs_for(model)
    if inputs is None and deferred is not None:
        raise GraphError(
            f"the weight graph of {type(model).__name__} is followed with torch.export, which "
            "needs example inputs, and none are known for it; pass example_inputs=..."
        )
    if inputs is None:
        builder = _Builder(norm)
        try:
            FxWalker(model, builder).run()
            return builder
        except GraphError:
            inputs = example_inputs_for(model)
            if inputs is None:
                raise
    args, kwargs = inputs
    skip = frozenset() if include_embeddings else lm_head_parameters(model)
    builder = _Builder(norm)
    walker = ExportWalker(
        model, builder, args, kwargs, include_embeddings=include_embeddings, skip=skip
    )
    walker.deferred = deferred
    walker.run()
    return builder


def _as_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}
