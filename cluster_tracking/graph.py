"""Weight graphs: a network's neurons as nodes, its weight magnitudes as edges.

Filan et al. (2021), section 2: nodes are neurons (channels, for convolutions), and the edge
between two neurons of consecutive layers weighs the magnitude of the weight joining them. For a
``Linear`` layer with torch weight ``W`` of shape ``[out, in]`` the edge (input i, output j) weighs
``|W[j, i]|``; for a convolution with kernel ``W`` of shape ``[out, in / groups, *kernel]`` the edge
(input channel a, output channel b) weighs the L1 norm of the kernel slice ``W[b, a]`` (L2 on
request).

Node order is public and stable: layer by layer from the input, and inside a layer by index.

:func:`weight_graph` builds the graph from a model (following its real data flow with
``torch.fx``), from a chain of named layers, or from a bare ``state_dict``. The graph types
(:class:`WeightGraph`, :class:`EdgeBlock`) live in :mod:`cluster_tracking.weightgraph`, which
needs no torch, and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import fx, nn

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.weightgraph import (
    BlockKind,
    EdgeBlock,
    KernelNorm,
    Preset,
    WeightGraph,
    assemble_adjacency,
)

__all__ = [
    "EdgeBlock",
    "WeightGraph",
    "assemble_adjacency",
    "layer_weight",
    "live_weights",
    "weight_graph",
]

_LAYERS_HINT = (
    "pass layers=[...] naming the Linear/Conv modules to use, in data-flow order, to build the "
    "graph from them as a chain without tracing"
)


def weight_graph(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    *,
    norm: Literal["l1", "l2"] = "l1",
    preset: Preset = "default",
    layers: Sequence[str] | None = None,
) -> WeightGraph:
    """The weight graph of a network (Filan et al. 2021, section 2), ready for spectral clustering.

    Every neuron is a node, and two neurons of consecutive layers are joined by an edge weighing the
    magnitude of the weight between them:

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

    Node order (public): layer by layer from the input, in data-flow order, and by index inside a
    layer. ``layer_names`` are the modules' qualified names (``"0"``, ``"2"`` in an
    ``nn.Sequential``; ``"fc1"``, ``"layer1.0.conv1"`` in a custom module), the input layer is
    ``"input"`` (``"input.<argument>"`` for each of several model inputs) and its width is what the
    first layer reading it reads: ``in_features`` (e.g. 784 pixels of a flattened image) or
    ``in_channels``.

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
        preset: ``"default"`` (the conventions above) or ``"filan2021"``, the choices of the
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
    return _build_graph(model_or_state_dict, norm, preset, layers, assemble=True)


def weight_topology(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    *,
    norm: Literal["l1", "l2"] = "l1",
    preset: Preset = "default",
    layers: Sequence[str] | None = None,
) -> WeightGraph:
    """:func:`weight_graph` without its sparse adjacency (an empty ``[n, n]`` matrix): the layers
    and the weight blocks, from which ``graph.with_weights(weights)`` assembles the adjacency
    elsewhere. The tracker's training thread takes this at a first due step, so that the
    adjacency (the larger part of the work for an MLP) is assembled in the background."""
    return _build_graph(model_or_state_dict, norm, preset, layers, assemble=False)


def _build_graph(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    norm: Literal["l1", "l2"],
    preset: Preset,
    layers: Sequence[str] | None,
    *,
    assemble: bool,
) -> WeightGraph:
    if norm not in ("l1", "l2"):
        raise ConfigError(f"norm must be 'l1' or 'l2', got {norm!r}.")
    if preset not in ("default", "filan2021"):
        raise ConfigError(f"preset must be 'default' or 'filan2021', got {preset!r}.")
    if preset == "filan2021" and norm != "l1":
        raise ConfigError(
            "preset='filan2021' fixes the kernel norm (numpy's induced matrix 1-norm, as in the "
            "published code); use preset='default' for norm='l2'."
        )
    if layers is not None and (isinstance(layers, str) or not isinstance(layers, Iterable)):
        raise ConfigError(
            f"layers must be a list of layer names, got {layers!r}; e.g. layers=['fc1', 'fc2']."
        )
    selection = None if layers is None else [str(name) for name in layers]

    source: object = model_or_state_dict
    if isinstance(source, Mapping):
        source = _unwrap_checkpoint(source)
    builder = _Builder(norm)
    if isinstance(source, nn.Module):
        model = _unwrap_module(source)
        what = f"the model {type(model).__name__}"
        if selection is None:
            _FxWalker(model, builder).run()
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


# ---------------------------------------------------------------------------------------------
# Provisional graph: layers of provisional node ids, weight blocks between them, and a
# union-find over the ids for the units that residual adds identify.
# ---------------------------------------------------------------------------------------------


