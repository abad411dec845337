"""The smallest eigenpairs of a weight graph's normalised Laplacian ``L = I - D^-1/2 A D^-1/2``.

A chain of layers is a bipartite graph (even layers against odd ones), so ``D^-1/2 A D^-1/2`` has
the block form ``[[0, B], [B^T, 0]]`` and its top eigenvectors are ``[u; v] / sqrt(2)`` for the top
singular triplets ``(u, sigma, v)`` of ``B``: a much cheaper and better-conditioned problem than the
interior eigenvalues scikit-learn asks ARPACK for.

Small graphs are solved densely; large ones by block Krylov
(:func:`~cluster_tracking.spectral.krylov.block_krylov`) in float32 until the eigenvalues settle to
the partition's tolerance: k-means needs the subspace, not ten digits. The eigenvalues a partition
reports are then refined in float64 to :data:`EIGENVALUE_TOL`. Products go through the graph's edge
pieces (:mod:`~cluster_tracking.graph.edges`), on Dask workers for a remote graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.edges import GraphEdges
from cluster_tracking.graph.remote import RemotePiece
from cluster_tracking.resources.chunks import KRYLOV_OVERSAMPLE
from cluster_tracking.spectral.adjacency import _edges_from_adjacency
from cluster_tracking.spectral.krylov import block_krylov

#: Graphs up to this many (non-isolated) nodes are embedded with a dense eigensolver.
DENSE_MAX_NODES = 600


#: Tolerance on the eigenvalues reported in a partition and by :func:`laplacian_embedding`.
EIGENVALUE_TOL = 1e-8


#: Tolerances at least this loose use float32 products.
FLOAT32_TOL = 1e-5


def laplacian_embedding(
    adjacency: sp.csr_array,
    n_components: int,
    *,
    degrees: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    tol: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_components`` smallest eigenpairs of the normalised Laplacian of a graph.

    The graph must have no zero-degree node. Returns ``(eigenvalues, embedding)``: the eigenvalues
    of ``L = I - D^-1/2 A D^-1/2`` in ascending order, shape ``[n_components]``, and the node
    embedding ``D^-1/2 V`` (V the eigenvectors), shape ``[n_nodes, n_components]``, as
    scikit-learn's ``spectral_embedding(norm_laplacian=True, drop_first=False)`` returns up to sign
    and rotation within repeated eigenvalues.

    ``tol`` bounds the change of the eigenvalues between the last two Krylov steps; the default
    (:data:`EIGENVALUE_TOL`) gives eigenvalues to about 1e-8 (graphs of up to
    :data:`DENSE_MAX_NODES` nodes, or a bipartite one with a side of up to half that, are solved
    densely, to machine precision). :func:`spectral_partition` embeds
    with :data:`PARTITION_TOL`: k-means needs the subspace, not ten exact digits.
    """
    rng = np.random.default_rng() if rng is None else rng
    adjacency = sp.csr_array(adjacency, dtype=np.float64)
    if degrees is None:
        degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    if np.any(degrees <= 0):
        raise ConfigError("laplacian_embedding needs a graph without zero-degree nodes.")
    edges = _edges_from_adjacency(adjacency, degrees)
    solver = _EigenSolver(edges, n_components, rng)
    eigenvalues, embedding = solver.solve(EIGENVALUE_TOL if tol is None else tol)
    assert embedding is not None and embedding.shape == (adjacency.shape[0], n_components)
    return eigenvalues, embedding


def _index(ids: np.ndarray) -> tuple[slice | np.ndarray, bool]:
    """A slice for a run of consecutive ids (views, not copies), and whether ids are distinct."""
    if ids.size and ids[-1] - ids[0] + 1 == ids.size and np.all(np.diff(ids) == 1):
        return slice(int(ids[0]), int(ids[-1]) + 1), True
    return ids, np.unique(ids).size == ids.size


def _scatter_add(out: np.ndarray, index: slice | np.ndarray, unique: bool, values: Any) -> None:
    if unique or isinstance(index, slice):
        out[index] += values
    else:
        np.add.at(out, index, values)


