"""The weight graph as edge pieces: the block-by-block linear algebra of a graph.

A graph restricted to its non-isolated ("active") nodes is a list of pieces, each a dense or CSR
matrix of edge weights between some rows and columns of active nodes: one piece per weight block
(a graph built from a model's layers, multiplied by dense BLAS products, without its sparse
adjacency), or one for a whole adjacency. This module holds the pieces, their products
(``W x``, ``W^T y``, the weight inside each cluster), and the degrees and row and column sums of
weight blocks; the eigensolver and the n-cut (:mod:`cluster_tracking.spectral`) compute on them.
Numpy and scipy only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from cluster_tracking.graph.degrees import (
    _add_at,
    _block_weights,
    _drop_self_loops,
    _refuse_placeholders,
    _row_col_sums,
)
from cluster_tracking.graph.types import EdgeBlock, WeightGraph
from cluster_tracking.resources.chunks import CHUNK_ENTRIES

if TYPE_CHECKING:
    from cluster_tracking.graph.remote import RemoteBlocks


@dataclass
class EdgePiece:
    """Edges ``weights[i, j]`` between active nodes ``rows[i]`` and ``cols[j]``.

    ``weights`` is a dense ``[len(rows), len(cols)]`` float64 array (a fully connected layer) or a
    CSR matrix. A *symmetric* piece holds a whole symmetric adjacency, both orientations of every
    edge (``rows`` and ``cols`` are then all nodes); the others hold each edge once, and stand for
    the adjacency ``P_rows W P_cols^T + (P_rows W P_cols^T)^T``.
    """

    rows: np.ndarray
    cols: np.ndarray
    weights: np.ndarray | sp.csr_array
    symmetric: bool = False
    _cast: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def dense(self) -> bool:
        return isinstance(self.weights, np.ndarray)

    def weights_as(self, dtype: Any) -> Any:
        """``weights`` in ``dtype`` (float32 products are twice as fast), cast once."""
        if self.weights.dtype == np.dtype(dtype):
            return self.weights
        if dtype not in self._cast:
            self._cast[dtype] = self.weights.astype(dtype)
        return self._cast[dtype]

    def _chunked(self, dtype: Any) -> bool:
        """Whether products in ``dtype`` read the weights in row chunks: a dense piece held in
        a narrower dtype (float32 magnitudes, for float64 products: a whole cast copy would
        triple their memory), or a large one held in another dtype."""
        if not self.dense or self.weights.dtype == np.dtype(dtype):
            return False
        upcast = self.weights.dtype.itemsize < np.dtype(dtype).itemsize
        return upcast or self.weights.size > CHUNK_ENTRIES

    def row_chunks(self, dtype: Any) -> Iterator[tuple[int, int, Any]]:
        """``(start, stop, weights[start:stop] in dtype)``: the whole piece at once, or row
        chunks of at most :data:`CHUNK_ENTRIES` entries (see :meth:`_chunked`)."""
        n_rows = self.weights.shape[0]
        if not self._chunked(dtype):
            yield 0, n_rows, self.weights_as(dtype)
            return
        step = max(1, CHUNK_ENTRIES // max(1, self.weights.shape[1]))
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            yield start, stop, np.asarray(self.weights[start:stop], dtype=dtype)

    def matmul(self, x: np.ndarray, dtype: Any) -> Any:
        """``W @ x`` in ``dtype`` (``x``: ``[len(cols), b]`` in ``dtype``)."""
        if not self._chunked(dtype):
            return self.weights_as(dtype) @ x
        out = np.empty((self.weights.shape[0], x.shape[1]), dtype=dtype)
        for start, stop, chunk in self.row_chunks(dtype):
            out[start:stop] = chunk @ x
        return out

    def rmatmul(self, y: np.ndarray, dtype: Any) -> Any:
        """``W^T @ y`` in ``dtype`` (``y``: ``[len(rows), b]`` in ``dtype``)."""
        if not self._chunked(dtype):
            return self.weights_as(dtype).T @ y
        out = np.zeros((self.weights.shape[1], y.shape[1]), dtype=dtype)
        for start, stop, chunk in self.row_chunks(dtype):
            out += chunk.T @ y[start:stop]
        return out

    def edge_list(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(row position, column position, weight)`` of the non-zero entries, self-loops of a
        symmetric piece left out (they are never cut)."""
        if "coo" not in self._cast:
            coo = sp.coo_array(self.weights)
            i, j, w = coo.row, coo.col, coo.data
            if self.symmetric:
                keep = i != j
                i, j, w = i[keep], j[keep], w[keep]
            self._cast["coo"] = (i, j, w)
        return self._cast["coo"]


