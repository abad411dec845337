"""The public node numbering of a weight graph: layer by layer from the input, by index inside a
layer, each class of identified nodes (joined by residual adds) held by its earliest member.

Numpy only; :meth:`~cluster_tracking.graph.build._Builder.finish` numbers its provisional node ids
with :func:`number_nodes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NodeNumbering:
    """Final node numbers of provisional node ids.

    Attributes:
        final: final node number of every provisional id, ``-1`` for a node no kept layer holds.
        holder_key: ``layer * stride + index`` of the node holding each provisional id's class.
        stride: the key's stride between layers (the widest layer's width plus one).
        final_widths: number of final nodes each layer holds.
    """

    final: np.ndarray
    holder_key: np.ndarray
    stride: int
    final_widths: np.ndarray


def number_nodes(
    starts: Sequence[int], widths: Sequence[int], roots: np.ndarray, kept: np.ndarray
) -> NodeNumbering:
    """Number the provisional ids of layers (first id ``starts[i]``, ``widths[i]`` ids each, in
    the public layer order), given the union-find root of every id (``roots``) and which layers
    are kept (``kept``, bool per layer)."""
    n_provisional = len(roots)
    layer_of = np.empty(n_provisional, dtype=np.int64)
    index = np.empty(n_provisional, dtype=np.int64)
    for rank, (start, width) in enumerate(zip(starts, widths, strict=True)):
        layer_of[start : start + width] = rank
        index[start : start + width] = np.arange(width)

    # Every class of identified nodes is held by its earliest (kept) member: the one with the
    # smallest (layer, index) key. Final node numbers follow these keys, so nodes come layer
    # by layer and by index inside a layer.
    stride = max(widths) + 1
    no_holder = len(widths) * stride
    keys = np.where(kept[layer_of], layer_of * stride + index, no_holder)
    class_key = np.full(n_provisional, no_holder, dtype=np.int64)
    np.minimum.at(class_key, roots, keys)
    holder_key = class_key[roots]
    alive = holder_key < no_holder
    unique_keys = np.unique(holder_key[alive])
    final = np.full(n_provisional, -1, dtype=np.int64)
    final[alive] = np.searchsorted(unique_keys, holder_key[alive])
    final_widths = np.bincount(unique_keys // stride, minlength=len(widths))
    return NodeNumbering(final, holder_key, stride, final_widths)
