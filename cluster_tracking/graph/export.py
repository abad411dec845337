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

import contextlib
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.build import _BlockSpec, _Builder, _Feat
from cluster_tracking.graph.types import BlockKind, WeightSource
from cluster_tracking.graph.weights import batchnorm_scale, effective_weight, weight_array

__all__ = ["ExportWalker", "example_inputs_for"]

_CHAIN_HINT = (
    "pass layers=[...] naming the Linear/Conv modules to use, in data-flow order, to build the "
    "graph from them as a chain without tracing"
)
_EXPORT_HINT = (
    "pass example_inputs=(tensor, ...) with a small input the model accepts, or " + _CHAIN_HINT
)


@dataclass(frozen=True)
class _Scale:
    """A parameter multiplied into an activation, waiting to fold into the layers that read it:
    ``index`` maps every element of the activation (broadcast, like a unit map, and moved with
    it) to the element of ``parameter`` that scales it, by ``|offset + parameter[index]|``."""

    parameter: str
    index: torch.Tensor
    offset: float = 0.0


@dataclass
class _Units:
    """An activation computed from the model input: its unit map and what may fold into it."""

    ids: torch.Tensor | None  # None: a model input no weight layer has read yet
    shape: tuple[int, ...]
    origin: str
    placeholder: str | None = None
    scales: tuple[_Scale, ...] = ()
    spec: _BlockSpec | None = None  # the weight layer whose raw output this is
    spec_axis: int = -1


@dataclass(frozen=True)
class _Param:
    """A parameter of the model on its way to an op: transposed (a 2-D weight), or moved
    (reshaped, sliced, expanded: ``index`` maps each element to the parameter's element), or
    shifted by a constant (``offset + parameter``, Gemma's ``1 + weight``)."""

    name: str
    shape: tuple[int, ...]
    transposed: bool = False
    index: torch.Tensor | None = None
    offset: float = 0.0

    @property
    def plain(self) -> bool:
        return self.index is None and self.offset == 0.0

    def element_index(self) -> torch.Tensor:
        if self.index is not None:
            return self.index
        size = int(np.prod(self.shape)) if self.shape else 1
        return torch.arange(size).reshape(self.shape or (1,))


@dataclass(frozen=True)
class _Derived:
    """A value computed from parameters in a way the graph does not follow (a norm of a weight,
    an interpolated position embedding): added to an activation it is a bias, but it can be
    neither a weight nor a per-unit scale."""

    names: tuple[str, ...]


class _Other:
    """Anything else: constants, masks, attention scores, statistics, sizes."""


_OTHER = _Other()