class _CrossOperator:
    """``B = D_1^-1/2 A_12 D_2^-1/2``, the cross block of a bipartite graph's ``D^-1/2 A D^-1/2``
    (sides 1 and 2), applied to blocks of vectors: ``B X`` and ``B^T Y``."""

    def __init__(self, edges: GraphEdges, dtype: Any) -> None:
        assert edges.sides is not None
        sides = edges.sides
        position = np.empty(edges.n_active, dtype=np.int64)
        self.first, self.second = np.flatnonzero(~sides), np.flatnonzero(sides)
        position[self.first] = np.arange(self.first.size)
        position[self.second] = np.arange(self.second.size)
        inv_sqrt_degree = 1.0 / np.sqrt(edges.degrees)
        self.scale_first = inv_sqrt_degree[self.first][:, None]
        self.scale_second = inv_sqrt_degree[self.second][:, None]
        self.dtype = dtype
        self.parts = [
            (*_index(position[piece.rows]), *_index(position[piece.cols]), piece)
            for piece in edges.pieces
        ]
        self.shape = (self.first.size, self.second.size)

    def matmat(self, x: np.ndarray) -> np.ndarray:
        """``B @ x`` for ``x`` of shape ``[n_second, b]``."""
        xs = (x * self.scale_second).astype(self.dtype)
        out = np.zeros((self.shape[0], x.shape[1]), dtype=self.dtype)
        products = _products(
            [(piece, "matmul", xs[cols]) for _, _, cols, _, piece in self.parts], self.dtype
        )
        for (rows, rows_unique, _, _, _), product in zip(self.parts, products, strict=True):
            _scatter_add(out, rows, rows_unique, product)
        return out.astype(np.float64) * self.scale_first

    def rmatmat(self, y: np.ndarray) -> np.ndarray:
        """``B^T @ y`` for ``y`` of shape ``[n_first, b]``."""
        ys = (y * self.scale_first).astype(self.dtype)
        out = np.zeros((self.shape[1], y.shape[1]), dtype=self.dtype)
        products = _products(
            [(piece, "rmatmul", ys[rows]) for rows, _, _, _, piece in self.parts], self.dtype
        )
        for (_, _, cols, cols_unique, _), product in zip(self.parts, products, strict=True):
            _scatter_add(out, cols, cols_unique, product)
        return out.astype(np.float64) * self.scale_second


def _products(calls: list[tuple[Any, str, np.ndarray]], dtype: Any) -> Iterator[Any]:
    """``piece.matmul(x)`` / ``piece.rmatmul(x)`` of each call, in order: computed one by one
    here, or, for pieces on Dask workers, sent to all the workers at once and gathered in
    order (the same products, computed there)."""
    if calls and isinstance(calls[0][0], RemotePiece):
        pending = [piece.submit(method, x, dtype) for piece, method, x in calls]
        for future in pending:
            yield future.result()
        return
    for piece, method, x in calls:
        yield getattr(piece, method)(x, dtype)


class _SymmetricOperator:
    """``N = D^-1/2 A D^-1/2`` applied to blocks of vectors."""

    def __init__(self, edges: GraphEdges, dtype: Any) -> None:
        self.scale = (1.0 / np.sqrt(edges.degrees))[:, None]
        self.dtype = dtype
        self.parts = [
            (*_index(piece.rows), *_index(piece.cols), piece, piece.symmetric)
            for piece in edges.pieces
        ]
        self.size = edges.n_active

    def matmat(self, x: np.ndarray) -> np.ndarray:
        xs = (x * self.scale).astype(self.dtype)
        out = np.zeros((self.size, x.shape[1]), dtype=self.dtype)
        for rows, rows_unique, cols, cols_unique, piece, symmetric in self.parts:
            if symmetric:
                out += piece.matmul(xs, self.dtype)
                continue
            _scatter_add(out, rows, rows_unique, piece.matmul(xs[cols], self.dtype))
            _scatter_add(out, cols, cols_unique, piece.rmatmul(xs[rows], self.dtype))
        return out.astype(np.float64) * self.scale


