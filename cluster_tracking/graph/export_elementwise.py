"""The ``torch.export`` walker's rules for elementwise ops, normalisations and per-unit scales.

Elementwise ops between activations (residual adds, SwiGLU's ``gate * up``) identify the units at
equal positions; with constants or parameters they pass units through. LayerNorm/RMSNorm affine
weights, and any per-unit parameter multiplied in, fold into the weight layers that read the
result; a per-unit parameter applied right after a weight layer (LayerScale) and a BatchNorm right
after one fold into its output rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.export_base import _WalkerBase
from cluster_tracking.graph.export_units import (
    _OTHER,
    _broadcast_to,
    _compress,
    _Derived,
    _first_of,
    _flatten,
    _Param,
    _same_scales,
    _Scale,
    _shape,
    _Units,
    _varying,
    _vector,
)
from cluster_tracking.graph.types import WeightSource
from cluster_tracking.graph.weights import batchnorm_scale


class _ElementwiseRules(_WalkerBase):
    """Elementwise ops, normalisations and per-unit scales."""

    def _layer_norm(self, node: fx.Node, name: str, args: tuple[Any, ...]) -> Any:
        x = args[0]
        weight = args[2] if len(args) > 2 else None
        out_shape = _shape(node.meta.get("val")) or (x.shape if isinstance(x, _Units) else None)
        result = self._carry(x, out_shape)
        if isinstance(weight, _Param) and isinstance(result, _Units):
            result = self._scaled(result, weight, fold_output=False)
        if name == "native_layer_norm":
            return (result, _OTHER, _OTHER)
        return result

    def _batch_norm(self, node: fx.Node, args: tuple[Any, ...]) -> Any:
        x, weight = args[0], args[1]
        value = node.meta.get("val")
        out_shape = _shape(value[0] if isinstance(value, (tuple, list)) else value)
        result = self._carry(x, out_shape, keep_spec=False)
        module_name = None
        for candidate in (
            args[1],
            args[3] if len(args) > 3 else None,
            args[4] if len(args) > 4 else None,
        ):
            if isinstance(candidate, _Param):
                module_name = candidate.name.rsplit(".", 1)[0]
                break
        if (
            isinstance(x, _Units)
            and x.spec is not None
            and x.spec.folded is None
            and module_name is not None
            and x.ids is not None
            and _varying(x.ids) <= {1}  # normalises the units' dim, not positions
        ):
            try:
                module = self.model.get_submodule(module_name)
            except AttributeError:
                module = None
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise self._error(
                    f"{self._describe(node)} is a functional batch_norm whose parameters are not "
                    "a BatchNorm module's, so its statistics cannot be read again"
                )
            if self.deferred is not None:
                raise GraphError(
                    f"{self._describe(node)} is a BatchNorm ({module_name!r}) folded into the "
                    "layer before it; the bounded-memory reader of model folders reads its "
                    "statistics from no file: audit the model in memory (load it and call "
                    "measure(model))."
                )
            scale = batchnorm_scale(module, f"layer {module_name!r}")
            channels = x.ids.reshape(-1).numpy()
            if len(channels) == len(x.spec.dst) and np.array_equal(channels, x.spec.dst):
                self.builder.fold(x.spec, scale, f"layer {module_name!r}", module_name)
        del weight
        return _first_of(value, result)

    def _scaled(self, x: _Units, param: _Param, *, fold_output: bool) -> _Units:
        """``x`` times a per-unit parameter: folded into the layer before (``fold_output`` and
        ``x`` is that layer's raw output) or kept for the layers that read it."""
        if param.transposed:
            raise self._error(
                f"{self._describe(self.node)} multiplies {x.origin} by a transposed parameter "
                f"{param.name!r}"
            )
        index = param.element_index()
        try:
            full = _broadcast_to(index, x.shape)
        except RuntimeError as error:
            raise self._error(
                f"{self._describe(self.node)}: parameter {param.name!r} does not broadcast over "
                f"{x.origin}"
            ) from error
        scale = _Scale(param.name, _compress(full), param.offset)
        spec = x.spec
        if fold_output and spec is not None and spec.folded is None and x.ids is not None:
            axis = x.spec_axis % len(x.shape)
            ids, rows = _compress(x.ids), scale.index
            if not (_varying(rows) - {axis}) and _varying(ids) <= {axis}:
                nodes = ids.reshape(-1).numpy()
                if len(nodes) == len(spec.dst) and np.array_equal(nodes, spec.dst):
                    row_index = _vector(rows.reshape(-1).numpy(), len(spec.dst))
                    values = np.abs(param.offset + self._read(param.name).reshape(-1)[row_index])
                    if self.deferred is None:  # else applied as the weights are read
                        spec.weight = spec.weight * values.reshape(
                            (-1,) + (1,) * (spec.weight.ndim - 1)
                        )
                    base = spec.source or WeightSource(f"{spec.name.split('#')[0]}.weight")
                    spec.source = replace(
                        base,
                        output_scales=(
                            *base.output_scales,
                            (param.name, row_index, param.offset),
                        ),
                    )
                    spec.folded = f"parameter {param.name!r}"
                    return replace(x, spec=None)
        return replace(x, scales=(*x.scales, scale), spec=None)

    def _pointwise(
        self,
        node: fx.Node,
        name: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        out_shape: Any,
    ) -> Any:
        values = list(_flatten((args, kwargs)))
        units = [v for v in values if isinstance(v, _Units)]
        params = [v for v in values if isinstance(v, _Param) and v.name not in self.buffers]
        derived = [v for v in values if isinstance(v, _Derived)]
        if derived and name not in ("add", "sub", "rsub", "cat"):
            raise self._error(
                f"{self._describe(node)} multiplies an activation by a value computed from "
                f"parameter(s) {', '.join(derived[0].names)}, which is neither a per-unit scale "
                "the graph can fold nor a weight"
            )
        if out_shape is None:
            return _OTHER
        bound = [u for u in units if u.ids is not None]
        if not bound:
            first = units[0]
            return _Units(None, out_shape, first.origin, first.placeholder)
        reference = bound[0]
        units = [self._bind_like(u, reference) if u.ids is None else u for u in units]
        maps = [_broadcast_to(u.ids, out_shape) for u in units if u.ids is not None]
        merged = maps[0]
        for other in maps[1:]:
            if torch.equal(merged, other):
                continue
            both = (merged >= 0) & (other >= 0)
            if both.any():
                pairs = torch.unique(torch.stack([merged[both], other[both]], dim=1), dim=0)
                self.builder.union(pairs[:, 0].numpy(), pairs[:, 1].numpy())
            merged = torch.where(merged >= 0, merged, other)
        same = all(torch.equal(maps[0], m) for m in maps[1:])
        keep_spec = len(units) == 1 and name in ("mul", "div") and self._sole_user(node)
        result = _Units(
            _compress(merged),
            out_shape,
            reference.origin if len(units) == 1 else f"the output of {self._describe(node)}",
            scales=reference.scales if same and _same_scales(units) else (),
            spec=reference.spec if keep_spec else None,
            spec_axis=reference.spec_axis,
        )
        if params and name in ("mul", "mul_"):
            if len(params) > 1:
                raise self._error(f"{self._describe(node)} multiplies by several parameters")
            return self._scaled(result, params[0], fold_output=keep_spec)
        if params and name not in ("add", "add_", "sub", "sub_", "rsub"):
            raise self._error(
                f"{self._describe(node)} combines {reference.origin} with parameter "
                f"{params[0].name!r} in a way that is neither a per-unit scale nor a bias"
            )
        return result
