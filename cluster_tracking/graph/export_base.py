"""The state of the ``torch.export`` walker and the helpers every rule uses: reading parameters,
binding unit maps to new nodes, carrying units through an op, and describing an op in an error.

The rules are split by concept over a chain of classes, each in its own module (lowest first):
this one, :mod:`~cluster_tracking.graph.export_elementwise` (elementwise ops, normalisations and
per-unit scales), :mod:`~cluster_tracking.graph.export_movement` (data movement and products
between activations), :mod:`~cluster_tracking.graph.export_layers` (weight layers), and
:class:`~cluster_tracking.graph.export.ExportWalker`, which exports the model and dispatches
each op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.build import _Builder
from cluster_tracking.graph.export_units import (
    _CHAIN_HINT,
    _IDENTITIES,
    _MOVES,
    _OTHER,
    _along,
    _base_name,
    _broadcast_to,
    _compress,
    _Derived,
    _flatten,
    _Other,
    _Param,
    _Units,
    _varying,
)
from cluster_tracking.graph.features import _Feat
from cluster_tracking.graph.types import WeightSource
from cluster_tracking.graph.weights import deferred_placeholder, effective_weight, weight_array


class _WalkerBase:
    """The walker's state (see :class:`~cluster_tracking.graph.export.ExportWalker`) and the
    helpers its rules share."""

    def __init__(
        self,
        model: nn.Module,
        builder: _Builder,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        include_embeddings: bool = False,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        self.model = model
        self.builder = builder
        self.args = args
        self.kwargs = dict(kwargs)
        self.include_embeddings = include_embeddings
        self.skip = set(skip)
        self.tensors: dict[str, torch.Tensor] = {}
        self.embeddings: dict[str, np.ndarray] = {}  # embedding parameter -> its vocabulary nodes
        self.env: dict[fx.Node, Any] = {}
        self.node: fx.Node | None = None
        self.buffers: set[str] = set()  # the model's buffers, named by run()
        #: Deferred weights (a model on the meta device, its weights in a file): reads a
        #: parameter's values (placeholders for large ones, see :meth:`_effective`); ``None``:
        #: the model's own tensors.
        self.deferred: Callable[[str], np.ndarray] | None = None

    def _carry(self, x: Any, out_shape: Any, *, keep_spec: bool = True) -> Any:
        """``x`` passed through an op that keeps its units (and scales) in place."""
        if not isinstance(x, _Units):
            return _OTHER
        shape = tuple(out_shape) if out_shape is not None else x.shape
        if x.ids is None:
            return _Units(None, shape, x.origin, x.placeholder, scales=x.scales)
        ids = x.ids if x.ids.ndim == len(shape) else _broadcast_to(x.ids, shape)
        return _Units(
            _compress(ids),
            shape,
            x.origin,
            scales=x.scales,
            spec=x.spec if keep_spec and self._sole_user(self.node) else None,
            spec_axis=x.spec_axis,
        )

    def _bind(self, x: _Units, axis: int, width: int) -> _Units:
        """``x`` with units: a model input read for the first time gets its layer here."""
        if x.ids is not None:
            return x
        feat = self.builder.resolve(
            _Feat(None, origin=x.origin, placeholder=x.placeholder), width, "a layer"
        )
        assert feat.nodes is not None
        if len(feat.nodes) != x.shape[axis] and x.shape[axis] != 1:
            raise self._error(
                f"the model input {x.placeholder!r} is read along a dim of {x.shape[axis]} "
                f"features by one layer and as {len(feat.nodes)} by another"
            )
        return replace(x, ids=_along(feat.nodes, len(x.shape), axis))

    def _bind_like(self, x: _Units, reference: _Units) -> _Units:
        assert reference.ids is not None
        varying = sorted(_varying(reference.ids))
        if len(varying) != 1:
            raise self._error(
                f"{self._describe(self.node)} combines the model input with {reference.origin} "
                "before any layer reads it"
            )
        axis = varying[0] - (len(reference.shape) - len(x.shape))
        if axis < 0:
            raise self._error(f"{self._describe(self.node)} broadcasts the model input")
        return self._bind(x, axis, x.shape[axis])

    def _param_op(
        self,
        node: fx.Node,
        name: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        out_shape: Any,
    ) -> Any:
        """An op on a parameter alone: a transpose or a move keeps it a parameter (so it can
        still be a weight or a per-unit scale), ``w + c`` an offset; anything else derives a
        value the graph cannot fold."""
        values = list(_flatten((args, kwargs)))
        params = [v for v in values if isinstance(v, _Param)]
        param = args[0] if args else None
        tensors = [v for v in values if isinstance(v, (_Param, _Derived, _Other))]
        if isinstance(param, _Param) and param.name in self.buffers:
            return _OTHER  # running statistics, rotary frequencies: constants
        if not isinstance(param, _Param) or len(params) != 1 or len(tensors) != 1:
            return _Derived(tuple(p.name for p in params))
        if name in _IDENTITIES:
            return param
        if name in ("t", "numpy_T", "adjoint", "mT", "transpose", "permute") and param.plain:
            if len(param.shape) == 2:
                swapped = name in ("t", "numpy_T", "adjoint", "mT") or (
                    name == "transpose" and sorted(int(d) % 2 for d in args[1:3]) == [0, 1]
                )
                if name == "permute":
                    swapped = [int(d) % 2 for d in args[1]] == [1, 0]
                if swapped:
                    return replace(
                        param, shape=tuple(reversed(param.shape)), transposed=not param.transposed
                    )
        if name in _MOVES and not param.transposed and out_shape is not None:
            op: Any = node.target
            if name in ("view", "_unsafe_view", "view_copy", "reshape"):
                op = torch.ops.aten.reshape.default
            concrete = [self._concrete(a) for a in args[1:]]
            try:
                moved = op(param.element_index().expand(param.shape), *concrete)
            except Exception:
                return _Derived((param.name,))
            if isinstance(moved, torch.Tensor) and tuple(moved.shape) == tuple(out_shape):
                return replace(param, shape=tuple(out_shape), index=moved)
            return _Derived((param.name,))
        constant = next((v for v in args[1:] if isinstance(v, (int, float))), None)
        if name in ("add", "sub", "rsub") and constant is not None and param.offset == 0.0:
            sign = -1.0 if name == "sub" or name == "rsub" else 1.0
            return replace(param, offset=sign * float(constant))  # |c - w| = |w - c|
        return _Derived((param.name,))

    def _read(self, name: str) -> np.ndarray:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise self._error(f"parameter {name!r} is not in the model")
        if self.deferred is not None:
            return self.deferred(name)
        return weight_array(tensor, f"parameter {name!r}")

    def _effective(self, raw: np.ndarray, source: WeightSource, label: str) -> np.ndarray:
        """A block's weight from its parameter's values (:func:`effective_weight`); with
        deferred weights, a zero-stride placeholder of its shape (no memory): the weights are
        read afterwards, block by block, through the ``source`` recorded with it."""
        if self.deferred is None:
            return effective_weight(raw, source, self._read, label)
        return deferred_placeholder(raw.shape, source, label)

    def _sole_user(self, node: fx.Node | None) -> bool:
        if node is None:
            return False
        sources = [a for a in node.all_input_nodes if isinstance(self.env.get(a), _Units)]
        return all(len(a.users) == 1 for a in sources)

    def _concrete(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._concrete(v) for v in value)
        if isinstance(value, (_Units, _Param, _Other)):
            raise self._error(
                f"{self._describe(self.node)} takes a computed tensor as a shape argument"
            )
        return value

    def _tuple_of(self, node: fx.Node, item: Any) -> Any:
        value = node.meta.get("val")
        if isinstance(value, (tuple, list)):
            return tuple(item for _ in value)
        return item

    def _module_path(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return ""
        return str(list(stack.values())[-1][0])

    def _describe(self, node: fx.Node | None) -> str:
        if node is None:
            return "an operation"
        stack = node.meta.get("nn_module_stack")
        where = ""
        if stack:
            path, kind = list(stack.values())[-1]
            kind_name = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1]
            where = f" inside {path!r} ({kind_name})" if path else ""
        return f"{_base_name(node.target)} (fx node {node.name!r}{where})"

    def _error(self, message: str) -> GraphError:
        return GraphError(f"The weight graph cannot follow {message}; {_CHAIN_HINT}.")
