"""The normalised cut of a partition (Filan et al. 2021, section 2).

The n-cut of a partition into clusters ``C_1..C_k`` is ``sum_c cut(C_c, rest) / vol(C_c)`` with
``vol(C) = sum of the degrees of C's nodes``; lower means more clusterable. ``cut(C) = vol(C) -
assoc(C, C)``, so the n-cuts of many candidate partitions at once come from one product of each
weight block with their one-hot labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.edges import GraphEdges, dense_within, graph_edges
from cluster_tracking.graph.remote import RemotePiece
from cluster_tracking.graph.types import WeightGraph
from cluster_tracking.spectral.adjacency import _as_csr, _checked_labels, _unassembled


def ncut(graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray, labels: np.ndarray) -> float:
    """Normalised cut of a partition: ``sum over clusters C of cut(C, rest) / vol(C)``.

    Args:
        graph: a :class:`~cluster_tracking.graph.types.WeightGraph` or a symmetric adjacency matrix.
        labels: cluster of every node, in node order (shape ``[n_nodes]``, integers). Nodes
            labelled ``-1`` belong to no cluster; they must have zero degree.

    Returns:
        The n-cut, between 0 (no edge between clusters) and the number of clusters. A cluster of
        zero volume contributes nothing.
    """
    if _unassembled(graph):
        assert isinstance(graph, WeightGraph)
        labels = _checked_labels(labels, graph.n_nodes)
        edges = graph_edges(graph)
        if np.any(labels[edges.active] < 0):
            raise ConfigError(
                "labels leaves a node with edges unclustered (-1); only zero-degree nodes may "
                "be -1."
            )
        active = labels[edges.active]
        if not active.size:
            return 0.0
        compact = np.unique(active, return_inverse=True)[1].astype(np.int64)
        n_clusters = int(compact.max()) + 1
        volumes, within = _cluster_weights(edges, compact[None, :], n_clusters, np.float64)
        cut = np.maximum(volumes - within, 0.0)
        return float(np.divide(cut, volumes, out=np.zeros_like(cut), where=volumes > 0).sum())
    adjacency = _as_csr(graph)
    labels = _checked_labels(labels, adjacency.shape[0])
    clustered = labels >= 0
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    if np.any(degrees[~clustered] > 0):
        raise ConfigError(
            "labels leaves a node with edges unclustered (-1); only zero-degree nodes may be -1."
        )
    if not clustered.any():
        return 0.0
    compact = np.full(labels.shape[0], -1, dtype=np.int64)
    compact[clustered] = np.unique(labels[clustered], return_inverse=True)[1]
    n_clusters = int(compact.max()) + 1
    volumes, within = _within_cluster(adjacency, compact, n_clusters)
    loops = adjacency.diagonal()  # a self-loop is inside its cluster but never counted as kept
    within -= np.bincount(compact[clustered], weights=loops[clustered], minlength=n_clusters)
    cut = np.maximum(volumes - within, 0.0)
    return float(np.divide(cut, volumes, out=np.zeros_like(cut), where=volumes > 0).sum())


def _ncuts_of_pieces(edges: GraphEdges, labels: np.ndarray, k: int, dtype: Any) -> np.ndarray:
    """n-cut of each row of ``labels`` (shape ``[R, n_active]``, values in ``0..k-1``): ``[R]``.

    ``cut(C) = vol(C) - assoc(C, C)``, so ``ncut = sum_C (vol(C) - assoc(C, C)) / vol(C)``
    (:func:`_cluster_weights` gives the volumes and associations).
    """
    n_restarts = labels.shape[0]
    volumes, within = _cluster_weights(edges, labels, k, dtype)
    cut = np.maximum(volumes - within, 0.0)
    terms = np.divide(cut, volumes, out=np.zeros_like(cut), where=volumes > 0)
    return terms.reshape(n_restarts, k).sum(axis=1)


def _cluster_weights(
    edges: GraphEdges, labels: np.ndarray, k: int, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``(vol, assoc)`` of every cluster of every row of ``labels`` (``[R, n_active]``, values
    in ``0..k-1``), both ``[R * k]`` (row r's cluster c at ``r * k + c``).

    ``assoc(C, C) = sum of A[i, j] over i, j in C`` (each edge twice). For a dense piece W, the
    within-cluster weight of every restart at once is one product ``onehot(row labels)^T W``
    (``[R * k, columns]``: each column of W summed by the clusters of its rows, in every restart),
    read at each column's own cluster. The one-hot matrix is sparse (R ones per row of W), so the
    product costs ``R`` passes over W where a dense one would cost ``R * k``; ``dtype=float32``
    halves it again where the values only rank the restarts. A large piece held in another dtype
    is read in row chunks (:meth:`EdgePiece.row_chunks`).
    """
    n_restarts = labels.shape[0]
    flat = labels + k * np.arange(n_restarts)[:, None]  # cluster ids unique across restarts
    n_flat = n_restarts * k
    volumes = np.bincount(
        flat.ravel(), weights=np.broadcast_to(edges.degrees, flat.shape).ravel(), minlength=n_flat
    )
    within = np.zeros(n_flat)
    pending: list[tuple[float, Any]] = []  # pieces on Dask workers: sent at once, added in order
    for piece in edges.pieces:
        factor = 1.0 if piece.symmetric else 2.0
        row_ids = flat[:, piece.rows]  # [R, m]
        col_ids = flat[:, piece.cols]  # [R, c]
        if isinstance(piece, RemotePiece):
            pending.append((factor, piece.submit("within", (row_ids, col_ids, n_flat), dtype)))
            continue
        if piece.dense:
            within += factor * dense_within(piece, row_ids, col_ids, n_flat, dtype)
            continue
        i, j, w = piece.edge_list()
        for r in range(n_restarts):
            source = row_ids[r, i]
            same = source == col_ids[r, j]
            within += factor * np.bincount(source[same], weights=w[same], minlength=n_flat)
    for factor, future in pending:
        within += factor * future.result()
    return volumes, within


def _within_cluster(
    adjacency: sp.csr_array, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(volume, assoc)`` of clusters ``0..k-1`` (``-1`` nodes ignored), from the CSR directly:
    ``A @ onehot(labels)`` is ``[n, k]``, so no copy of the edges is made."""
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    clustered = labels >= 0
    nodes = np.flatnonzero(clustered)
    volumes = np.bincount(labels[clustered], weights=degrees[clustered], minlength=k)
    one_hot = sp.csr_array(
        (np.ones(nodes.size), (nodes, labels[clustered])), shape=(adjacency.shape[0], k)
    )
    to_cluster = sp.csr_array(adjacency @ one_hot).toarray()  # [n, k]
    own = to_cluster[nodes, labels[clustered]]
    within = np.bincount(labels[clustered], weights=own, minlength=k)
    return volumes, within


def cluster_cuts(
    graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(cut, volume)`` of each cluster ``0..k-1`` of a labelling (``-1`` nodes ignored)."""
    if _unassembled(graph):
        assert isinstance(graph, WeightGraph)
        labels = _checked_labels(labels, graph.n_nodes)
        edges = graph_edges(graph)
        active = labels[edges.active]
        if np.any(active < 0):
            raise ConfigError("labels leaves a node with edges unclustered (-1).")
        volumes, within = _cluster_weights(edges, active[None, :], k, np.float64)
        return np.maximum(volumes - within, 0.0), volumes
    adjacency = _as_csr(graph)
    volumes, within = _within_cluster(adjacency, np.asarray(labels), k)
    return np.maximum(volumes - within, 0.0), volumes