# ATen ops by their base name.
_MOVES = frozenset(
    "view _unsafe_view reshape permute transpose t unsqueeze squeeze expand slice select split "
    "split_with_sizes chunk unbind narrow flip roll repeat flatten unflatten movedim swapaxes "
    "pixel_shuffle pixel_unshuffle channel_shuffle constant_pad_nd unfold diagonal "
    "squeeze_copy unsqueeze_copy view_copy permute_copy transpose_copy expand_copy "
    "slice_copy select_copy split_copy alias_copy".split()
)
_IDENTITIES = frozenset(
    "alias clone contiguous detach _to_copy to lift_fresh_copy type_as dropout feature_dropout "
    "alpha_dropout feature_alpha_dropout _assert_tensor_metadata".split()
)
# Activations ATen does not tag as pointwise (each keeps units apart).
_ACTIVATIONS = frozenset(
    "hardswish hardsigmoid hardtanh relu6 gelu silu mish elu selu celu leaky_relu softplus "
    "softshrink hardshrink tanhshrink threshold log_sigmoid log_sigmoid_forward prelu "
    "_prelu_kernel rrelu".split()
)
_CHANNEL_NORMALISATIONS = frozenset("softmax _softmax log_softmax _log_softmax".split())
_REDUCTIONS = frozenset(
    "sum mean amax amin max min var std var_mean std_mean norm linalg_vector_norm logsumexp prod "
    "nansum nanmean".split()
)
_SPATIAL = frozenset(
    "max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d "
    "avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
    "_adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d "
    "adaptive_max_pool3d upsample_nearest1d upsample_nearest2d upsample_nearest3d "
    "upsample_bilinear2d upsample_bicubic2d upsample_linear1d upsample_trilinear3d "
    "_upsample_nearest_exact2d reflection_pad1d reflection_pad2d reflection_pad3d "
    "replication_pad1d replication_pad2d replication_pad3d".split()
)
_PASS_NORMALISATIONS = frozenset(
    "group_norm native_group_norm instance_norm local_response_norm".split()
)
_NOT_UNITS = frozenset(
    "sym_size sym_numel sym_stride size arange zeros ones full empty zeros_like ones_like "
    "full_like empty_like rand_like randn_like new_zeros new_ones new_full new_empty scalar_tensor "
    "argmax argmin eq ne lt le gt ge logical_not logical_and logical_or isnan isinf any all "
    "_assert_scalar sym_constrain_range_for_size _assert_async".split()
)
_CONVOLUTIONS = frozenset("conv1d conv2d conv3d convolution _convolution".split())
_TRANSPOSED_CONVOLUTIONS = frozenset("conv_transpose1d conv_transpose2d conv_transpose3d".split())
_ATTENTION = frozenset(
    "scaled_dot_product_attention _scaled_dot_product_attention_math "
    "_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention "
    "_scaled_dot_product_flash_attention".split()
)
_RECURRENT_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _base_name(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return str(schema.name).split("::")[-1]
    return str(getattr(target, "__name__", target))


def _is_pointwise(target: Any) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


def _compress(ids: torch.Tensor) -> torch.Tensor:
    """The unit map with every dim along which the ids do not change kept at size 1."""
    for dim in range(ids.ndim):
        if ids.shape[dim] > 1:
            first = ids.narrow(dim, 0, 1)
            if torch.equal(ids, first.expand_as(ids)):
                ids = first
    return ids.contiguous()


def _varying(ids: torch.Tensor) -> set[int]:
    return {dim for dim in range(ids.ndim) if ids.shape[dim] > 1}


def _along(nodes: np.ndarray, ndim: int, axis: int) -> torch.Tensor:
    """A unit map holding ``nodes`` along ``axis`` of a rank-``ndim`` activation."""
    shape = [1] * ndim
    shape[axis] = len(nodes)
    return torch.as_tensor(nodes, dtype=torch.int64).reshape(shape)


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(size) for size in shape)
    except (TypeError, ValueError):
        return None


