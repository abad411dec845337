"""Following a model's data flow with ``torch.export``: ATen ops with every tensor's shape.

``torch.fx`` symbolic tracing knows no shapes, so it cannot follow a reshape that moves the
channel axis (a ViT's patch embedding, attention heads, channels-last blocks) and it cannot trace
Hugging Face models at all. :class:`ExportWalker` exports the model with example inputs
(``torch.export.export(..., strict=False)``, nothing run on real data) and runs the ATen graph on
*unit maps* instead of tensors.

A unit map is an integer tensor of the same rank as the activation, holding the provisional
node id of every element (``-1``: no unit, e.g. a constant concatenated in). A dim along which
the ids do not change is kept at size 1 (broadcast), so a ``[batch, tokens, channels]``
activation has a ``[1, 1, channels]`` map. Every data-movement op (``view``, ``permute``,
``transpose``, ``cat``, ``split``, ``expand``...) is applied to the map itself, so wherever the
channels go, their ids follow; no reshape is guessed.

The rules (README, "The weight graph"):

- A weight applied along a dim of an activation (``linear``, ``addmm``/``mm``/``matmul`` with a
  parameter, convolutions along dim 1) reads the units of that dim: a layer of new nodes, one per
  output unit, joined to them. If the ids vary along other dims too, the weight would join
  different units at different positions: refused. If they do not vary along the weight's dim,
  the weight mixes positions, not units (MLP-Mixer token mixing): units pass through and the
  weight adds no edge. A unit read several times along the dim (a flattened feature map, in any
  layout) gets the summed magnitudes of its columns.
- Elementwise ops between activations (residual adds, SwiGLU's ``gate * up``) identify the
  units at equal positions; with constants or parameters they pass units through.
- A product of two activations that contracts their units (attention scores, ``q @ k^T``) carries
  no units: q and k hang off the stream they read. A product that contracts positions (scores
  ``@ v``, ``scaled_dot_product_attention``) carries v's units: v's output unit and the output
  projection's input unit are one node.
- LayerNorm/RMSNorm affine weights, and any per-unit parameter multiplied in, fold into the
  weight layers that read the result (their input columns); a per-unit parameter applied right
  after a weight layer (LayerScale) and a BatchNorm right after one fold into its output rows.
  A normalisation whose output is added to another activation before any layer reads it passes
  through unfolded.
- Embeddings start the units of the stream they write; ``include_embeddings=True`` adds their
  tables as blocks from vocabulary (or position) nodes. The LM head, and any layer using an
  embedding's weight again (tied weights), is left out unless embeddings are included; tied
  weights count once.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from cluster_tracking.errors import GraphError, first_line
from cluster_tracking.graph.export_layers import _LayerRules
from cluster_tracking.graph.export_units import (
    _ACTIVATIONS,
    _ATTENTION,
    _CHANNEL_NORMALISATIONS,
    _CONVOLUTIONS,
    _EXPORT_HINT,
    _IDENTITIES,
    _MOVES,
    _NOT_UNITS,
    _OTHER,
    _PASS_NORMALISATIONS,
    _RECURRENT_GATES,
    _REDUCTIONS,
    _SPATIAL,
    _TRANSPOSED_CONVOLUTIONS,
    _base_name,
    _Derived,
    _flatten,
    _is_pointwise,
    _Param,
    _quiet,
    _shape,
    _Units,
)

__all__ = ["ExportWalker"]


class ExportWalker(_LayerRules):
    """Runs a model's ``torch.export`` graph on unit maps, filling ``builder``.

    Args:
        model: the network (already unwrapped).
        builder: the provisional graph to fill.
        args, kwargs: example inputs (their values do not matter, only their shapes and dtypes).
        include_embeddings: add embedding tables (and the LM head) as weight blocks.
        skip: names of parameters whose layers are left out (the LM head of a Hugging Face
            model when embeddings are not included).
    """

    def run(self) -> None:
        program = self._export()
        signature = program.graph_signature
        names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        self.buffers = set(signature.inputs_to_buffers.values())
        constants = set(getattr(signature, "inputs_to_lifted_tensor_constants", {}))
        self.tensors = dict(self.model.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(self.model.named_buffers(remove_duplicate=False)))
        user_inputs = list(signature.user_inputs)
        for node in program.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.env[node] = self._placeholder(node, names, constants, user_inputs)
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            else:
                self.env[node] = _OTHER

    def _export(self) -> Any:
        modes = {module: module.training for module in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad(), _quiet():
                return torch.export.export(self.model, self.args, self.kwargs, strict=False)
        except Exception as error:
            raise GraphError(
                f"torch.export cannot trace {type(self.model).__name__} with the example inputs "
                f"({type(error).__name__}: {first_line(error)}). The weight graph follows the "
                f"model's data flow by exporting it; {_EXPORT_HINT}."
            ) from error
        finally:
            for module, training in modes.items():
                module.training = training

    def _placeholder(
        self, node: fx.Node, names: Mapping[str, str], constants: set[str], inputs: list[str]
    ) -> Any:
        name = str(node.name)
        if name in names:
            return _Param(names[name], _shape(node.meta.get("val")) or ())
        if name in constants or name not in inputs:
            return _OTHER
        value = node.meta.get("val")
        shape = _shape(value)
        if shape is None or not getattr(value, "dtype", torch.int64).is_floating_point:
            return _OTHER  # token ids, masks: read by embeddings, not units
        return _Units(None, shape, origin="the model input", placeholder=name)

    def _call(self, node: fx.Node) -> Any:
        target = node.target
        args = fx.node.map_arg(node.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.env.__getitem__)
        assert isinstance(args, tuple) and isinstance(kwargs, dict)
        if target is operator.getitem:
            container, index = args
            if isinstance(container, (tuple, list)) and isinstance(index, int):
                return container[index]
            return _OTHER
        name = _base_name(target)
        if name.endswith("_") and not name.startswith("_"):
            name = name[:-1]  # an in-place op (relu_, dropout_) acts as its functional form
        values = list(_flatten((args, kwargs)))
        units = [v for v in values if isinstance(v, _Units)]
        params = [v for v in values if isinstance(v, _Param)]
        out_shape = _shape(node.meta.get("val"))
        if name == "embedding":
            return self._embedding(node, args, out_shape)
        if not units:
            if params:
                return self._tuple_of(node, self._param_op(node, name, args, kwargs, out_shape))
            derived = [v for v in values if isinstance(v, _Derived)]
            if derived:
                return self._tuple_of(node, _Derived(tuple(n for d in derived for n in d.names)))
            return self._tuple_of(node, _OTHER)
        if name in _NOT_UNITS:
            return self._tuple_of(node, _OTHER)
        if name in ("linear", "addmm", "mm", "matmul", "bmm", "baddbmm"):
            return self._product(node, name, args)
        if name == "einsum":
            return self._einsum(node, args)
        if name in _CONVOLUTIONS or name in _TRANSPOSED_CONVOLUTIONS:
            return self._convolution(node, name, args, kwargs)
        if name in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"):
            return self._layer_norm(node, name, args)
        if "batch_norm" in name:
            return self._batch_norm(node, args)
        if name in _RECURRENT_GATES:
            return self._recurrent(node, name, args)
        if name in _ATTENTION:
            return self._attention(node, args)
        if (
            name in _IDENTITIES
            or name in _CHANNEL_NORMALISATIONS
            or name in _PASS_NORMALISATIONS
            or name in _ACTIVATIONS
        ):
            first = args[0]
            return self._tuple_of(
                node, self._carry(first, out_shape, keep_spec=name in _IDENTITIES)
            )
        if name == "native_dropout":
            return (self._carry(args[0], out_shape), _OTHER)
        if name in ("cat", "concat", "stack"):
            return self._cat(node, name, args, kwargs, out_shape)
        if name in ("constant_pad_nd", "pad"):
            return self._pad(node, args, out_shape)
        if name in ("reshape_as", "view_as", "expand_as") and out_shape is not None:
            target = "expand" if name == "expand_as" else "reshape"
            return self._move(node, target, (args[0], list(out_shape)), {})
        if name in _MOVES:
            return self._move(node, name, args, kwargs)
        if name in _REDUCTIONS:
            return self._reduce(node, name, args, kwargs, out_shape)
        if name in _SPATIAL:
            return self._spatial(node, args, out_shape)
        if name in ("index_select", "gather", "index", "take_along_dim"):
            return self._index(node, name, args, out_shape)
        if _is_pointwise(target) or name in ("where", "masked_fill", "clamp", "hardtanh"):
            return self._pointwise(node, name, args, kwargs, out_shape)
        raise self._error(
            f"{self._describe(node)} is not an operation the weight graph can follow (it is not "
            "elementwise, a reshape or a known layer, and may mix units without weights)"
        )