def layer_weight(model: nn.Module, block: EdgeBlock) -> torch.Tensor:
    """The parameter holding ``block``'s weight in ``model`` (a module called twice shares it):
    ``model.get_submodule(name).weight``, or ``model.get_parameter(name)`` for a functional layer.

    Raises :class:`~cluster_tracking.errors.GraphError` when there is none, or when its shape is
    no longer the one the graph read.
    """
    name = block.name.split("#", 1)[0]  # "layer#2": the second call of a shared layer
    found: object = None
    try:
        found = getattr(model.get_submodule(name), "weight", None)
    except AttributeError:
        pass
    if not isinstance(found, torch.Tensor):
        try:
            found = model.get_parameter(name)
        except AttributeError:
            found = None
    if not isinstance(found, torch.Tensor):
        raise GraphError(
            f"Layer {block.name!r} of the weight graph has no weight tensor at "
            f"model.get_submodule({name!r}).weight or model.get_parameter({name!r}); reading a "
            "traced graph's weights again (the regulariser, the clusterable initialisation, the "
            "tracker's later steps) needs each layer's weight to be a parameter of the model "
            "(use nn.Linear/nn.Conv modules, or pass layers=[...])."
        )
    if tuple(found.shape) != block.weight.shape:
        raise GraphError(
            f"Layer {block.name!r} has a weight of shape {tuple(found.shape)} but the weight graph "
            f"read {block.weight.shape}; the model changed shape since its graph was traced (build "
            "the regulariser after the model's final shapes are set, e.g. after lazy modules have "
            "run once)."
        )
    return found


def live_weights(model: nn.Module, graph: WeightGraph) -> list[np.ndarray]:
    """The effective weight of every block of ``graph`` read again from ``model``'s parameters.

    ``graph`` must have been built from ``model`` (or a model of the same structure): each
    block's weight is copied to the CPU in float64 (:func:`layer_weight`) and the folded
    BatchNorm's ``|gamma| / sqrt(running_var + eps)`` applied again, so
    ``graph.with_weights(live_weights(model, graph))`` is ``weight_graph(model)`` without tracing
    the model again (what the tracker does at every due step after the first). Raises
    :class:`~cluster_tracking.errors.GraphError` when a layer is missing or its weight changed
    shape: trace again then.
    """
    model = _unwrap_module(model)
    weights = []
    for block in graph.blocks:
        weight = _weight_array(layer_weight(model, block), f"layer {block.name!r}")
        if block.batchnorm is not None:
            try:
                batchnorm = model.get_submodule(block.batchnorm)
            except AttributeError as error:
                raise GraphError(f"BatchNorm {block.batchnorm!r} is not in the model.") from error
            scale = _batchnorm_scale(batchnorm, f"layer {block.batchnorm!r}")
            weight *= scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        weights.append(weight)
    return weights


@dataclass
class _Layer:
    name: str
    kind: Literal["input", "linear", "conv"]
    start: int  # first provisional node id
    width: int


@dataclass
class _BlockSpec:
    name: str
    kind: BlockKind
    weight: np.ndarray
    src: np.ndarray  # provisional node ids
    dst: np.ndarray
    groups: int
    folded: str | None = None  # the BatchNorm folded into it (as messages call it)
    batchnorm: str | None = None  # that BatchNorm's module name (state_dict prefix)


@dataclass(frozen=True)
class _Feat:
    """What the graph knows about one tensor of the forward pass.

    ``nodes``: provisional node id of each unit/channel along dim 1 (``None`` for a model input that
    no layer has read yet, so its width is still unknown: ``placeholder`` names it). ``flat``: a
    ``[C, *spatial]`` map flattened into dim 1, so dim 1 holds ``C * S`` features for ``C`` nodes.
    ``spatial``: number of dims after dim 1 (``None`` when unknown).
    """

    nodes: np.ndarray | None
    origin: str
    placeholder: str | None = None
    flat: bool = False
    spatial: int | None = None


class _Other:
    """A value that is not a feature tensor (a constant, a shape, a parameter)."""


_OTHER = _Other()