class ExportWalker:
    """Runs a model's ``torch.export`` graph on unit maps, filling ``builder``.

    Args:
        model: the network (already unwrapped).
        builder: the provisional graph to fill.
        args, kwargs: example inputs (their values do not matter, only their shapes and dtypes).
        include_embeddings: add embedding tables (and the LM head) as weight blocks.
        skip: names of parameters whose layers are left out (the LM head of a Hugging Face
            model when embeddings are not included).
    """

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

    # -- running -------------------------------------------------------------------------------

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
            reason = " ".join((str(error).strip().splitlines() or [""])[0].split())[:300]
            raise GraphError(
                f"torch.export cannot trace {type(self.model).__name__} with the example inputs "
                f"({type(error).__name__}: {reason}). The weight graph follows the model's data "
                f"flow by exporting it; {_EXPORT_HINT}."
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

    # -- dispatch ------------------------------------------------------------------------------

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

    # -- parameters ----------------------------------------------------------------------------

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
        return weight_array(tensor, f"parameter {name!r}")

    # -- weight layers -------------------------------------------------------------------------

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
        input_scales = self._input_scales(node, x, axis, order)
        source = WeightSource(
            param.name,
            transposed=transposed,
            columns=order,
            input_scales=input_scales,
        )
        weight = effective_weight(raw, source, self._read, param.name)
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
            effective_weight(raw, source, self._read, module),
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
                weight_ih = effective_weight(
                    self._read(w_ih.name), source_ih, self._read, w_ih.name
                )
                name_ih = w_ih.name.removesuffix(".weight_ih_l" + w_ih.name.rsplit("_l", 1)[-1])
                label = f"{name_ih}.l{layer}" + ("_reverse" if direction else "")
                spec = self.builder.add_block(label, "linear", weight_ih, inputs, source=source_ih)
                source_hh = WeightSource(w_hh.name, gates=gates)
                weight_hh = effective_weight(
                    self._read(w_hh.name), source_hh, self._read, w_hh.name
                )
                self.builder.add_block(
                    f"{label}.hh", "linear", weight_hh, spec.dst, source=source_hh, dst=spec.dst
                )
                outputs.append(spec.dst)
            inputs = np.concatenate(outputs)
        ids = _along(inputs, len(out_shape), len(out_shape) - 1)
        result = _Units(ids, out_shape, f"{self._describe(node)}")
        return (result,) + (_OTHER,) * (len(value) - 1 if isinstance(value, (tuple, list)) else 0)

    # -- normalisations and scales --------------------------------------------------------------

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

    # -- products between activations -----------------------------------------------------------

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

    # -- data movement ---------------------------------------------------------------------------

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

    # -- elementwise -----------------------------------------------------------------------------

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

    # -- the model input -------------------------------------------------------------------------

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

    # -- helpers ---------------------------------------------------------------------------------

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


def _same_scales(units: list[_Units]) -> bool:
    """Whether every operand carries the same pending scales (a normalised tensor with itself);
    otherwise an elementwise op between them (a residual add) leaves them unfolded."""
    first = units[0].scales
    return all(
        len(u.scales) == len(first)
        and all(
            a.parameter == b.parameter and a.offset == b.offset and torch.equal(a.index, b.index)
            for a, b in zip(u.scales, first, strict=True)
        )
        for u in units[1:]
    )


def _first_of(value: Any, result: Any) -> Any:
    """``result`` where the op returns one tensor, or the first of its outputs (the rest carry
    no units: statistics, indices)."""
    if isinstance(value, (tuple, list)):
        return (result,) + (_OTHER,) * (len(value) - 1)
    return result


def _vector(values: np.ndarray, length: int) -> np.ndarray:
    """``values`` as a vector of ``length`` (a single broadcast value repeated)."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    return np.repeat(values, length) if len(values) == 1 and length > 1 else values


def _broadcast_to(ids: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    while ids.ndim < len(shape):
        ids = ids.unsqueeze(0)
    return ids.expand(shape)


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging
    import warnings

    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Example inputs
# ---------------------------------------------------------------------------------------------


def is_hugging_face(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (duck-typed: transformers stays
    optional)."""
    return (
        hasattr(model, "config")
        and hasattr(model, "main_input_name")
        and callable(getattr(model, "get_input_embeddings", None))
    )


def example_inputs_for(model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Small example inputs for a model whose input is known without the user saying it: a
    Hugging Face model (from its config) or a timm model (its ``pretrained_cfg`` input size).
    ``None`` when there is no way to know."""
    device = _device_of(model)
    if is_hugging_face(model):
        return (), _hugging_face_inputs(model, device)
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(config, Mapping) and isinstance(config.get("input_size"), (tuple, list)):
        size = tuple(int(s) for s in config["input_size"])
        return (torch.zeros((1, *size), device=device, dtype=_float_dtype_of(model)),), {}
    return None


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's weights are (example inputs go there too)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _float_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (a bf16 model takes bf16 images)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _hugging_face_inputs(model: nn.Module, device: torch.device) -> dict[str, Any]:
    import inspect

    floats: dict[str, Any] = {"device": device, "dtype": _float_dtype_of(model)}
    config: Any = model.config
    main = str(getattr(model, "main_input_name", "input_ids"))
    parameters = inspect.signature(model.forward).parameters
    inputs: dict[str, Any] = {}
    tokens = 8
    if main == "input_ids":
        vocabulary = int(getattr(config, "vocab_size", 32) or 32)
        ids = torch.arange(tokens, device=device) % max(vocabulary - 1, 1)
        inputs[main] = ids.reshape(1, tokens) + 1
    elif main == "pixel_values":
        channels = int(getattr(config, "num_channels", 3) or 3)
        size = getattr(config, "image_size", 32)
        if isinstance(size, (list, tuple)):
            height, width = int(size[0]), int(size[-1])
        else:
            height = width = int(size or 32)
        inputs[main] = torch.zeros(1, channels, height, width, **floats)
    elif main == "input_features":
        mels = int(getattr(config, "num_mel_bins", 80) or 80)
        frames = 2 * int(getattr(config, "max_source_positions", 1500) or 1500)
        inputs[main] = torch.zeros(1, mels, frames, **floats)
    elif main == "input_values":
        inputs[main] = torch.zeros(1, 16000, **floats)
    else:
        raise GraphError(
            f"{type(model).__name__} takes {main!r} as its main input, for which the weight graph "
            f"has no example; {_EXPORT_HINT}."
        )
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        start = int(getattr(config, "decoder_start_token_id", 0) or 0)
        inputs["decoder_input_ids"] = torch.full((1, 4), start, dtype=torch.long, device=device)
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    return inputs


def lm_head_parameters(model: nn.Module) -> frozenset[str]:
    """The parameter names of a Hugging Face model's output embeddings (its LM head)."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return frozenset()
    try:
        head = get()
    except (AttributeError, NotImplementedError, TypeError):
        return frozenset()
    if not isinstance(head, nn.Module):
        return frozenset()
    ids = {id(p) for p in head.parameters()}
    return frozenset(
        name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in ids
    )
