"""What the ``torch.export`` walker carries through a model's graph: unit maps, parameters and the
values the graph cannot fold, and the ATen op tables its rules dispatch on.

A unit map (:class:`_Units`) is an integer tensor of the same rank as the activation, holding the
provisional node id of every element (``-1``: no unit); a dim along which the ids do not change is
kept at size 1 (broadcast). See :mod:`~cluster_tracking.graph.export` for the rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cluster_tracking.graph.build import _BlockSpec

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