class _Builder:
    """Collects layers and weight blocks over provisional node ids, then numbers the nodes."""

    def __init__(self, norm: KernelNorm) -> None:
        self.norm = norm
        self.layers: list[_Layer] = []
        self.parent: list[int] = []
        self.specs: list[_BlockSpec] = []
        self.inputs: dict[str, np.ndarray] = {}
        self._names: set[str] = set()

    def new_layer(
        self, name: str, kind: Literal["input", "linear", "conv"], width: int
    ) -> tuple[str, np.ndarray]:
        unique, call = name, 2
        while unique in self._names:  # a module called again gets a layer per call
            unique, call = f"{name}#{call}", call + 1
        self._names.add(unique)
        start = len(self.parent)
        self.parent.extend(range(start, start + width))
        self.layers.append(_Layer(unique, kind, start, width))
        return unique, np.arange(start, start + width, dtype=np.int64)

    def _find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            root_x, root_y = self._find(x), self._find(y)
            if root_x != root_y:
                self.parent[max(root_x, root_y)] = min(root_x, root_y)

    def resolve(self, feat: _Feat, width: int | None, reader: str) -> _Feat:
        """``feat`` with its nodes; a model input read for the first time gets its layer here."""
        if feat.nodes is not None:
            return feat
        placeholder = str(feat.placeholder)
        bound = self.inputs.get(placeholder)
        if bound is not None:
            return replace(feat, nodes=bound)
        if width is None:
            raise GraphError(
                f"{reader} combines the model input {placeholder!r} with other tensors before any "
                f"Linear/Conv layer reads it, so the graph cannot tell its width; {_LAYERS_HINT}."
            )
        _, nodes = self.new_layer(f"input.{placeholder}", "input", width)
        self.inputs[placeholder] = nodes
        return replace(feat, nodes=nodes, flat=False)

    def weight_layer(
        self, name: str, weight: np.ndarray, *, conv: bool, groups: int, inp: _Feat, label: str
    ) -> tuple[_Feat, _BlockSpec]:
        """Add a Linear/Conv layer reading ``inp``: its output nodes and its edge block."""
        n_out = weight.shape[0]
        kind: BlockKind
        if conv:
            n_in = weight.shape[1] * groups
            feat = self.resolve(inp, n_in, label)
            assert feat.nodes is not None
            width = len(feat.nodes)
            if feat.flat:
                raise GraphError(
                    f"{label} is a convolution reading a flattened tensor (from {feat.origin}); "
                    f"the weight graph cannot follow that; {_LAYERS_HINT}."
                )
            if width != n_in:
                raise GraphError(
                    f"{label} reads {n_in} input channels but {feat.origin} gives it {width}; "
                    f"the layers do not chain. {_chain_advice(label)}"
                )
            kind = "conv"
        else:
            n_in = weight.shape[1]
            feat = self.resolve(inp, n_in, label)
            assert feat.nodes is not None
            width = len(feat.nodes)
            if width == n_in and (feat.flat or not feat.spatial):
                kind = "linear"
            elif feat.flat:
                if n_in % width:
                    raise GraphError(
                        f"{label} reads {n_in} flattened features but {feat.origin} has {width} "
                        f"channels, and {n_in} is not a multiple of {width}, so the features "
                        f"cannot be attributed to channels. {_chain_advice(label)}"
                    )
                kind = "flatten"
            elif feat.spatial:
                raise GraphError(
                    f"{label} is applied to a feature map with spatial dims (from "
                    f"{feat.origin}) without flattening or pooling it first, so it mixes "
                    f"positions, not channels; the weight graph cannot follow that; "
                    f"{_LAYERS_HINT}."
                )
            else:
                raise GraphError(
                    f"{label} reads {n_in} features but {feat.origin} gives it {width}; the "
                    f"layers do not chain. {_chain_advice(label)}"
                )
        name, out_nodes = self.new_layer(name, "conv" if conv else "linear", n_out)
        spec = _BlockSpec(name, kind, weight, feat.nodes, out_nodes, groups if conv else 1)
        self.specs.append(spec)
        spatial = weight.ndim - 2 if conv else 0
        return _Feat(out_nodes, origin=label, spatial=spatial), spec

    def fold(
        self, spec: _BlockSpec, scale: np.ndarray, label: str, name: str | None = None
    ) -> None:
        """Fold a BatchNorm's per-output-unit scale into the weights of the layer before it."""
        n_out = spec.weight.shape[0]
        if len(scale) != n_out:
            raise GraphError(
                f"{label} normalises {len(scale)} channels but follows layer {spec.name!r} with "
                f"{n_out} outputs; they cannot be folded. {_chain_advice(label)}"
            )
        spec.weight = spec.weight * scale.reshape((-1,) + (1,) * (spec.weight.ndim - 1))
        spec.folded = label
        spec.batchnorm = name

    def combine(self, feats: Sequence[_Feat], desc: str) -> _Feat:
        """An elementwise op between feature tensors: units at the same index are one node."""
        feats = [
            replace(f, nodes=self.inputs[f.placeholder])
            if f.nodes is None and f.placeholder in self.inputs
            else f
            for f in feats
        ]
        known = [len(f.nodes) for f in feats if f.nodes is not None]
        if not known:
            if len({f.placeholder for f in feats}) == 1:
                return feats[0]  # the model input with itself, before any layer reads it
            raise GraphError(
                f"{desc} combines model inputs before any Linear/Conv layer reads them, so the "
                f"graph cannot tell their widths; {_LAYERS_HINT}."
            )
        width = max(known)
        resolved = [self.resolve(f, width, desc) for f in feats]
        wide = [f for f in resolved if f.nodes is not None and len(f.nodes) == width]
        narrow = [f for f in resolved if f.nodes is not None and len(f.nodes) != width]
        if any(f.nodes is not None and len(f.nodes) != 1 for f in narrow):
            shapes = ", ".join(
                f"{len(f.nodes)} from {f.origin}" for f in resolved if f.nodes is not None
            )
            raise GraphError(
                f"{desc} combines tensors with different numbers of units/channels ({shapes}); "
                f"the weight graph cannot tell which units it joins; {_LAYERS_HINT}."
            )
        first = wide[0]
        assert first.nodes is not None
        for other in wide[1:]:
            assert other.nodes is not None
            if other.flat != first.flat:
                raise GraphError(
                    f"{desc} combines a flattened feature map with an unflattened tensor "
                    f"({first.origin}, {other.origin}); {_LAYERS_HINT}."
                )
            self.union(first.nodes, other.nodes)
        spatial = next((f.spatial for f in wide if f.spatial is not None), None)
        return _Feat(first.nodes, origin=f"the output of {desc}", flat=first.flat, spatial=spatial)

    def concat(self, feats: Sequence[_Feat], desc: str) -> _Feat:
        """A concatenation along the channel dim: the operands' nodes side by side, kept apart."""
        resolved = [self.resolve(f, None, desc) for f in feats]
        if any(f.flat for f in resolved):
            raise GraphError(
                f"{desc} concatenates flattened feature maps, whose channels a following Linear "
                f"layer cannot be attributed to; concatenate before flattening, or {_LAYERS_HINT}."
            )
        nodes = np.concatenate([f.nodes for f in resolved if f.nodes is not None])
        spatial = next((f.spatial for f in resolved if f.spatial is not None), None)
        return _Feat(nodes, origin=f"the output of {desc}", spatial=spatial)

    def finish(self, preset: Preset, what: str, *, assemble: bool = True) -> WeightGraph:
        """Merge identified nodes, number them in the public order and assemble the adjacency
        (``assemble=False``: an empty one)."""
        if not self.specs:
            raise GraphError(
                f"Found no nn.Linear or nn.Conv1d/2d/3d layer in {what} on the path from its "
                "input to its output, and a weight graph is made of their weights; measure a "
                "network built from such layers (or pass layers=[...] naming them)."
            )
        is_cnn = any(spec.kind == "conv" for spec in self.specs)
        filan = preset == "filan2021" and is_cnn
        # Layer order: the model inputs first, then the layers in data-flow order.
        order = sorted(range(len(self.layers)), key=lambda i: self.layers[i].kind != "input")
        self.layers = [self.layers[i] for i in order]
        names = self._final_names()
        kept = np.array([layer.kind == "conv" or not filan for layer in self.layers])
        n_provisional = len(self.parent)
        layer_of = np.empty(n_provisional, dtype=np.int64)
        index = np.empty(n_provisional, dtype=np.int64)
        for rank, layer in enumerate(self.layers):
            layer_of[layer.start : layer.start + layer.width] = rank
            index[layer.start : layer.start + layer.width] = np.arange(layer.width)

        # Every class of identified nodes is held by its earliest (kept) member: the one with the
        # smallest (layer, index) key. Final node numbers follow these keys, so nodes come layer
        # by layer and by index inside a layer.
        roots = np.fromiter(
            (self._find(i) for i in range(n_provisional)), dtype=np.int64, count=n_provisional
        )
        stride = max(layer.width for layer in self.layers) + 1
        no_holder = len(self.layers) * stride
        keys = np.where(kept[layer_of], layer_of * stride + index, no_holder)
        class_key = np.full(n_provisional, no_holder, dtype=np.int64)
        np.minimum.at(class_key, roots, keys)
        holder_key = class_key[roots]
        alive = holder_key < no_holder
        unique_keys = np.unique(holder_key[alive])
        final = np.full(n_provisional, -1, dtype=np.int64)
        final[alive] = np.searchsorted(unique_keys, holder_key[alive])
        final_widths = np.bincount(unique_keys // stride, minlength=len(self.layers))

        layer_names: list[str] = []
        layer_widths: list[int] = []
        merged: dict[str, str] = {}
        for i, layer in enumerate(self.layers):
            if not kept[i]:
                continue
            if final_widths[i] > 0:
                layer_names.append(names[i])
                layer_widths.append(int(final_widths[i]))
                continue
            own = holder_key[layer.start : layer.start + layer.width] // stride
            holders = dict.fromkeys(names[h] for h in own.tolist())
            merged[names[i]] = ", ".join(holders)

        blocks = []
        for spec in self.specs:
            src, dst = final[spec.src], final[spec.dst]
            if (src < 0).any() or (dst < 0).any():
                continue  # filan2021: an edge to the input or a Linear layer
            norm: KernelNorm = "l1_induced" if filan and spec.kind == "conv" else self.norm
            blocks.append(
                EdgeBlock(
                    spec.name, spec.kind, spec.weight, src, dst, spec.groups, norm, spec.batchnorm
                )
            )
        if not blocks:
            raise GraphError(
                f"preset='filan2021' keeps only convolution-to-convolution edges, and {what} has "
                "no convolution reading another one's output; use preset='default'."
            )
        n_nodes = int(sum(layer_widths))
        return WeightGraph(
            layer_names=tuple(layer_names),
            widths=tuple(layer_widths),
            adjacency=(
                assemble_adjacency(blocks, n_nodes)
                if assemble
                else sp.csr_array((n_nodes, n_nodes))
            ),
            blocks=tuple(blocks),
            merged=merged,
            preset=preset,
        )

    def _final_names(self) -> list[str]:
        """Layer names, the model input called ``"input"`` when there is one."""
        inputs = [layer for layer in self.layers if layer.kind == "input"]
        names = [layer.name for layer in self.layers]
        if len(inputs) == 1 and "input" not in self._names:
            names[self.layers.index(inputs[0])] = "input"
        return names


def _chain_advice(label: str) -> str:
    if label.startswith("weight "):
        return (
            "A bare state_dict is read as a chain of its weights in key order (the modules' "
            "declaration order); for a network that is not such a chain, load the model class "
            "and pass the model, or pass layers=[...] naming a chain."
        )
    return "Check the model, or pass layers=[...] naming Linear/Conv modules that form a chain."


# ---------------------------------------------------------------------------------------------
# Following a model's data flow with torch.fx
# ---------------------------------------------------------------------------------------------


def _module_types(*names: str) -> tuple[type, ...]:
    """The ``torch.nn`` classes of these names that this torch version has."""
    return tuple(getattr(nn, name) for name in names if hasattr(nn, name))


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Modules that keep units apart: elementwise maps, per-channel scalings and normalisations,
# pooling, padding and resampling of the spatial dims.
_PASS_THROUGH_MODULES = _module_types(
    *"ReLU ReLU6 LeakyReLU PReLU RReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Hardtanh".split(),
    *"Hardswish Hardsigmoid Softplus Softsign Softshrink Hardshrink Tanhshrink Threshold".split(),
    *"LogSigmoid Softmax LogSoftmax Softmin Softmax2d Identity Dropout Dropout1d Dropout2d".split(),
    *"Dropout3d AlphaDropout FeatureAlphaDropout LayerNorm GroupNorm RMSNorm".split(),
    *"InstanceNorm1d InstanceNorm2d InstanceNorm3d LocalResponseNorm".split(),
    *"MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d LPPool1d LPPool2d".split(),
    "LPPool3d",
    *"AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool1d".split(),
    *"AdaptiveMaxPool2d AdaptiveMaxPool3d FractionalMaxPool2d FractionalMaxPool3d".split(),
    *"Upsample UpsamplingNearest2d UpsamplingBilinear2d ZeroPad1d ZeroPad2d ZeroPad3d".split(),
    *"ConstantPad1d ConstantPad2d ConstantPad3d ReflectionPad1d ReflectionPad2d".split(),
    *"ReflectionPad3d ReplicationPad1d ReplicationPad2d ReplicationPad3d CircularPad1d".split(),
    *"CircularPad2d CircularPad3d".split(),
)

# Functions and tensor methods, by name. Results that are not feature tensors:
_NOT_FEATURES = frozenset(
    "size dim numel ndimension zeros_like ones_like empty_like full_like rand_like randn_like "
    "new_zeros new_ones new_empty new_full new_tensor".split()
)
_METADATA_ATTRS = frozenset("shape dtype device ndim is_cuda requires_grad layout".split())
# Elementwise maps of one feature tensor (extra arguments are constants or parameters), and
# normalisations, pooling, padding and resampling, which keep units apart:
_PASS_THROUGH_OPS = frozenset(
    "relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ gelu silu mish "
    "sigmoid sigmoid_ tanh tanh_ hardtanh hardtanh_ hardswish hardsigmoid softplus softsign "
    "softshrink hardshrink tanhshrink threshold threshold_ logsigmoid rrelu rrelu_ prelu "
    "dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout "
    "abs abs_ neg pos exp log log1p sqrt rsqrt square sin cos erf sign reciprocal nan_to_num "
    "clamp clamp_ clamp_min clamp_max clip clip_ contiguous clone detach float double half "
    "bfloat16 to type type_as cpu cuda softmax log_softmax softmin batch_norm layer_norm "
    "group_norm instance_norm rms_norm local_response_norm normalize "
    "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d lp_pool1d lp_pool2d "
    "lp_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d "
    "adaptive_max_pool2d adaptive_max_pool3d fractional_max_pool2d fractional_max_pool3d "
    "interpolate upsample upsample_nearest upsample_bilinear pad".split()
)
# Elementwise ops that may take two feature tensors (a residual add, a gate):
_ELEMENTWISE_BINARY_OPS = frozenset(
    "add add_ iadd sub sub_ isub rsub mul mul_ imul truediv itruediv div div_ floordiv pow "
    "pow_ ipow maximum minimum fmax fmin".split()
)
_CONCAT_OPS = frozenset({"cat", "concat", "concatenate"})
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "nanmean", "nansum", "logsumexp"})
_FUNCTIONAL_LAYERS = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3}


