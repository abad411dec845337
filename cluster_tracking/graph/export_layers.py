"""The ``torch.export`` walker's rules for weight layers: linear maps, convolutions, embeddings and
recurrent layers, each a layer of new nodes joined to the units it reads.

A weight applied along a dim of an activation reads the units of that dim. If the ids vary along
other dims too, the weight would join different units at different positions: refused. If they
do not vary along the weight's dim, the weight mixes positions, not units (MLP-Mixer token
mixing): units pass through and the weight adds no edge. A unit read several times along the dim
(a flattened feature map, in any layout) gets the summed magnitudes of its columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import fx

from cluster_tracking.graph.export_movement import _MovementRules
from cluster_tracking.graph.export_units import (
    _OTHER,
    _RECURRENT_GATES,
    _TRANSPOSED_CONVOLUTIONS,
    _along,
    _broadcast_to,
    _compress,
    _Param,
    _shape,
    _Units,
    _varying,
)
from cluster_tracking.graph.types import BlockKind, WeightSource


class _LayerRules(_MovementRules):
    """Weight layers."""

    def _product(self, node: fx.Node, name: str, args: tuple[Any, ...]) -> Any:
        if name == "linear":
            x, weight = args[0], args[1]
            if isinstance(x, _Units) and isinstance(weight, _Param):
                return self._weight_layer(node, x, weight, transposed=weight.transposed, axis=-1)
            raise self._error(f"{self._describe(node)} applies a weight that is not a parameter")
        if name in ("addmm", "baddbmm"):
            left, right = args[1], args[2]
        else:
            left, right = args[0], args[1]
        if isinstance(left, _Units) and isinstance(right, _Param):
            # x @ W with W stored [in, out] (GPT-2's Conv1D): the layer's [out, in] is W^T.
            return self._weight_layer(node, left, right, transposed=not right.transposed, axis=-1)
        if isinstance(left, _Param) and isinstance(right, _Units):
            return self._weight_layer(node, right, left, transposed=left.transposed, axis=-2)
        return self._contraction(node, left, right)

    def _weight_layer(
        self,
        node: fx.Node,
        x: _Units,
        param: _Param,
        *,
        transposed: bool,
        axis: int,
        conv: bool = False,
        groups: int = 1,
    ) -> Any:
        out_shape = _shape(node.meta.get("val"))
        assert out_shape is not None
        ndim = len(x.shape)
        axis %= ndim
        if not param.plain:
            raise self._error(
                f"{self._describe(node)} applies parameter {param.name!r} as a weight after "
                "reshaping or shifting it"
            )
        if param.name in self.skip or param.name in self.embeddings:
            # The LM head when embeddings are left out; a head tied to an embedding otherwise
            # (the embedding's block holds these weights already: tied weights count once).
            return _OTHER
        raw = self._read(param.name)
        n_in = (raw.shape[0] if transposed else raw.shape[1]) * (groups if conv else 1)
        x = self._bind(x, axis, n_in)
        assert x.ids is not None
        varying = _varying(x.ids)
        if axis not in varying and x.shape[axis] > 1:
            if conv:
                raise self._error(
                    f"{self._describe(node)} convolves dim {axis}, but the units of its input "
                    f"({x.origin}) are on dim(s) {sorted(varying)}"
                )
            # A weight over positions (token mixing): units pass through, no edges.
            ids = x.ids
            return _Units(_compress(ids.expand(out_shape)), out_shape, x.origin, scales=x.scales)
        if varying - {axis}:
            raise self._error(
                f"{self._describe(node)} applies a weight along dim {axis} of {x.origin}, whose "
                f"units also vary along dim(s) {sorted(varying - {axis})}, so the weight would "
                "join different units at different positions"
            )
        kind, src, order = self._columns(node, x, n_in, conv)
        input_scales = self._input_scales(node, x, axis, order)
        source = WeightSource(
            param.name,
            transposed=transposed,
            columns=order,
            input_scales=input_scales,
        )
        weight = self._effective(raw, source, param.name)
        plain = not transposed and order is None and not input_scales
        name = param.name.removesuffix(".weight").removesuffix("_weight")
        if plain and param.name.endswith(".weight"):
            source_or_none: WeightSource | None = None
        else:
            source_or_none = source
        spec = self.builder.add_block(
            name, kind, weight, src, groups=groups if conv else 1, source=source_or_none
        )
        out_axis = 1 if conv else (axis if axis < len(out_shape) else len(out_shape) - 1)
        ids = _along(spec.dst, len(out_shape), out_axis)
        return _Units(ids, out_shape, f"layer {spec.name!r}", spec=spec, spec_axis=out_axis)

    def _columns(
        self, node: fx.Node, x: _Units, n_in: int, conv: bool
    ) -> tuple[BlockKind, np.ndarray, np.ndarray | None]:
        """``(kind, src, order)`` of a weight layer reading the units of ``x`` (bound to its
        ``n_in`` input columns): its input nodes, and for a ``flatten`` layer (a unit read in
        several columns) the channel-major order of its columns."""
        assert x.ids is not None
        columns = x.ids.reshape(-1).numpy().astype(np.int64)
        if len(columns) == 1 and n_in > 1:
            columns = np.repeat(columns, n_in)
        if (columns < 0).any():
            raise self._error(
                f"{self._describe(node)} reads features of {x.origin} that are not units of the "
                "graph (constants or padding concatenated in)"
            )
        unique, first, counts = np.unique(columns, return_index=True, return_counts=True)
        kind: BlockKind
        order: np.ndarray | None = None
        if len(unique) == len(columns):
            kind, src = ("conv" if conv else "linear"), columns
        elif conv:
            raise self._error(
                f"{self._describe(node)} reads a unit in several of its input channels"
            )
        else:
            if len(set(counts.tolist())) != 1:
                raise self._error(
                    f"{self._describe(node)} reads the units of {x.origin} unequally often "
                    f"({counts.min()} to {counts.max()} columns each)"
                )
            src = unique[np.argsort(first)]  # in order of first appearance
            rank = np.empty(columns.max() + 1, dtype=np.int64)
            rank[src] = np.arange(len(src))
            order = np.argsort(rank[columns], kind="stable")  # channel-major columns
            kind = "flatten"
        return kind, src, order

    def _input_scales(
        self, node: fx.Node, x: _Units, axis: int, order: np.ndarray | None
    ) -> tuple[tuple[str, np.ndarray, float], ...]:
        """The parameter index of every input column of a weight layer, per pending scale."""
        folded = []
        for scale in x.scales:
            index = _compress(_broadcast_to(scale.index, x.shape))
            if _varying(index) - {axis}:
                raise self._error(
                    f"{self._describe(node)} reads {x.origin}, scaled by {scale.parameter!r} "
                    "differently at different positions"
                )
            vector = index.reshape(-1).numpy().astype(np.int64)
            if len(vector) == 1:
                vector = np.repeat(vector, x.shape[axis])
            folded.append(
                (scale.parameter, vector if order is None else vector[order], scale.offset)
            )
        return tuple(folded)

    def _convolution(
        self, node: fx.Node, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        x, weight = args[0], args[1]
        if not isinstance(x, _Units) or not isinstance(weight, _Param):
            raise self._error(
                f"{self._describe(node)} applies a weight that is not a parameter of the model "
                "(computed from parameters, e.g. by a weight_norm parametrization, or reshaped)"
            )
        transposed = name in _TRANSPOSED_CONVOLUTIONS
        if name in ("convolution", "_convolution"):
            transposed = bool(args[6])
            groups = int(args[8])
        elif transposed:
            groups = int(args[6]) if len(args) > 6 else int(kwargs.get("groups", 1))
        else:
            groups = int(args[6]) if len(args) > 6 else int(kwargs.get("groups", 1))
        if transposed and groups != 1:
            raise self._error(f"{self._describe(node)} is a grouped transposed convolution")
        if weight.transposed:
            raise self._error(f"{self._describe(node)} convolves with a transposed parameter")
        return self._weight_layer(
            node, x, weight, transposed=transposed, axis=1, conv=True, groups=groups
        )

    def _embedding(self, node: fx.Node, args: tuple[Any, ...], out_shape: Any) -> Any:
        weight = args[0]
        if not isinstance(weight, _Param) or out_shape is None:
            raise self._error(f"{self._describe(node)} looks up a table that is not a parameter")
        module = self._module_path(node) or weight.name.removesuffix(".weight")
        n_vocab, width = weight.shape[0], weight.shape[-1]
        if not self.include_embeddings:
            layer, nodes = self.builder.new_layer(module, "input", width)
            self.builder.optional.add(layer)
            self.embeddings[weight.name] = np.empty(0, dtype=np.int64)
            return _Units(_along(nodes, len(out_shape), -1), out_shape, f"embedding {module!r}")
        vocabulary = self.embeddings.get(weight.name)
        if vocabulary is None or len(vocabulary) == 0:
            _, vocabulary = self.builder.new_layer(f"{module}.index", "input", n_vocab)
            self.embeddings[weight.name] = vocabulary
        raw = self._read(weight.name)
        source = WeightSource(weight.name, transposed=True)
        spec = self.builder.add_block(
            module,
            "linear",
            self._effective(raw, source, module),
            vocabulary,
            source=source,
        )
        ids = _along(spec.dst, len(out_shape), len(out_shape) - 1)
        return _Units(ids, out_shape, f"embedding {module!r}", spec=spec, spec_axis=-1)

    def _recurrent(self, node: fx.Node, name: str, args: tuple[Any, ...]) -> Any:
        x, params = args[0], args[2]
        has_biases, layers = bool(args[3]), int(args[4])
        bidirectional, batch_first = bool(args[7]), bool(args[8])
        if not isinstance(x, _Units) or not isinstance(params, (list, tuple)):
            raise self._error(f"{self._describe(node)} does not read an activation")
        if x.scales:
            raise self._error(
                f"{self._describe(node)} reads a normalised tensor; folding a normalisation into "
                "a recurrent layer is not supported"
            )
        gates = _RECURRENT_GATES[name]
        per_layer = (4 if has_biases else 2) * (2 if bidirectional else 1)
        if not all(isinstance(p, _Param) for p in params) or len(params) != per_layer * layers:
            raise self._error(f"{self._describe(node)} has weights the graph cannot attribute")
        feature_axis = len(x.shape) - 1
        del batch_first  # the features are the last dim either way
        value = node.meta.get("val")
        out_shape = _shape(value[0] if isinstance(value, (tuple, list)) else value)
        assert out_shape is not None
        first = self._bind(x, feature_axis, params[0].shape[1])
        assert first.ids is not None
        if _varying(first.ids) - {feature_axis}:
            raise self._error(f"{self._describe(node)} reads units that vary over time steps")
        inputs = first.ids.reshape(-1).numpy().astype(np.int64)
        for layer in range(layers):
            outputs = []
            for direction in range(2 if bidirectional else 1):
                base = (layer * (2 if bidirectional else 1) + direction) * (
                    per_layer // (2 if bidirectional else 1)
                )
                w_ih, w_hh = params[base], params[base + 1]
                source_ih = WeightSource(w_ih.name, gates=gates)
                weight_ih = self._effective(self._read(w_ih.name), source_ih, w_ih.name)
                name_ih = w_ih.name.removesuffix(".weight_ih_l" + w_ih.name.rsplit("_l", 1)[-1])
                label = f"{name_ih}.l{layer}" + ("_reverse" if direction else "")
                spec = self.builder.add_block(label, "linear", weight_ih, inputs, source=source_ih)
                source_hh = WeightSource(w_hh.name, gates=gates)
                weight_hh = self._effective(self._read(w_hh.name), source_hh, w_hh.name)
                self.builder.add_block(
                    f"{label}.hh", "linear", weight_hh, spec.dst, source=source_hh, dst=spec.dst
                )
                outputs.append(spec.dst)
            inputs = np.concatenate(outputs)
        ids = _along(inputs, len(out_shape), len(out_shape) - 1)
        result = _Units(ids, out_shape, f"{self._describe(node)}")
        return (result,) + (_OTHER,) * (len(value) - 1 if isinstance(value, (tuple, list)) else 0)