@dataclass
class GraphEdges:
    """A weight graph restricted to its non-isolated ("active") nodes, as edge pieces.

    ``sides`` (when the graph is bipartite) marks the second side; then every piece has its rows
    on the first side and its columns on the second.
    """

    n_nodes: int
    active: np.ndarray  # bool [n_nodes]
    degrees: np.ndarray  # [n_active]
    pieces: list[EdgePiece]
    sides: np.ndarray | None

    @property
    def n_active(self) -> int:
        return int(self.degrees.shape[0])

    def dense_adjacency(self) -> np.ndarray:
        """The ``[n_active, n_active]`` adjacency as a dense array (small graphs only)."""
        adjacency = np.zeros((self.n_active, self.n_active))
        for piece in self.pieces:
            w = (
                piece.weights.toarray()
                if isinstance(piece.weights, sp.csr_array)
                else piece.weights
            )
            block = np.zeros_like(adjacency)
            block[np.ix_(piece.rows, piece.cols)] = w
            adjacency += block if piece.symmetric else block + block.T
        return adjacency


def edges_from_blocks(
    blocks: Sequence[EdgeBlock], n_nodes: int, node_layer: np.ndarray
) -> GraphEdges:
    """Pieces straight from the weight blocks, one per block, without the sparse adjacency.

    A graph is bipartite along layer parity when each block reads nodes of one parity and writes
    nodes of the other (a chain of layers): node_layer % 2 is then a 2-colouring for free.
    """
    _refuse_placeholders(blocks)
    layouts = []
    for block in blocks:
        rows, cols, weights = _block_layout(block)
        layouts.append((rows, cols, weights, *_row_col_sums(weights)))
    return _edges_from_layouts(layouts, n_nodes, node_layer)


def _block_layout(block: EdgeBlock) -> tuple[np.ndarray, np.ndarray, np.ndarray | sp.csr_array]:
    """``(rows, cols, weights)``: the block's output and input nodes and ``[out, in]`` edge
    weights, a node's edges to itself (after a residual add: never cut) dropped."""
    rows, cols, weights = block.dst, block.src, _block_weights(block)
    disjoint = rows.min() > cols.max() or cols.min() > rows.max()  # layers of a chain
    if not disjoint and np.intersect1d(rows, cols).size:
        weights = _drop_self_loops(rows, cols, weights)
    return rows, cols, weights