class _FxWalker:
    """Runs a model's ``torch.fx`` graph on :class:`_Feat` values instead of tensors."""

    def __init__(self, model: nn.Module, builder: _Builder) -> None:
        self.model = model
        self.builder = builder
        self.env: dict[fx.Node, Any] = {}
        self.spec_of: dict[fx.Node, _BlockSpec] = {}

    def run(self) -> None:
        try:
            graph = fx.symbolic_trace(self.model).graph
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            raise GraphError(
                f"torch.fx cannot trace {type(self.model).__name__} ({type(exc).__name__}: "
                f"{reason}). The weight graph follows the model's data flow by symbolic tracing, "
                f"which fails on data-dependent control flow; {_LAYERS_HINT}."
            ) from exc
        for node in graph.nodes:
            self.env[node] = self._step(node)

    def _step(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return _Feat(None, origin="the model input", placeholder=str(node.target))
        if node.op in ("get_attr", "output"):
            return _OTHER
        args = fx.node.map_arg(node.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.env.__getitem__)
        assert isinstance(args, tuple) and isinstance(kwargs, dict)
        feats = list(_feats_in((args, kwargs)))
        if node.op == "call_module":
            return self._module(node, args, feats)
        if not feats:
            return _OTHER
        return self._op(node, args, kwargs, feats)

    def _module(self, node: fx.Node, args: tuple[Any, ...], feats: list[_Feat]) -> Any:
        name = str(node.target)
        module = self.model.get_submodule(name)
        label = f"layer {name!r} ({type(module).__name__})"
        feat = args[0] if args and isinstance(args[0], _Feat) else None
        if isinstance(module, (nn.Linear, *_CONV_MODULES)):
            if feat is None:
                raise GraphError(
                    f"{label} does not read a tensor computed from the model input; {_LAYERS_HINT}."
                )
            conv = not isinstance(module, nn.Linear)
            groups = int(module.groups) if isinstance(module, _CONV_MODULES) else 1
            weight = _weight_array(module.weight, label)
            out, spec = self.builder.weight_layer(
                name, weight, conv=conv, groups=groups, inp=feat, label=label
            )
            self.spec_of[node] = spec
            return out
        if isinstance(module, _BATCHNORM_MODULES):
            if feat is None:
                return _OTHER
            return self._batchnorm(node, module, feat, label)
        if isinstance(module, nn.Flatten):
            if feat is None:
                return _OTHER
            return _flatten(feat, module.start_dim, module.end_dim, label)
        if isinstance(module, _PASS_THROUGH_MODULES):
            return feat if feat is not None else _OTHER
        raise GraphError(
            f"The weight graph cannot follow {label}: only nn.Linear and nn.Conv1d/2d/3d layers "
            "carry edges, and this layer is not one that keeps units apart (an activation, "
            f"pooling, dropout, normalisation); {_LAYERS_HINT}."
        )

    def _batchnorm(self, node: fx.Node, module: nn.Module, feat: _Feat, label: str) -> _Feat:
        scale = _batchnorm_scale(module, label)
        source = node.args[0]
        spec = self.spec_of.get(source) if isinstance(source, fx.Node) else None
        if spec is not None and isinstance(source, fx.Node) and len(source.users) == 1:
            if spec.folded is None:
                self.builder.fold(spec, scale, label, str(node.target))
                return feat
        if feat.nodes is not None and not feat.flat and len(feat.nodes) != len(scale):
            raise GraphError(
                f"{label} normalises {len(scale)} channels but its input ({feat.origin}) has "
                f"{len(feat.nodes)}; {_LAYERS_HINT}."
            )
        return feat  # not directly after a layer: a per-channel scaling, passed through

    def _op(
        self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], feats: list[_Feat]
    ) -> Any:
        name = _op_name(node)
        desc = _describe(node, name)
        first = args[0] if args and isinstance(args[0], _Feat) else kwargs.get("input")
        if name in _NOT_FEATURES:
            return _OTHER
        if name == "getattr" and len(args) > 1 and args[1] in _METADATA_ATTRS:
            return _OTHER
        if name in _ELEMENTWISE_BINARY_OPS:
            return self.builder.combine(feats, desc)
        if name in _CONCAT_OPS:
            return self._concat(args, kwargs, desc)
        if node.op == "call_function" and name in _FUNCTIONAL_LAYERS:
            return self._functional_layer(node, name, first, desc)
        if not isinstance(first, _Feat):
            raise _unsupported(desc)
        if name in _PASS_THROUGH_OPS:
            return first
        if name == "flatten":
            start = _arg(args, kwargs, 1, "start_dim", 0)
            end = _arg(args, kwargs, 2, "end_dim", -1)
            return _flatten(first, start, end, desc)
        if name in ("view", "reshape"):
            return _reshape(first, args, kwargs, desc)
        if name in ("squeeze", "unsqueeze"):
            return _squeeze(first, name, _arg(args, kwargs, 1, "dim", None), desc)
        if name in _REDUCTIONS:
            dims = _arg(args, kwargs, 1, "dim", kwargs.get("axis"))
            keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
            return _reduce(first, dims, keepdim, desc)
        raise _unsupported(desc)

    def _concat(self, args: tuple[Any, ...], kwargs: dict[str, Any], desc: str) -> _Feat:
        tensors = _arg(args, kwargs, 0, "tensors", None)
        dim = _arg(args, kwargs, 1, "dim", kwargs.get("axis", 0))
        if (
            not isinstance(tensors, (list, tuple))
            or not tensors
            or not all(isinstance(t, _Feat) for t in tensors)
            or not isinstance(dim, int)
        ):
            raise GraphError(
                f"{desc} concatenates something other than tensors computed from the model "
                f"input (or along a computed dim); {_LAYERS_HINT}."
            )
        feats = [self.builder.resolve(t, None, desc) for t in tensors]
        axis = _normalise_dim(dim, feats[0])
        if axis is None:
            raise GraphError(
                f"{desc} concatenates along dim {dim}, and the graph cannot tell whether that is "
                f"the channel dim; concatenate along dim=1, or {_LAYERS_HINT}."
            )
        if axis == 1:
            return self.builder.concat(feats, desc)
        return self.builder.combine(feats, desc)  # batch or spatial concat: the same units

    def _functional_layer(self, node: fx.Node, name: str, first: Any, desc: str) -> _Feat:
        weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"):
            raise GraphError(
                f"{desc} applies a weight that is not a parameter of the model, so the graph "
                f"cannot attribute it to a layer; {_LAYERS_HINT}."
            )
        if not isinstance(first, _Feat):
            raise _unsupported(desc)
        target = str(weight_node.target)
        layer = target.removesuffix(".weight") or target
        label = f"layer {layer!r} ({desc})"
        weight = _weight_array(_fetch_attr(self.model, target), label)
        spatial_dims = _FUNCTIONAL_LAYERS[name]
        if weight.ndim != spatial_dims + 2:
            raise GraphError(f"{label} has a weight of shape {weight.shape}; {_LAYERS_HINT}.")
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if not isinstance(groups, int):
            raise GraphError(f"{label} has a computed number of groups; {_LAYERS_HINT}.")
        out, spec = self.builder.weight_layer(
            layer, weight, conv=spatial_dims > 0, groups=groups, inp=first, label=label
        )
        self.spec_of[node] = spec
        return out


