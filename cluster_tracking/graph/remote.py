"""A graph's weight blocks held on a Dask cluster (``safetensors_graph(..., scheduler=...)``).

One :class:`_BlockHolder` actor per worker maps its consecutive run of blocks from the shared file;
the graph's edge pieces (:class:`RemotePiece`) run their products (``W x``, ``W^T y``, the
within-cluster weights) on the worker that holds them, by the same code as the local pieces of
:mod:`~cluster_tracking.graph.edges`, sent to all workers at once and summed here in block order:
the same labels, n-cut and eigenvalues as the local path for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.degrees import _row_col_sums
from cluster_tracking.graph.edges import (
    EdgePiece,
    GraphEdges,
    _block_layout,
    _edges_from_layouts,
    _piece_weights,
    dense_within,
)
from cluster_tracking.graph.types import EdgeBlock
from cluster_tracking.parallel.dask import started_actor

if TYPE_CHECKING:
    from cluster_tracking.graph.mapped_graph import StageCallback


@dataclass
class RemotePiece:
    """A :class:`EdgePiece` whose weights a :class:`_BlockHolder` on a Dask worker holds: its
    products and within-cluster weights are computed there, by the same code."""

    rows: np.ndarray
    cols: np.ndarray
    holder: Any  # the worker's _BlockHolder actor
    index: int  # the block's position in the graph
    symmetric: bool = False
    dense: bool = True

    def submit(self, method: str, args: Any, dtype: Any) -> Any:
        """Start ``method`` (``"matmul"``, ``"rmatmul"`` or ``"within"``) on the worker; the
        result of the returned future is what ``EdgePiece`` would give here."""
        name = np.dtype(dtype).name
        if method == "within":
            return self.holder.within(self.index, *args, name)
        return self.holder.product(self.index, method, args, name)

    def matmul(self, x: np.ndarray, dtype: Any) -> Any:
        return self.submit("matmul", x, dtype).result()

    def rmatmul(self, y: np.ndarray, dtype: Any) -> Any:
        return self.submit("rmatmul", y, dtype).result()

    @property
    def weights(self) -> np.ndarray | sp.csr_array:
        """The piece's weights, fetched from the worker (the dense solver of small graphs)."""
        return self.holder.weights(self.index).result()


