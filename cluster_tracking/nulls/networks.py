"""Shuffled null networks: a graph's weight blocks shuffled, and their n-cuts.

A null network keeps the graph's topology (its blocks and node order) and shuffles each weight
tensor separately (:mod:`cluster_tracking.nulls.shuffles`). In every shuffle a dead (zero-degree)
unit stays dead: only entries joining two live nodes move (:func:`live_masks`), which is the
published code's deletion of zero-degree nodes before shuffling. Under ``preset="filan2021"`` a
convolution is shuffled as its matrix of channel norms, as published.

Null network i draws from the stream keyed ``(1, i)`` under the measurement's seed and is
partitioned with the streams keyed ``(2, i, ...)``, so its numbers do not depend on which process
computes it. Needs no torch: worker processes that run it start fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from cluster_tracking.config import check_preset
from cluster_tracking.graph.types import EdgeBlock
from cluster_tracking.nulls.shuffles import shuffle_weights
from cluster_tracking.spectral.partition import block_ncuts, child_seed


def null_blocks(
    blocks: Sequence[EdgeBlock],
    n_nodes: int,
    method: str,
    rng: np.random.Generator,
    preset: str = "default",
    *,
    prepared: tuple[list[EdgeBlock], list[np.ndarray | None]] | None = None,
) -> list[EdgeBlock]:
    """The weight blocks of one shuffled null network.

    Zero-degree nodes stay zero-degree: only entries joining two live nodes are shuffled
    (:func:`live_masks`). Under ``preset="filan2021"`` a convolution is shuffled as its
    ``[out, in]`` matrix of channel norms (the published code shuffles the matrices that
    ``extract_cnn_weights_filters_as_units`` returns), so its null block is a ``linear`` block
    of those norms; under ``default`` its kernel entries are shuffled and the norms taken after.
    ``prepared``: what :func:`prepare_null_blocks` returned for these blocks (it is the same for
    every null network of a graph).
    """
    blocks, masks = prepared or prepare_null_blocks(blocks, n_nodes, preset)
    shuffled = shuffle_weights(
        [block.weight for block in blocks], method, rng, live=masks, preset=preset
    )
    return [replace(block, weight=weight) for block, weight in zip(blocks, shuffled, strict=True)]


def prepare_null_blocks(
    blocks: Sequence[EdgeBlock], n_nodes: int, preset: str = "default"
) -> tuple[list[EdgeBlock], list[np.ndarray | None]]:
    """The blocks a preset shuffles (under ``filan2021``, convolutions as channel-norm blocks)
    and their :func:`live_masks`."""
    if check_preset(preset) == "filan2021":
        blocks = [_as_channel_norm_block(block) for block in blocks]
    return list(blocks), live_masks(blocks, n_nodes)


def _as_channel_norm_block(block: EdgeBlock) -> EdgeBlock:
    """A convolution as the ``linear`` block of its ``[out, in]`` channel norms (a grouped one
    with zeros between groups, as the published code's ``depthwise_conv_to_conv`` makes it)."""
    if block.kind != "conv":
        return block
    return replace(block, kind="linear", weight=block.edge_weights(), groups=1, norm="l1")


def node_degrees(blocks: Sequence[EdgeBlock], n_nodes: int) -> np.ndarray:
    """Weighted degree of every node of the graph made of ``blocks`` (self-loops left out, as in
    the adjacency), shape ``[n_nodes]``."""
    degrees = np.zeros(n_nodes)
    for block in blocks:
        edges = block.edge_weights()  # [out, in]
        loops = block.dst[:, None] == block.src[None, :]
        if loops.any():
            edges = np.where(loops, 0.0, edges)
        degrees += np.bincount(block.dst, weights=edges.sum(axis=1), minlength=n_nodes)
        degrees += np.bincount(block.src, weights=edges.sum(axis=0), minlength=n_nodes)
    return degrees


def live_masks(blocks: Sequence[EdgeBlock], n_nodes: int) -> list[np.ndarray | None]:
    """For each block, the entries of its weight tensor that join two nodes of non-zero degree
    (bool, the tensor's shape), or ``None`` when all of them do.

    An entry of a dead (zero-degree) unit is zero; keeping these entries out of the shuffle is
    the published code's ``delete_isolated_ccs`` *before* shuffling: a dead input pixel stays
    dead in every null network.
    """
    active = node_degrees(blocks, n_nodes) > 0
    masks: list[np.ndarray | None] = []
    for block in blocks:
        out_live, in_live = active[block.dst], active[block.src]
        if out_live.all() and in_live.all():
            masks.append(None)
            continue
        weight = block.weight
        if block.kind == "linear":
            live = out_live[:, None] & in_live[None, :]
        elif block.kind == "flatten":
            per_channel = weight.shape[1] // len(block.src)
            live = out_live[:, None] & np.repeat(in_live, per_channel)[None, :]
        else:  # conv [out, in / groups, *kernel]: a slice is live when both its channels are
            if block.groups > 1:
                rows, cols = block.group_pattern()
                slices = out_live[rows] & in_live[cols]
            else:
                slices = out_live[:, None] & in_live[None, :]
            live = np.broadcast_to(
                slices.reshape(*slices.shape, *([1] * (weight.ndim - 2))), weight.shape
            )
        masks.append(np.ascontiguousarray(live))
    return masks


def shuffled_ncuts(
    indices: Sequence[int],
    blocks: Sequence[EdgeBlock],
    n_nodes: int,
    node_layer: np.ndarray,
    method: str,
    ks: Sequence[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str = "default",
) -> list[np.ndarray]:
    """n-cuts at every k of the shuffled null networks ``indices``: one ``[len(ks)]`` row each.

    Null network i shuffles the graph's weight blocks (:func:`null_blocks`) with the stream
    keyed ``(1, i)`` under ``root`` and is partitioned with the streams keyed ``(2, i, ...)``,
    so its numbers do not depend on which process computes it. Under ``default`` a shuffled
    network is partitioned straight from its weight blocks, without assembling a sparse
    adjacency (the same numbers as ``spectral_partitions(graph.with_weights(shuffled))`` gives,
    n-cut only); under ``filan2021`` by scikit-learn, as the observed network is. Needs no
    torch: worker processes that run it start fast.
    """
    rows = []
    prepared = prepare_null_blocks(blocks, n_nodes, preset)
    for index in indices:
        rng = np.random.default_rng(child_seed(root, 1, index))
        shuffled = null_blocks(blocks, n_nodes, method, rng, preset, prepared=prepared)
        ncuts = block_ncuts(
            shuffled,
            n_nodes,
            node_layer,
            ks,
            seed=child_seed(root, 2, index),
            n_init=n_init,
            preset=preset,
        )
        rows.append(np.array(ncuts))
    return rows