def _feats_in(value: Any) -> Iterable[_Feat]:
    if isinstance(value, _Feat):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _feats_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _feats_in(item)
    elif isinstance(value, slice):
        yield from _feats_in((value.start, value.stop, value.step))


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target))


def _describe(node: fx.Node, name: str) -> str:
    if node.op == "call_method":
        what = f"tensor method .{name}()"
    else:
        module = str(getattr(node.target, "__module__", "") or "")
        module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(
            module, "torch" if module.startswith("torch._C") else module
        )
        what = f"function {module}.{name}" if module else f"function {name}"
    stack = node.meta.get("nn_module_stack")
    where = f" inside {list(stack)[-1]!r}" if stack else ""
    return f"{what} (fx node {node.name!r}{where})"


def _unsupported(desc: str) -> GraphError:
    return GraphError(
        f"The weight graph cannot follow {desc}: it is not an elementwise, pooling, "
        "normalisation, flatten, add or concatenation step, and it may mix units without "
        f"Linear/Conv weights; {_LAYERS_HINT}."
    )


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, default: Any):
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def _normalise_dim(dim: int, feat: _Feat) -> int | None:
    """A non-negative dim of ``feat``'s tensor, or None when its rank is unknown."""
    if dim >= 0:
        return dim
    if feat.flat:
        return 2 + dim
    if feat.spatial is None:
        return None
    return 2 + feat.spatial + dim