class _BlockHolder:
    """On a Dask worker (a Dask actor): some weight blocks of a graph, mapped from the shared
    file by :func:`~cluster_tracking.graph.mapped.map_block_weights`, and the products the
    eigensolver and the n-cut ask of them (numpy and scipy only: no torch on the worker)."""

    def __init__(self) -> None:
        self.layouts: dict[int, Any] = {}
        self.pieces: dict[int, EdgePiece] = {}

    def load(
        self, source: Any, skeleton: dict[int, EdgeBlock]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Map the blocks ``skeleton`` names; their row and column sums (float64)."""
        from cluster_tracking.graph.mapped import map_block_weights

        indices = sorted(skeleton)
        sums = {}
        for index, weight in zip(indices, map_block_weights(source, indices), strict=True):
            _, _, weights = _block_layout(replace(skeleton[index], weight=weight))
            self.layouts[index] = weights
            sums[index] = _row_col_sums(weights)
        return sums

    def prepare(self, specs: list[tuple[int, bool, np.ndarray | None, np.ndarray | None]]) -> None:
        """Shape each block as its piece (:func:`_piece_weights`)."""
        for index, transposed, keep_rows, keep_cols in specs:
            weights = _piece_weights(self.layouts.pop(index), transposed, keep_rows, keep_cols)
            self.pieces[index] = EdgePiece(_NO_IDS, _NO_IDS, weights)
        self.layouts.clear()  # blocks with no piece (every node isolated)

    def product(self, index: int, method: str, x: np.ndarray, dtype: str) -> np.ndarray:
        with threadpool_limits(1):
            result: np.ndarray = getattr(self.pieces[index], method)(x, np.dtype(dtype))
            return result

    def within(
        self, index: int, row_ids: np.ndarray, col_ids: np.ndarray, n_flat: int, dtype: str
    ) -> np.ndarray:
        with threadpool_limits(1):
            return dense_within(self.pieces[index], row_ids, col_ids, n_flat, np.dtype(dtype))

    def weights(self, index: int) -> np.ndarray | sp.csr_array:
        return self.pieces[index].weights


_NO_IDS = np.empty(0, dtype=np.int64)


class RemoteBlocks:
    """A graph's weight blocks held on a Dask cluster: one :class:`_BlockHolder` actor per
    worker, each mapping its consecutive run of blocks from the shared file; the graph's edge
    pieces (:meth:`edges`) compute on them there.

    Only the file's path and fingerprint, the blocks' topology and the vectors of each product
    travel; the weights never leave the workers.
    """

    def __init__(
        self,
        client: Any,
        owned: bool,
        source: Any,
        skeleton: Sequence[EdgeBlock],
        n_nodes: int,
        node_layer: np.ndarray,
        assignment: dict[str, list[int]],
        stage: StageCallback | None = None,
    ) -> None:
        self.client, self.owned = client, owned
        #: bytes of float32 weights each worker keeps (for the estimates of later work there)
        self.held = {
            worker: sum(4 * int(np.prod(source.tensors[i].shape, dtype=np.int64)) for i in indices)
            for worker, indices in assignment.items()
        }
        self.futures = [
            client.submit(
                _BlockHolder, actor=True, workers=[worker], allow_other_workers=False, pure=False
            )
            for worker in assignment
        ]
        self.closed = False
        with client.as_current():  # an actor binds to the current client when it is made
            holders = [
                started_actor(future, worker, client)
                for future, worker in zip(self.futures, assignment, strict=True)
            ]
        self.holder_of: dict[int, Any] = {}
        self.specs: dict[int, list[Any]] = {}
        loads = [
            holder.load(source, {index: skeleton[index] for index in indices})
            for holder, indices in zip(holders, assignment.values(), strict=True)
        ]
        layouts: list[Any] = [None] * len(skeleton)
        done = 0
        for position, (holder, indices, load) in enumerate(
            zip(holders, assignment.values(), loads, strict=True)
        ):
            sums = load.result()
            for index in indices:
                self.holder_of[index] = (position, holder)
                block = skeleton[index]
                layouts[index] = (block.dst, block.src, None, *sums[index])
            done += len(indices)
            if stage is not None:
                stage("reading", done, len(skeleton))
        self._edges = _edges_from_layouts(layouts, n_nodes, node_layer, remote=self)

    def piece(
        self,
        index: int,
        rows: np.ndarray,
        cols: np.ndarray,
        transposed: bool,
        keep_rows: np.ndarray | None,
        keep_cols: np.ndarray | None,
    ) -> RemotePiece:
        """The piece of block ``index`` (shaped on its worker at :meth:`prepare`)."""
        position, holder = self.holder_of[index]
        self.specs.setdefault(position, []).append((index, transposed, keep_rows, keep_cols))
        return RemotePiece(rows, cols, holder, index)

    def prepare(self) -> None:
        """Have every worker shape its blocks as the pieces asked for."""
        holders = {position: holder for position, holder in self.holder_of.values()}
        pending = [
            holders[position].prepare(self.specs.get(position, [])) for position in sorted(holders)
        ]
        for future in pending:
            future.result()
        self.specs.clear()

    def edges(self) -> GraphEdges:
        if self.closed:
            raise GraphError(
                "this graph's weight blocks were released from the Dask workers; read the "
                "graph again (safetensors_graph(..., scheduler=...))."
            )
        return self._edges

    def node_degrees(self) -> np.ndarray:
        """Weighted degree of every node, ``[n_nodes]`` (0 for isolated ones)."""
        edges = self.edges()
        degrees = np.zeros(edges.n_nodes)
        degrees[edges.active] = edges.degrees
        return degrees

    def close(self) -> None:
        """Release the actors (the workers free the blocks) and an owned client."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.futures and self.client.status == "running":
                self.client.cancel(self.futures)
        finally:
            self.futures = []
            self.holder_of.clear()
            self._edges = GraphEdges(0, np.zeros(0, dtype=bool), np.zeros(0), [], None)
            if self.owned:
                self.client.close()
