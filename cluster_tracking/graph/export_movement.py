"""The ``torch.export`` walker's rules for data movement and for products between activations.

Every data-movement op (``view``, ``permute``, ``transpose``, ``cat``, ``split``, ``expand``...) is
applied to the unit map itself, so wherever the channels go, their ids follow. A product of two
activations that contracts their units (attention scores) carries no units; one that contracts
positions (scores ``@ v``, ``scaled_dot_product_attention``) carries v's units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from cluster_tracking.graph.export_elementwise import _ElementwiseRules
from cluster_tracking.graph.export_units import (
    _OTHER,
    _along,
    _broadcast_to,
    _compress,
    _first_of,
    _Param,
    _Scale,
    _shape,
    _Units,
    _varying,
)


class _MovementRules(_ElementwiseRules):
    """Data movement and products between activations."""

    def _contraction(self, node: fx.Node, left: Any, right: Any) -> Any:
        out_shape = _shape(node.meta.get("val"))
        assert out_shape is not None
        if isinstance(left, _Units) and isinstance(right, _Units):
            left_units = left.ids is not None and (len(left.shape) - 1) in _varying(left.ids)
            right_units = right.ids is not None and (len(right.shape) - 2) in _varying(right.ids)
            if left_units and right_units:
                return _OTHER  # q @ k^T: attention scores carry no units
            raise self._error(
                f"{self._describe(node)} multiplies two activations in a way the graph cannot "
                "attribute (neither attention scores nor a product over positions)"
            )
        if isinstance(right, _Units):  # scores @ v: positions mixed, v's units carried
            return self._over_positions(node, right, axis=len(right.shape) - 2, out_shape=out_shape)
        if isinstance(left, _Units):
            return self._over_positions(node, left, axis=len(left.shape) - 1, out_shape=out_shape)
        return _OTHER

    def _einsum(self, node: fx.Node, args: tuple[Any, ...]) -> Any:
        """``einsum`` between activations: as ``matmul`` (scores carry no units; a product over
        positions carries the units of the operand that has them)."""
        equation, operands = str(args[0]).replace(" ", ""), list(args[1])
        out_shape = _shape(node.meta.get("val"))
        if "->" not in equation or "." in equation or out_shape is None:
            raise self._error(f"{self._describe(node)} has an implicit or ellipsis equation")
        inputs, output = equation.split("->")
        labels = inputs.split(",")
        if any(isinstance(o, _Param) for o in operands):
            raise self._error(
                f"{self._describe(node)} applies a parameter through einsum; the weight graph "
                "reads weights from linear, matmul and convolution ops"
            )
        units = [(o, s) for o, s in zip(operands, labels, strict=True) if isinstance(o, _Units)]
        if any(u.ids is None for u, _ in units):
            raise self._error(f"{self._describe(node)} mixes the model input before any layer")
        contracted = set("".join(labels)) - set(output)

        def unit_labels(x: _Units, subscripts: str) -> set[str]:
            assert x.ids is not None
            return {subscripts[d] for d in _varying(x.ids)}

        summed = [unit_labels(u, s) & contracted for u, s in units]
        if len(units) == 2 and all(summed):
            return _OTHER  # q k^T: the units of both are contracted
        if len(units) == 1 and not summed[0]:
            x, subscripts = units[0]
            assert x.ids is not None
            if len(set(subscripts)) != len(subscripts) or len(subscripts) != x.ids.ndim:
                raise self._error(f"{self._describe(node)} takes a diagonal ({equation})")
            kept = [label for label in subscripts if label in output]
            # The contracted dims carry no units, so the map has size 1 there: drop them.
            ids = x.ids.reshape([x.ids.shape[subscripts.index(label)] for label in kept])
            ids = ids.permute([kept.index(label) for label in output if label in kept])
            sizes = iter(ids.shape)
            shape = [next(sizes) if label in kept else 1 for label in output]
            result = ids.reshape(shape)
            return _Units(_compress(_broadcast_to(result, out_shape)), out_shape, x.origin)
        raise self._error(
            f"{self._describe(node)} ({equation}) mixes the units of an activation with weights "
            "that are not parameters of the model"
        )

    def _over_positions(
        self, node: fx.Node, x: _Units, *, axis: int, out_shape: tuple[int, ...]
    ) -> _Units:
        if x.ids is None:
            raise self._error(f"{self._describe(node)} mixes the model input before any layer")
        if axis in _varying(x.ids):
            raise self._error(
                f"{self._describe(node)} mixes the units of {x.origin} with weights that are "
                "not parameters of the model"
            )
        ids = x.ids
        while ids.ndim < len(out_shape):
            ids = ids.unsqueeze(0)
        ids = ids[(Ellipsis,)] if ids.ndim == len(out_shape) else ids
        return _Units(_compress(_broadcast_to(ids, out_shape)), out_shape, x.origin)

    def _attention(self, node: fx.Node, args: tuple[Any, ...]) -> Any:
        value = node.meta.get("val")
        out = value[0] if isinstance(value, (tuple, list)) else value
        out_shape = _shape(out)
        v = args[2]
        if not isinstance(v, _Units) or v.ids is None or out_shape is None:
            raise self._error(f"{self._describe(node)} attends over values that are not units")
        ids = v.ids
        if len(v.shape) - 2 in _varying(ids):
            raise self._error(f"{self._describe(node)} has values whose units vary by position")
        heads_axis = len(out_shape) - 3
        if (
            heads_axis >= 0
            and ids.shape[heads_axis] > 1
            and ids.shape[heads_axis] != out_shape[heads_axis]
        ):
            repeat = out_shape[heads_axis] // ids.shape[heads_axis]
            ids = ids.repeat_interleave(repeat, dim=heads_axis)  # grouped-query attention
        result = _Units(
            _compress(_broadcast_to(ids, out_shape)), out_shape, f"attention {v.origin}"
        )
        return _first_of(value, result)

    def _move(
        self, node: fx.Node, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        x = args[0]
        value = node.meta.get("val")
        if not isinstance(x, _Units):
            return self._tuple_of(node, _OTHER)
        if x.ids is None and x.scales:
            raise self._error(
                f"{self._describe(node)} reshapes the model input after a normalisation and "
                "before any layer reads it"
            )
        if x.ids is None:  # the model input, reshaped before any layer reads it
            if isinstance(value, (tuple, list)):
                return tuple(_Units(None, _shape(v) or (), x.origin, x.placeholder) for v in value)
            return _Units(None, _shape(value) or (), x.origin, x.placeholder)
        concrete = [self._concrete(a) for a in args[1:]]
        concrete_kwargs = {k: self._concrete(v) for k, v in kwargs.items()}
        op: Any = node.target
        if name in ("view", "_unsafe_view", "view_copy", "reshape"):
            op = torch.ops.aten.reshape.default
        elif name == "expand":
            op = torch.ops.aten.expand.default

        def move(tensor: torch.Tensor) -> Any:
            try:
                return op(tensor.expand(x.shape), *concrete, **concrete_kwargs)
            except Exception as error:
                raise self._error(
                    f"{self._describe(node)} could not be followed on the unit map ({error})"
                ) from error

        moved = move(x.ids)
        scales = [(scale, move(_broadcast_to(scale.index, x.shape))) for scale in x.scales]
        reshaped = name in ("view", "_unsafe_view", "reshape", "view_copy", "permute", "transpose")
        keep_spec = reshaped and self._sole_user(node)
        if isinstance(moved, (tuple, list)) and isinstance(value, (tuple, list)):
            return tuple(
                self._moved(m, x, _shape(v), False, [(p, pieces[i]) for p, pieces in scales])
                for i, (m, v) in enumerate(zip(moved, value, strict=True))
            )
        return self._moved(moved, x, _shape(value), keep_spec, scales)

    def _moved(
        self,
        moved: torch.Tensor,
        x: _Units,
        shape: tuple[int, ...] | None,
        keep_spec: bool,
        scales: list[tuple[_Scale, torch.Tensor]] | None = None,
    ) -> _Units:
        if shape is not None and tuple(moved.shape) != shape:
            raise self._error(
                f"the unit map of {x.origin} has shape {tuple(moved.shape)} after "
                f"{self._describe(self.node)}, but the activation has {shape}"
            )
        ids = _compress(moved)
        spec = x.spec if keep_spec else None
        axis = x.spec_axis
        if spec is not None:
            varying = sorted(_varying(ids))
            if len(varying) != 1:
                spec = None
            else:
                axis = varying[0]
        kept = tuple(replace(scale, index=_compress(index)) for scale, index in scales or ())
        return _Units(ids, tuple(moved.shape), x.origin, scales=kept, spec=spec, spec_axis=axis)

    def _cat(
        self,
        node: fx.Node,
        name: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        out_shape: Any,
    ) -> Any:
        tensors = list(args[0])
        dim = int(args[1]) if len(args) > 1 else int(kwargs.get("dim", 0))
        tensor_nodes = list(node.args[0]) if isinstance(node.args[0], (list, tuple)) else []
        units = [t for t in tensors if isinstance(t, _Units)]
        if any(u.ids is None for u in units):
            bound = [u for u in units if u.ids is not None]
            if bound:
                raise self._error(
                    f"{self._describe(node)} joins the model input with other activations before "
                    "any layer reads it"
                )
            return _Units(None, out_shape, units[0].origin, units[0].placeholder)
        ndim = len(out_shape)
        axis = dim % ndim
        if name != "stack" and all(
            u.ids is not None and u.ids.shape[axis % u.ids.ndim] == 1 for u in units
        ):
            # Positions joined (a class token before the patches): the same units.
            return self._pointwise(node, "cat", tuple(units), {}, out_shape)
        if any(u.scales for u in units):
            raise self._error(
                f"{self._describe(node)} concatenates a normalised tensor with others before a "
                "layer reads it; its normalisation weight cannot be folded"
            )
        maps = []
        for tensor, arg in zip(tensors, tensor_nodes, strict=True):
            shape = _shape(arg.meta.get("val")) if isinstance(arg, fx.Node) else None
            if isinstance(tensor, _Units):
                assert tensor.ids is not None
                maps.append(tensor.ids.expand(tensor.shape))
            elif shape is not None:
                maps.append(torch.full(shape, -1, dtype=torch.int64))
            else:
                raise self._error(f"{self._describe(node)} joins something that is not a tensor")
        joined = torch.stack(maps, dim=dim) if name == "stack" else torch.cat(maps, dim=dim)
        return self._moved(joined, units[0], out_shape, False)

    def _pad(self, node: fx.Node, args: tuple[Any, ...], out_shape: Any) -> Any:
        """Padding along dims that carry no units keeps the units (a padded position is the same
        channels' zero); padding the units' dim adds positions with no unit (``-1``)."""
        x = args[0]
        if not isinstance(x, _Units) or x.ids is None or out_shape is None:
            return self._carry(x, out_shape, keep_spec=False)
        padded = {dim for dim in range(len(out_shape)) if out_shape[dim] != x.shape[dim]}
        if not padded & _varying(x.ids):
            return self._carry(x, out_shape, keep_spec=False)
        pad = [int(p) for p in args[1]]
        moved = torch.nn.functional.pad(x.ids.expand(x.shape), pad, value=-1)
        return self._moved(moved, x, out_shape, False)

    def _spatial(self, node: fx.Node, args: tuple[Any, ...], out_shape: Any) -> Any:
        x = args[0]
        if not isinstance(x, _Units):
            return self._tuple_of(node, _OTHER)
        if x.ids is not None and _varying(x.ids) - {0, 1}:
            raise self._error(
                f"{self._describe(node)} pools or resamples dims that carry the units of {x.origin}"
            )
        value = node.meta.get("val")
        shape = _shape(value[0] if isinstance(value, (tuple, list)) else value)
        result = self._carry(x, shape, keep_spec=False)
        return _first_of(value, result)

    def _reduce(
        self,
        node: fx.Node,
        name: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        out_shape: Any,
    ) -> Any:
        x = args[0]
        value = node.meta.get("val")
        if not isinstance(x, _Units) or x.ids is None:
            return self._tuple_of(node, _OTHER)
        dims: Any = args[1] if len(args) > 1 else kwargs.get("dim")
        if name in ("norm", "linalg_vector_norm") and len(args) > 2:
            dims = args[2]
        if isinstance(dims, int):
            dims = [dims]
        if not isinstance(dims, (list, tuple)) or not dims:
            return self._tuple_of(node, _OTHER)  # over everything: a statistic
        ndim = len(x.shape)
        axes = {int(d) % ndim for d in dims}
        if axes & _varying(x.ids):
            return self._tuple_of(node, _OTHER)  # over the units: a statistic (RMSNorm's mean)
        shape = _shape(value[0] if isinstance(value, (tuple, list)) else value)
        squeeze = shape is not None and len(shape) < ndim and bool(axes)

        def reduced(index: torch.Tensor) -> torch.Tensor:
            index = _compress(_broadcast_to(index, x.shape))
            if axes & _varying(index):
                raise self._error(
                    f"{self._describe(node)} reduces {x.origin} over positions its pending "
                    "normalisation scale varies along"
                )
            return index.squeeze(sorted(axes)) if squeeze else index

        ids = reduced(x.ids)
        scales = tuple(replace(sc, index=reduced(sc.index)) for sc in x.scales)
        result = _Units(_compress(ids), shape or x.shape, x.origin, scales=scales)
        return _first_of(value, result)

    def _index(self, node: fx.Node, name: str, args: tuple[Any, ...], out_shape: Any) -> Any:
        x = args[0]
        if not isinstance(x, _Units) or x.ids is None or out_shape is None:
            return _OTHER
        varying = _varying(x.ids)
        last = len(x.shape) - 1
        if varying <= {last} and out_shape[-1] == x.shape[-1]:
            if name in ("index_select", "gather") and int(args[1]) % len(x.shape) == last:
                raise self._error(f"{self._describe(node)} selects units of {x.origin}")
            if name == "index" and len(args[1]) > last and args[1][last] is not None:
                raise self._error(f"{self._describe(node)} selects units of {x.origin}")

            def selected(index: torch.Tensor) -> torch.Tensor:
                index = _compress(_broadcast_to(index, x.shape))
                if _varying(index) - {last}:
                    raise self._error(
                        f"{self._describe(node)} selects positions of {x.origin}, whose pending "
                        "normalisation scale varies by position"
                    )
                vector = index.reshape(-1)
                if len(vector) > 1:
                    return _along(vector.numpy(), len(out_shape), len(out_shape) - 1)
                return vector.reshape([1] * len(out_shape))

            scales = tuple(replace(sc, index=selected(sc.index)) for sc in x.scales)
            return _Units(selected(x.ids), out_shape, x.origin, scales=scales)
        raise self._error(
            f"{self._describe(node)} indexes {x.origin} along dims that carry its units"
        )