def _flatten(feat: _Feat, start: Any, end: Any, desc: str) -> _Feat:
    if not isinstance(start, int) or not isinstance(end, int):
        raise GraphError(f"{desc} flattens computed dims; {_LAYERS_HINT}.")
    first, last = _normalise_dim(start, feat), _normalise_dim(end, feat)
    to_end = end == -1 or (
        last is not None and feat.spatial is not None and last == feat.spatial + 1
    )
    if feat.nodes is None:  # the raw model input: its layer is what the first reader reads
        return replace(feat, flat=first is not None and first <= 1, spatial=None)
    if first is None or not to_end:
        if start == -1 or first == last:
            return feat
        raise GraphError(
            f"{desc} flattens only some dims, and the graph cannot tell whether they include "
            f"the channel dim; use flatten(1), or {_LAYERS_HINT}."
        )
    if first <= 1:
        if feat.flat or feat.spatial == 0:
            return feat  # already one feature dim
        return replace(feat, flat=True, spatial=0, origin=f"{feat.origin}, flattened")
    if feat.flat:
        return feat
    return replace(feat, spatial=first - 1)


def _reshape(feat: _Feat, args: tuple[Any, ...], kwargs: dict[str, Any], desc: str) -> _Feat:
    shape: Any = args[1:] if len(args) > 1 else kwargs.get("shape", ())
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    if len(shape) == 1 and not isinstance(shape[0], int):
        raise GraphError(f"{desc} reshapes to a computed shape; {_LAYERS_HINT}.")
    if len(shape) <= 2:  # [batch, features]: a flatten
        return _flatten(feat, 0 if len(shape) == 1 else 1, -1, desc)
    if feat.nodes is None:
        return replace(feat, flat=False, spatial=len(shape) - 2)
    channels = shape[1]
    if feat.flat or (isinstance(channels, int) and channels not in (-1, len(feat.nodes))):
        raise GraphError(
            f"{desc} reshapes the {len(feat.nodes)} units of {feat.origin} into another channel "
            f"layout; the weight graph cannot follow that; {_LAYERS_HINT}."
        )
    return replace(feat, spatial=len(shape) - 2)


