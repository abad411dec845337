"""A weight graph or a symmetric adjacency as the edge pieces the eigensolver and the n-cut use.

A :class:`~cluster_tracking.graph.types.WeightGraph` is used through its weight blocks when they
make its adjacency (cheaper products than a sparse matrix); an adjacency matrix becomes the cross
block of a bipartite graph (:func:`bipartition`), or the whole matrix. Labels and adjacencies are
validated here, where they enter.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph.edges import EdgePiece, GraphEdges, graph_edges
from cluster_tracking.graph.types import WeightGraph

#: A piece of the graph at most this many entries large and at least a fifth full is held dense.
DENSE_MAX_ENTRIES = 1 << 24


def _checked_labels(labels: np.ndarray, n_nodes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n_nodes:
        raise ConfigError(
            f"labels has shape {labels.shape} but the graph has {n_nodes} nodes; "
            "pass one label per node, in node order."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError("labels must be integers (cluster ids, -1 for unclustered nodes).")
    return labels


def _unassembled(graph: object) -> bool:
    """A :class:`WeightGraph` without its sparse adjacency (see ``WeightGraph.assembled``)."""
    return isinstance(graph, WeightGraph) and not graph.assembled and bool(graph.blocks)


def _edges_of(graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray) -> GraphEdges:
    """The graph's edge pieces: a WeightGraph's weight blocks when they make its adjacency
    (cheaper products than a sparse matrix), else its adjacency."""
    if isinstance(graph, WeightGraph) and graph.blocks:
        edges = graph_edges(graph)
        if not graph.assembled:
            return edges
        degrees = graph.degrees
        full = np.zeros(graph.n_nodes)
        full[edges.active] = edges.degrees
        if np.allclose(full, degrees, rtol=1e-9, atol=1e-12 * max(1.0, float(degrees.max()))):
            return edges
    adjacency = _as_csr(graph)
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    connected = degrees > 0
    if connected.all():
        return _edges_from_adjacency(adjacency, degrees)
    active = adjacency[connected][:, connected]
    edges = _edges_from_adjacency(sp.csr_array(active), degrees[connected])
    edges.n_nodes = adjacency.shape[0]
    edges.active = connected
    return edges


def _edges_from_adjacency(adjacency: sp.csr_array, degrees: np.ndarray) -> GraphEdges:
    """Pieces of a symmetric adjacency without zero-degree nodes: for a bipartite graph its cross
    block (dense when mostly full), else the whole matrix."""
    n = adjacency.shape[0]
    sides = bipartition(adjacency)
    if sides is None:
        nodes = np.arange(n)
        pieces = [EdgePiece(nodes, nodes, _maybe_dense(adjacency), symmetric=True)]
    else:
        first, second = np.flatnonzero(~sides), np.flatnonzero(sides)
        cross = sp.csr_array(adjacency[first][:, second])
        pieces = [EdgePiece(first, second, _maybe_dense(cross))]
    return GraphEdges(n, np.ones(n, dtype=bool), degrees, pieces, sides)


def _maybe_dense(matrix: sp.csr_array) -> np.ndarray | sp.csr_array:
    """Dense when at least a fifth full and small: BLAS products beat sparse ones by far."""
    rows, cols = matrix.shape
    if rows * cols <= DENSE_MAX_ENTRIES and matrix.nnz * 5 >= rows * cols:
        return matrix.toarray()
    return matrix


def bipartition(adjacency: sp.csr_array) -> np.ndarray | None:
    """Two-colouring of a graph (True = second side), or None when it has an odd cycle.

    Node v's two copies in the bipartite double cover ``[[0, A], [A, 0]]`` lie in one connected
    component exactly when v sits on an odd cycle; otherwise the component holding v's first copy
    tells v's side.
    """
    n = adjacency.shape[0]
    pattern = sp.csr_array(adjacency)
    cover = sp.block_array([[None, pattern], [pattern, None]], format="csr")
    _, component = csgraph.connected_components(cover, directed=False)
    first, second = component[:n], component[n:]
    if np.any(first == second):
        return None
    side = first > second
    if side.all() or not side.any():
        return None
    return side


def _as_csr(graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray) -> sp.csr_array:
    if _unassembled(graph):
        raise GraphError(
            "this weight graph was built without its sparse adjacency (the bounded-memory "
            "reader, or weight_topology); assemble it first with graph.assemble(), which needs "
            "about 24 bytes per edge."
        )
    adjacency = graph.adjacency if isinstance(graph, WeightGraph) else graph
    adjacency = sp.csr_array(adjacency, dtype=np.float64)
    if adjacency.shape[0] != adjacency.shape[1]:
        raise ConfigError(f"the adjacency must be square, got shape {adjacency.shape}.")
    return adjacency
