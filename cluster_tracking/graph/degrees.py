"""Degrees of a block-built weight graph, summed block by block without the adjacency.

The block sums here (row and column sums in float64 chunks, grouped-convolution kernel slices,
self-loops left out) are what :attr:`WeightGraph.degrees` and the edge pieces of the eigensolver
(:mod:`cluster_tracking.graph.edges`) both use, so the two can never disagree. Numpy and scipy
only: no torch, and nothing of the graph types at run time (they import this module).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from cluster_tracking.errors import GraphError
from cluster_tracking.resources.chunks import CHUNK_ENTRIES

if TYPE_CHECKING:
    from cluster_tracking.graph.types import EdgeBlock, KernelNorm


def _kernel_slice_norms(magnitude: np.ndarray, norm: KernelNorm) -> np.ndarray:
    """Norm of each kernel slice ``|W[b, a, ...]|`` -> ``[out, in / groups]``."""
    n_out, n_in = magnitude.shape[:2]
    slices = magnitude.reshape(n_out, n_in, *magnitude.shape[2:])
    spatial_axes = tuple(range(2, slices.ndim))
    if norm == "l1":
        return slices.sum(axis=spatial_axes) if spatial_axes else slices
    if norm == "l2":
        return np.sqrt((slices**2).sum(axis=spatial_axes)) if spatial_axes else slices
    # "l1_induced": numpy's matrix 1-norm of the 2-D slice (largest column sum), as in the
    # published code of Filan et al.; a 1-D or 3-D kernel slice falls back to its vector 1-norm.
    if slices.ndim == 4:
        return slices.sum(axis=2).max(axis=2)
    return slices.sum(axis=spatial_axes) if spatial_axes else slices


def _refuse_placeholders(blocks: Sequence[EdgeBlock]) -> None:
    """Refuse blocks whose weights are not in this process (a remote graph's placeholders)."""
    if any(block.weight.size == 0 and len(block.src) and len(block.dst) for block in blocks):
        raise GraphError(
            "this graph's weight blocks are not in this process (their weights stay on Dask "
            "workers); compute on the graph itself (spectral_partitions, ncut, measure), which "
            "runs its products on the workers."
        )


def block_degrees(blocks: Sequence[EdgeBlock], n_nodes: int) -> np.ndarray:
    """Weighted degree of every node of the graph made of ``blocks`` (self-loops left out, as
    in the adjacency), shape ``[n_nodes]``, summed block by block without the adjacency."""
    _refuse_placeholders(blocks)
    degrees = np.zeros(n_nodes)
    for block in blocks:
        rows, cols, weights = block.dst, block.src, _block_weights(block)
        if np.intersect1d(rows, cols).size:
            weights = _drop_self_loops(rows, cols, weights)
        row_sums, col_sums = _row_col_sums(weights)
        _add_at(degrees, rows, row_sums)
        _add_at(degrees, cols, col_sums)
    return degrees


def _row_col_sums(weights: np.ndarray | sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """Row and column sums of a block's ``[out, in]`` edge weights, in float64.

    A dense block is summed in row chunks of :data:`CHUNK_ENTRIES` entries cast to float64, so
    the sums depend on its shape and values only, not on the dtype it is held in (float64 from
    a model, float32 from the bounded-memory reader), and no whole float64 copy is made.
    """
    if not isinstance(weights, np.ndarray):
        return np.asarray(weights.sum(axis=1)).ravel(), np.asarray(weights.sum(axis=0)).ravel()
    n_rows, n_cols = weights.shape
    step = max(1, CHUNK_ENTRIES // max(1, n_cols))
    row_sums = np.empty(n_rows)
    col_sums = np.zeros(n_cols)
    for start in range(0, n_rows, step):
        chunk = np.asarray(weights[start : start + step], dtype=np.float64)
        row_sums[start : start + step] = chunk.sum(axis=1)
        col_sums += chunk.sum(axis=0)
    return row_sums, col_sums


def _block_weights(block: EdgeBlock) -> np.ndarray | sp.csr_array:
    """The block's ``[out, in]`` edge weights: dense, or CSR for a grouped convolution."""
    if block.kind == "conv" and block.groups > 1:
        rows, cols = block.group_pattern()
        per_slice = _kernel_slice_norms(np.abs(block.weight), block.norm)
        return sp.csr_array(
            (per_slice.ravel(), (rows.ravel(), cols.ravel())),
            shape=(len(block.dst), len(block.src)),
        )
    return block.edge_weights()


def _drop_self_loops(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray | sp.csr_array
) -> np.ndarray | sp.csr_array:
    """``weights`` with the entries joining a node to itself set to zero."""
    i, j = np.nonzero(rows[:, None] == cols[None, :])
    if isinstance(weights, np.ndarray):
        weights = weights.copy()
        weights[i, j] = 0.0
        return weights
    lil = sp.lil_array(weights)
    lil[i, j] = 0.0
    return sp.csr_array(lil)


def _add_at(out: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """``out[index] += values`` where ``index`` may repeat."""
    out += np.bincount(index, weights=values, minlength=out.shape[0])