def _squeeze(feat: _Feat, name: str, dim: Any, desc: str) -> _Feat:
    if feat.nodes is None or dim is None:
        return replace(feat, spatial=None)
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if feat.flat or not all(isinstance(d, int) for d in dims):
        raise GraphError(f"{desc} changes the dims of {feat.origin}; {_LAYERS_HINT}.")
    if name == "unsqueeze":
        probe = replace(feat, spatial=None if feat.spatial is None else feat.spatial + 1)
    else:
        probe = feat
    axes = [_normalise_dim(d, probe) for d in dims]
    if any(axis in (0, 1) for axis in axes):
        raise GraphError(
            f"{desc} moves the channel dim of {feat.origin} (dim 1); the weight graph cannot "
            f"follow that; {_LAYERS_HINT}."
        )
    if None in axes or feat.spatial is None:
        return replace(feat, spatial=None)
    step = len(dims) if name == "unsqueeze" else -len(dims)
    return replace(feat, spatial=max(feat.spatial + step, 0))


def _reduce(feat: _Feat, dims: Any, keepdim: bool, desc: str) -> _Feat:
    if feat.nodes is None:
        return replace(feat, spatial=None)
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        raise GraphError(
            f"{desc} reduces over all dims (or computed ones), channels included; reduce over the "
            f"spatial dims only (e.g. x.mean((2, 3))), or {_LAYERS_HINT}."
        )
    axes = [_normalise_dim(d, feat) for d in dims]
    if feat.flat or any(axis in (0, 1) for axis in axes):
        raise GraphError(
            f"{desc} reduces over the batch or channel dim of {feat.origin}; reduce over the "
            f"spatial dims only (e.g. x.mean((2, 3))), or {_LAYERS_HINT}."
        )
    if keepdim:
        return feat
    if None in axes or feat.spatial is None:
        return replace(feat, spatial=None)
    return replace(feat, spatial=max(feat.spatial - len(dims), 0))


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _weight_array(tensor: Any, label: str) -> np.ndarray:
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