class _EigenSolver:
    """The largest eigenpairs of ``N = D^-1/2 A D^-1/2`` (the smallest of ``L = I - N``).

    Small graphs: a dense eigensolver. Large ones: block Krylov (block Lanczos with full
    reorthogonalisation and Rayleigh-Ritz), run until the wanted Ritz values move less than a
    tolerance between two steps. A bipartite graph is solved through the SVD of its cross block
    B (Krylov on ``B^T B`` over the smaller side): its wanted eigenvalues are B's largest singular
    values, better separated than the interior eigenvalues of N. The partition embeds with the
    products in float32 (:data:`PARTITION_TOL`); eigenvalues are refined in float64, starting
    from that subspace.
    """

    def __init__(self, edges: GraphEdges, n_components: int, rng: np.random.Generator) -> None:
        self.edges = edges
        self.n_components = n_components
        self.rng = rng
        self.inv_sqrt_degree = 1.0 / np.sqrt(edges.degrees)
        self.dense_result: tuple[np.ndarray, np.ndarray] | None = None
        self.warm: np.ndarray | None = None  # Ritz vectors of the last solve (basis side)
        if edges.sides is not None:
            sides = edges.sides
            small = min(int(sides.sum()), int((~sides).sum()))
            self.dense = small <= max(DENSE_MAX_NODES // 2, n_components + 1)
        else:
            self.dense = edges.n_active <= DENSE_MAX_NODES or n_components >= edges.n_active - 1

    def solve(self, tol: float, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """``(eigenvalues of L ascending, embedding D^-1/2 V or None)``."""
        full: np.ndarray | None
        if self.dense:
            if self.dense_result is None:
                self.dense_result = self._dense()
            top, full = self.dense_result
        else:
            top, full = self._krylov(tol, vectors)
        order = np.argsort(-top, kind="stable")
        eigenvalues = np.clip(1.0 - top[order], 0.0, 2.0)
        if not vectors or full is None:
            return eigenvalues, None
        return eigenvalues, full[:, order] * self.inv_sqrt_degree[:, None]

    def _dense(self) -> tuple[np.ndarray, np.ndarray]:
        edges, n_components = self.edges, self.n_components
        scale = self.inv_sqrt_degree
        n = edges.n_active
        if edges.sides is not None:
            first, second = np.flatnonzero(~edges.sides), np.flatnonzero(edges.sides)
            if min(first.size, second.size) >= n_components:
                s, u, v = _top_singular_triplets(_dense_cross(edges, first, second), n_components)
                vectors = np.zeros((n, n_components))
                vectors[first] = u / np.sqrt(2.0)
                vectors[second] = v / np.sqrt(2.0)
                return s, vectors
        adjacency = edges.dense_adjacency()
        normalised = adjacency * scale[:, None] * scale[None, :]
        values, vectors = scipy.linalg.eigh(normalised, subset_by_index=[n - n_components, n - 1])
        return values, vectors

    def _krylov(self, tol: float, vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        edges, n_components = self.edges, self.n_components
        dtype = np.float32 if tol >= FLOAT32_TOL else np.float64
        if edges.sides is not None:
            cross = _CrossOperator(edges, dtype)
            swap = cross.shape[0] < cross.shape[1]  # Krylov on the smaller side
            forward, backward = (
                (cross.rmatmat, cross.matmat) if swap else (cross.matmat, cross.rmatmat)
            )
            size = cross.shape[0] if swap else cross.shape[1]
            theta, right, left = block_krylov(
                forward, backward, size, self._start(size), n_components, tol, bipartite=True
            )
            self.warm = right
            if not vectors:
                return theta, None
            assert left is not None
            full = np.zeros((edges.n_active, n_components))
            first, second = (left, right) if not swap else (right, left)
            full[cross.first] = first / np.sqrt(2.0)
            full[cross.second] = second / np.sqrt(2.0)
            return theta, full
        operator = _SymmetricOperator(edges, dtype)
        size = edges.n_active
        theta, right, _ = block_krylov(
            operator.matmat, None, size, self._start(size), n_components, tol, bipartite=False
        )
        self.warm = right
        return theta, right if vectors else None

    def _start(self, size: int) -> np.ndarray:
        block = min(self.n_components + KRYLOV_OVERSAMPLE, size)
        start = self.rng.standard_normal((size, block))
        if self.warm is not None:
            start[:, : self.warm.shape[1]] = self.warm
        return start


def _dense_cross(edges: GraphEdges, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The dense cross block ``B = D_1^-1/2 A_12 D_2^-1/2`` of a bipartite graph, straight from
    its pieces (each has its rows on the first side and its columns on the second)."""
    position = np.empty(edges.n_active, dtype=np.int64)
    position[first] = np.arange(first.size)
    position[second] = np.arange(second.size)
    cross = np.zeros((first.size, second.size))
    for piece in edges.pieces:
        weights = (
            piece.weights.toarray() if isinstance(piece.weights, sp.csr_array) else piece.weights
        )
        where = np.ix_(position[piece.rows], position[piece.cols])
        if _index(piece.rows)[1] and _index(piece.cols)[1]:
            cross[where] += weights
        else:
            np.add.at(cross, where, weights)
    inv_sqrt_degree = 1.0 / np.sqrt(edges.degrees)
    cross *= inv_sqrt_degree[first][:, None]
    cross *= inv_sqrt_degree[second][None, :]
    return cross


def _top_singular_triplets(
    cross: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``count`` largest singular values of a dense matrix (descending) and their left and
    right singular vectors (as columns).

    From the eigenvectors of the Gram matrix over the smaller side (``B^T B v = s^2 v``, then
    ``u = B v / s``): 3-4x faster than a full SVD for the few triplets wanted, and as accurate
    for singular values well above round-off (``s^2`` is exact to about ``1e-16 |B|^2``, and
    ``|B| = 1`` here). A full SVD takes over where a wanted singular value is close to 0.
    """
    transpose = cross.shape[0] < cross.shape[1]
    matrix = cross.T if transpose else cross  # tall: the Gram matrix is over its columns
    gram = matrix.T @ matrix
    m = gram.shape[0]
    values, right = scipy.linalg.eigh(gram, subset_by_index=[m - count, m - 1])
    values, right = values[::-1], right[:, ::-1]
    if values[-1] <= 1e-12 * max(float(values[0]), 1e-300):
        u, s, vt = scipy.linalg.svd(cross, full_matrices=False)
        return s[:count], u[:, :count], vt[:count].T
    singular = np.sqrt(values)
    left = (matrix @ right) / singular[None, :]
    return (singular, right, left) if transpose else (singular, left, right)