def _edges_from_layouts(
    layouts: Sequence[tuple[np.ndarray, np.ndarray, Any, np.ndarray, np.ndarray]],
    n_nodes: int,
    node_layer: np.ndarray,
    remote: RemoteBlocks | None = None,
) -> GraphEdges:
    """The edge pieces of blocks given as ``(rows, cols, weights, row sums, column sums)``:
    degrees summed in block order, zero-degree nodes dropped, each piece oriented with its rows
    on the first side of a bipartite graph. With ``remote``, the weights stay on the Dask
    workers (``weights`` is ``None``) and each becomes a :class:`RemotePiece`, shaped there as
    here (:func:`_piece_weights`)."""
    parity = (node_layer % 2).astype(bool)
    raw = []
    degrees = np.zeros(n_nodes)
    bipartite = True
    for rows, cols, weights, row_sums, col_sums in layouts:
        _add_at(degrees, rows, row_sums)
        _add_at(degrees, cols, col_sums)
        transposed = False
        row_parity, col_parity = parity[rows], parity[cols]
        if row_parity.min() != row_parity.max() or col_parity.min() != col_parity.max():
            bipartite = False
        elif row_parity[0] == col_parity[0]:
            bipartite = False
        elif row_parity[0]:  # rows on the first side (even layers)
            rows, cols, transposed = cols, rows, True
        raw.append((rows, cols, weights, transposed))
    active = degrees > 0
    renumber = np.cumsum(active) - 1
    pieces: list[Any] = []
    for index, (rows, cols, weights, transposed) in enumerate(raw):
        keep_rows: np.ndarray | None = active[rows]
        keep_cols: np.ndarray | None = active[cols]
        assert keep_rows is not None and keep_cols is not None
        if keep_rows.all() and keep_cols.all():
            keep_rows = keep_cols = None
        else:
            rows, cols = rows[keep_rows], cols[keep_cols]
        if not rows.size or not cols.size:
            continue
        if remote is not None:
            pieces.append(
                remote.piece(
                    index, renumber[rows], renumber[cols], transposed, keep_rows, keep_cols
                )
            )
        else:
            weights = _piece_weights(weights, transposed, keep_rows, keep_cols)
            pieces.append(EdgePiece(renumber[rows], renumber[cols], weights))
    if remote is not None:
        remote.prepare()
    sides = parity[active] if bipartite else None
    if sides is not None and (sides.all() or not sides.any()):
        sides = None
    return GraphEdges(n_nodes, active, degrees[active], pieces, sides)


def _piece_weights(
    weights: Any, transposed: bool, keep_rows: np.ndarray | None, keep_cols: np.ndarray | None
) -> np.ndarray | sp.csr_array:
    """A block's edge weights as its piece holds them: transposed (a view) to put its rows on
    the first side, restricted to the non-isolated nodes."""
    if transposed:
        weights = weights.T
    if keep_rows is not None and keep_cols is not None:
        weights = weights[keep_rows][:, keep_cols]
    if isinstance(weights, np.ndarray):
        if not (weights.flags.c_contiguous or weights.flags.f_contiguous):
            weights = np.ascontiguousarray(weights)  # a transposed view is used as it is
        return weights
    return sp.csr_array(weights)


def graph_edges(graph: WeightGraph) -> GraphEdges:
    """A block-built graph's edge pieces: on the Dask workers for a remote graph."""
    remote = getattr(graph, "remote", None)
    if remote is not None:
        return remote.edges()
    return edges_from_blocks(graph.blocks, graph.n_nodes, graph.node_layer)


def dense_within(
    piece: EdgePiece, row_ids: np.ndarray, col_ids: np.ndarray, n_flat: int, dtype: Any
) -> np.ndarray:
    """``[n_flat]``: the weight of a dense piece's edges inside each cluster of each restart
    (each edge once), from ``onehot(row labels)^T W`` (see :func:`_cluster_weights`)."""
    n_restarts = row_ids.shape[0]
    per_cluster: Any = None
    for start, stop, chunk in piece.row_chunks(dtype):
        ids = row_ids[:, start:stop]
        # [rows, R * k]: row i of W has a 1 at r * k + label_r(i) for each restart r
        one_hot = sp.csr_array(
            (
                np.ones(ids.size, dtype=dtype),
                ids.T.ravel(),
                np.arange(0, ids.size + 1, n_restarts),
            ),
            shape=(stop - start, n_flat),
        )
        part = one_hot.T @ chunk  # [R * k, c]
        per_cluster = part if per_cluster is None else per_cluster + part
    own = per_cluster[col_ids, np.arange(col_ids.shape[1])[None, :]]  # [R, c]
    return np.bincount(col_ids.ravel(), weights=own.ravel().astype(np.float64), minlength=n_flat)