def _batchnorm_scale(module: Any, label: str) -> np.ndarray:
    """``|gamma| / sqrt(running_var + eps)`` per channel (``|gamma|`` without running stats)."""
    n = int(module.num_features)
    if module.affine and module.weight is not None:
        gamma = _weight_array(module.weight, label)
    else:
        gamma = np.ones(n)
    if module.running_var is None:
        return np.abs(gamma)
    return _fold_scale(gamma, _weight_array(module.running_var, label), float(module.eps), label)


def _fold_scale(gamma: np.ndarray, running_var: np.ndarray, eps: float, label: str) -> np.ndarray:
    if (running_var < 0).any():
        raise GraphError(f"{label} has a negative running_var; the checkpoint is corrupt.")
    return np.abs(gamma) / np.sqrt(running_var + eps)


def _fetch_attr(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _unwrap_module(model: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    for _ in range(4):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            break
    return model


# ---------------------------------------------------------------------------------------------
# Chains: named layers (layers=...) and bare state_dicts
# ---------------------------------------------------------------------------------------------


@dataclass
class _ChainEntry:
    name: str
    label: str  # how messages call it: "layer 'fc1' (Linear)" or "weight '0.weight'"
    kind: Literal["linear", "conv", "batchnorm"]
    weight: np.ndarray | None = None
    groups: int | None = None  # None: inferred from the previous layer's width
    scale: np.ndarray | None = None  # BatchNorm: the per-channel factor to fold


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
        if groups is None:
            groups = _infer_groups(entry.weight, feat) if conv else 1
        if not conv and last_is_conv:
            feat = replace(feat, flat=True)
        feat, last = builder.weight_layer(
            entry.name, entry.weight, conv=conv, groups=groups, inp=feat, label=entry.label
        )
        last_is_conv = conv


def _infer_groups(weight: np.ndarray, feat: _Feat) -> int:
    """Groups of a state_dict conv: its input channels per group against the channels it reads."""
    if feat.nodes is None:
        return 1
    width, per_group = len(feat.nodes), weight.shape[1]
    if per_group and width % per_group == 0 and weight.shape[0] % (width // per_group) == 0:
        return width // per_group
    return 1


def _list_names(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:40])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 40 else "")


def _module_chain_entries(model: nn.Module, layers: Sequence[str]) -> list[_ChainEntry]:
    modules = dict(model.named_modules())
    available = [n for n, m in modules.items() if isinstance(m, (nn.Linear, *_CONV_MODULES))]
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
        if isinstance(module, nn.Linear):
            entries.append(
                _ChainEntry(name, label, "linear", _weight_array(module.weight, label), 1)
            )
        elif isinstance(module, _CONV_MODULES):
            weight = _weight_array(module.weight, label)
            entries.append(_ChainEntry(name, label, "conv", weight, int(module.groups)))
        elif isinstance(module, _BATCHNORM_MODULES):
            scale = _batchnorm_scale(module, label)
            entries.append(_ChainEntry(name, label, "batchnorm", scale=scale))
        else:
            what = "not a module of the model" if module is None else f"a {type(module).__name__}"
            raise GraphError(
                f"layers= names {name!r}, which is {what}; layers= takes the names of "
                "Linear/Conv layers (and of BatchNorm layers to fold into the layer before them). "
                f"Available Linear/Conv layers: {_list_names(available)}."
            )
    return entries


def _unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Any:
    """The state_dict (or model) inside a checkpoint dict, e.g. ``{"state_dict": ...}``."""
    found: Any = checkpoint
    for _ in range(4):
        if not isinstance(found, Mapping):
            break
        for key in ("state_dict", "model_state_dict", "model"):
            inner = found.get(key)
            if isinstance(inner, (Mapping, nn.Module)):
                found = inner
                break
        else:
            break
    return found


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
    state: Mapping[Any, Any], layers: Sequence[str] | None
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
    if layers is None:
        selected = list(found)
    else:
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
            weight = _weight_array(tensors[key], label)
            entries.append(_ChainEntry(name, label, kind, weight, 1 if kind == "linear" else None))
            continue
        prefix = key.removesuffix("running_var")
        running_var = _weight_array(tensors[key], label)
        gamma_value = tensors.get(prefix + "weight")
        gamma = (
            np.ones_like(running_var) if gamma_value is None else _weight_array(gamma_value, label)
        )
        scale = _fold_scale(gamma, running_var, 1e-5, label)
        entries.append(_ChainEntry(name, f"BatchNorm {key!r}", "batchnorm", scale=scale))
    return entries
