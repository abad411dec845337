"""Spectral clustering of weight graphs and the normalised cut (Filan et al. 2021, section 2).

The partition follows Shi & Malik / von Luxburg's normalised spectral clustering, as scikit-learn's
``SpectralClustering(affinity="precomputed", assign_labels="kmeans")`` does:

1. drop zero-degree nodes (they belong to no cluster and are reported);
2. embed each node with the eigenvectors of the k smallest eigenvalues of the normalised Laplacian
   ``L = I - D^-1/2 A D^-1/2``, scaled by ``D^-1/2`` (the random-walk eigenvectors);
3. run k-means on the embedding from many random starts and keep the partition whose **n-cut**
   (the quantity we report) is lowest, where scikit-learn keeps the lowest k-means inertia.

Under ``preset="filan2021"`` the partition is scikit-learn's own ``SpectralClustering(...,
eigen_solver="arpack")`` as the published code of Filan et al. calls it (:func:`filan2021_labels`):
ARPACK eigenvectors, k-means to convergence, the restart of lowest inertia kept, 25 restarts (100
above 2,000 nodes). Its n-cuts are higher and its null spread wider than the default's; the
preset exists so that numbers can be set beside the paper's.

The n-cut of a partition into clusters ``C_1..C_k`` is ``sum_c cut(C_c, rest) / vol(C_c)`` with
``vol(C) = sum of the degrees of C's nodes``; lower means more clusterable.

A chain of layers is a bipartite graph (even layers against odd ones), so ``D^-1/2 A D^-1/2`` has
the block form ``[[0, B], [B^T, 0]]`` and its top eigenvectors are ``[u; v] / sqrt(2)`` for the top
singular triplets ``(u, sigma, v)`` of ``B``: a much cheaper and better-conditioned problem than the
interior eigenvalues scikit-learn asks ARPACK for.

How it is fast (``benchmarks/`` measures it against scikit-learn on the same graphs):

- A :class:`~cluster_tracking.graph.types.WeightGraph` is multiplied through its weight blocks
  (dense BLAS products, one per layer), not through its sparse adjacency; null networks are
  partitioned straight from their shuffled blocks (:func:`block_ncuts`), never assembling an
  adjacency.
- Large graphs are embedded by block Krylov (block Lanczos with Rayleigh-Ritz) in float32 until
  the eigenvalues settle to :data:`PARTITION_TOL` (:data:`LARGE_PARTITION_TOL` above
  :data:`LARGE_GRAPH_NODES` nodes): k-means needs the subspace, not ten digits.
  The eigenvalues a partition reports are then refined in float64 to :data:`EIGENVALUE_TOL`.
- k-means proposes partitions and the n-cut chooses: all restarts run at once in float32,
  Lloyd's iterations are capped (:data:`KMEANS_MAX_ITER`), the nearest center of every point in
  every restart is one product and one integer minimum (:func:`_nearest_centers`), and the
  n-cuts of all restarts come from one product of each weight block with the restarts' one-hot
  labels.

Beyond one machine: a graph whose weight blocks stay on the workers of a Dask cluster
(``safetensors_graph(..., scheduler=...)``; :class:`_RemoteBlocks`, one Dask actor per worker)
has edge pieces whose products (``W x``, ``W^T y``, the within-cluster weights) run on the
worker that holds them, by the same code, sent to all workers at once and summed here in block
order: the same labels, n-cut and eigenvalues as the local path for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
from threadpoolctl import threadpool_limits

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph.types import EdgeBlock, WeightGraph, _kernel_slice_norms

#: k-means with at most this many clusters finds nearest centers by a packed integer minimum
#: (:func:`_nearest_centers`); more clusters use argmin.
PACKED_MAX_K = 256
#: Graphs up to this many (non-isolated) nodes are embedded with a dense eigensolver.
DENSE_MAX_NODES = 600
#: Default number of k-means restarts (the best n-cut among them is kept), as the paper's 25.
#: Chosen by n-cut they reach lower n-cuts than scikit-learn's 25 chosen by inertia
#: (benchmarks/; on weight graphs the two criteria often disagree), and 20 would not always.
DEFAULT_N_INIT = 25
#: Lloyd iterations per restart at most: k-means only proposes partitions and the n-cut picks
#: one; on weight graphs the n-cut stops improving after a few iterations, long before the
#: inertia converges (benchmarks/: 5 to 10 iterations reach lower n-cuts than 300).
KMEANS_MAX_ITER = 10
#: A piece of the graph at most this many entries large and at least a fifth full is held dense.
DENSE_MAX_ENTRIES = 1 << 24
#: A dense weight block larger than this many entries is read in row chunks of at most this many
#: entries wherever a product needs it in another dtype than it is held in (the float64 products
#: of a bounded-memory graph's float32 magnitudes), so no whole copy is made; degrees are summed
#: in float64 over row chunks of this size, whatever the dtype, so that a float32 and a float64
#: copy of the same weights give the same degrees to the last bit.
CHUNK_ENTRIES = 1 << 22
#: Tolerance on the eigenvalues of the embedding that seeds k-means (benchmarks/: the n-cuts
#: reached are the same at 1e-3, with one Krylov step more), for graphs of up to
#: :data:`LARGE_GRAPH_NODES` active nodes.
PARTITION_TOL = 3e-3
#: Above this many active nodes the embedding is solved to :data:`LARGE_PARTITION_TOL`: larger
#: graphs have narrower eigengaps, so the same eigenvalue tolerance leaves a looser subspace
#: (benchmarks/: on an 8,000-node MLP, n-cut 9.600 at 3e-3, 9.589 at 1e-4, scikit-learn 9.587).
LARGE_GRAPH_NODES = 2000
LARGE_PARTITION_TOL = 1e-4
#: Tolerance on the eigenvalues reported in a partition and by :func:`laplacian_embedding`.
EIGENVALUE_TOL = 1e-8
#: Tolerances at least this loose use float32 products.
FLOAT32_TOL = 1e-5
#: Block Krylov: block size is the number of wanted vectors plus this; at most this many blocks.
KRYLOV_OVERSAMPLE = 8
KRYLOV_MAX_BLOCKS = 40
#: The ``filan2021`` preset's k-means restarts: :data:`FILAN2021_N_INIT`, or
#: :data:`FILAN2021_LARGE_N_INIT` on graphs of more than :data:`FILAN2021_LARGE_NODES`
#: non-isolated nodes (the published code's ``cluster_net``).
FILAN2021_N_INIT = 25
FILAN2021_LARGE_N_INIT = 100
FILAN2021_LARGE_NODES = 2000
#: Which clustering procedure each preset runs (recorded in ``report.config["clustering"]``).
CLUSTERING_PROCEDURES = {
    "default": (
        "cluster-tracking: block-Krylov embedding to PARTITION_TOL in float32, k-means capped at "
        "KMEANS_MAX_ITER iterations, the restart of lowest n-cut kept"
    ),
    "filan2021": (
        "scikit-learn SpectralClustering(affinity='precomputed', eigen_solver='arpack', "
        "assign_labels='kmeans'): ARPACK eigenvectors, k-means to convergence, the restart of "
        "lowest inertia kept; n_init 25, 100 above 2000 nodes"
    ),
}


#: ``stage(name, done, total)``: how far a long computation is, by stage (``"graph"``,
#: ``"eigen"``, ``"k-means"``...); ``done`` of ``total`` steps of that stage.
StageCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SpectralPartition:
    """A partition of a weight graph into ``k`` clusters.

    Attributes:
        labels: cluster of every node in node order, shape ``[n_nodes]``; ``-1`` for the
            zero-degree nodes that were removed before clustering.
        ncut: the n-cut of ``labels`` (sum over clusters of cut / volume).
        k: number of clusters.
        eigenvalues: the k smallest eigenvalues of the normalised Laplacian, ascending.
        n_isolated: number of zero-degree nodes removed before clustering.
    """

    labels: np.ndarray
    ncut: float
    k: int
    eigenvalues: np.ndarray
    n_isolated: int


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
        edges = _graph_edges(graph)
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


def spectral_partition(
    graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray,
    k: int = 12,
    *,
    seed: int | np.random.SeedSequence | None = None,
    n_init: int | None = None,
    preset: str = "default",
) -> SpectralPartition:
    """Partition a weight graph into ``k`` clusters by normalised spectral clustering.

    Zero-degree nodes are removed first and labelled ``-1``. Clusters are numbered in the order
    of their first node, so the same partition always gets the same labels. The result is
    deterministic for a given ``seed``.

    ``preset="default"``: of ``n_init`` k-means restarts (default :data:`DEFAULT_N_INIT`) on the
    spectral embedding, the one with the lowest n-cut is kept. ``preset="filan2021"``: the
    published procedure, scikit-learn's ``SpectralClustering(affinity="precomputed",
    eigen_solver="arpack", assign_labels="kmeans")`` itself (:func:`filan2021_labels`), with
    ``n_init`` 25, or 100 above 2,000 nodes, unless ``n_init`` is given.

    Args:
        graph: a :class:`~cluster_tracking.graph.types.WeightGraph` or a symmetric adjacency matrix.
        k: number of clusters (the paper uses 12).
        seed: seed of the k-means starts and of the eigensolver's start vector.
        n_init: number of k-means restarts (``None``: the preset's).
        preset: the clustering procedure, ``"default"`` or ``"filan2021"``.
    """
    return spectral_partitions(graph, [k], seed=seed, n_init=n_init, preset=preset)[0]


def spectral_partitions(
    graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray,
    ks: Sequence[int],
    *,
    seed: int | np.random.SeedSequence | None = None,
    n_init: int | None = None,
    preset: str = "default",
    stage: StageCallback | None = None,
) -> list[SpectralPartition]:
    """:func:`spectral_partition` for several k at once, sharing one eigendecomposition.

    The eigenvectors of the k smallest Laplacian eigenvalues are the first k of those for the
    largest k, so one embedding serves every k. k-means for each k draws from its own stream,
    derived from ``seed`` and k, so a k's partition does not depend on which other k are asked.
    (Under ``filan2021`` scikit-learn embeds once per k, as the published code does.)
    ``stage``, if given, is called as ``stage("eigen", done, 2)`` around the embedding and the
    eigenvalues, and ``stage("k-means", done, len(ks))`` after each k.
    """
    if n_init is not None:
        n_init = _check_positive_int(n_init, "n_init")
    edges = _edges_of(graph)
    # BLAS on one thread: its operands are thin (blocks of ~20 vectors), where threads gain little
    # and, on a busy machine, lose much (spinning OpenBLAS threads: 10x slower measured).
    with threadpool_limits(1):
        if _check_preset(preset) == "filan2021":
            return _filan2021_partitions(edges, ks, seed=seed, n_init=n_init, eigenvalues=True)
        return _partitions(
            edges,
            ks,
            seed=seed,
            n_init=n_init or DEFAULT_N_INIT,
            eigenvalues=True,
            stage=stage,
        )


def filan2021_n_init(n_active: int) -> int:
    """k-means restarts of the published procedure: 25, or 100 above 2,000 (non-isolated)
    nodes (``cluster_net`` in the published code)."""
    return FILAN2021_LARGE_N_INIT if n_active > FILAN2021_LARGE_NODES else FILAN2021_N_INIT


def filan2021_labels(
    adjacency: sp.csr_array, k: int, *, random_state: int, n_init: int | None = None
) -> np.ndarray:
    """Cluster labels of scikit-learn's ``SpectralClustering`` as the published code calls it.

    ``SpectralClustering(n_clusters=k, affinity="precomputed", eigen_solver="arpack",
    assign_labels="kmeans", n_init=n_init, random_state=random_state).fit(adjacency).labels_``:
    the normalised-Laplacian embedding solved by ARPACK to machine precision, k-means run to
    convergence from ``n_init`` k-means++ starts (default :func:`filan2021_n_init`), the start
    of lowest inertia kept. ``adjacency`` must have no zero-degree node (the published code
    deletes them first); it is passed as sparse CSR, as the published ``weights_to_graph`` makes
    it. Labels are scikit-learn's own (not renumbered).
    """
    from sklearn.cluster import SpectralClustering

    clustering = SpectralClustering(
        n_clusters=k,
        affinity="precomputed",
        eigen_solver="arpack",
        assign_labels="kmeans",
        n_init=filan2021_n_init(adjacency.shape[0]) if n_init is None else n_init,
        random_state=random_state,
    )
    return np.asarray(clustering.fit(sp.csr_matrix(adjacency)).labels_, dtype=np.int64)


def _filan2021_partitions(
    edges: _Edges,
    ks: Sequence[int],
    *,
    seed: int | np.random.SeedSequence | None,
    n_init: int | None,
    eigenvalues: bool,
) -> list[SpectralPartition]:
    """The partitions of the published procedure (:func:`filan2021_labels`) at every k.

    scikit-learn's ``random_state`` for k is drawn from the stream keyed ``(1, k)`` under
    ``seed``; the n-cut is computed on the partition scikit-learn returns.
    """
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    ks = [_check_k(k, edges.n_active, edges.n_nodes) for k in ks]
    if not ks:
        raise ConfigError("at least one k is needed.")
    adjacency = _sparse_adjacency(edges)
    values = np.zeros(max(ks))
    if eigenvalues:
        solver = _EigenSolver(edges, max(ks), np.random.default_rng(child_seed(root, 0)))
        values = solver.solve(EIGENVALUE_TOL, vectors=False)[0]
    partitions = []
    for k in ks:
        random_state = int(child_seed(root, 1, k).generate_state(1)[0])
        found = filan2021_labels(adjacency, k, random_state=random_state, n_init=n_init)
        labels = np.full(edges.n_nodes, -1, dtype=np.int64)
        labels[edges.active] = _canonical_labels(found)
        partitions.append(
            SpectralPartition(
                labels=labels,
                ncut=float(_ncuts_of_pieces(edges, found[None, :], k, np.float64)[0]),
                k=k,
                eigenvalues=values[:k].copy(),
                n_isolated=edges.n_nodes - edges.n_active,
            )
        )
    return partitions


def _sparse_adjacency(edges: _Edges) -> sp.csr_array:
    """The ``[n_active, n_active]`` adjacency of the edge pieces as a sparse matrix."""
    n = edges.n_active
    total = sp.csr_array((n, n))
    for piece in edges.pieces:
        block = sp.coo_array(piece.weights)
        placed = sp.coo_array(
            (block.data, (piece.rows[block.row], piece.cols[block.col])), shape=(n, n)
        ).tocsr()
        total = total + (placed if piece.symmetric else placed + placed.T)
    total = sp.csr_array(total)
    total.eliminate_zeros()
    total.sort_indices()
    return total


def _partitions(
    edges: _Edges,
    ks: Sequence[int],
    *,
    seed: int | np.random.SeedSequence | None,
    n_init: int,
    eigenvalues: bool,
    stage: StageCallback | None = None,
) -> list[SpectralPartition]:
    """The partitions of a graph given as edge pieces (see :func:`spectral_partitions`).

    With ``eigenvalues=False`` the reported eigenvalues are the embedding's Ritz values, accurate
    to about ``PARTITION_TOL`` only (the null models need the n-cut alone).
    """
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    ks = [_check_k(k, edges.n_active, edges.n_nodes) for k in ks]
    if not ks:
        raise ConfigError("at least one k is needed.")
    rng = np.random.default_rng(child_seed(root, 0))
    solver = _EigenSolver(edges, max(ks), rng)
    large = edges.n_active > LARGE_GRAPH_NODES
    report = stage if stage is not None else _no_stage
    report("eigen", 0, 2)
    values, embedding = solver.solve(LARGE_PARTITION_TOL if large else PARTITION_TOL)
    assert embedding is not None
    report("eigen", 1, 2)
    if eigenvalues:
        values = solver.solve(EIGENVALUE_TOL, vectors=False)[0]
    report("eigen", 2, 2)
    report("k-means", 0, len(ks))
    partitions = []
    for done, k in enumerate(ks, start=1):
        rng = np.random.default_rng(child_seed(root, 1, k))
        candidates = _kmeans_restarts(embedding[:, :k], k, rng, n_init)
        rough = _ncuts_of_pieces(edges, candidates, k, np.float32)
        best = int(np.argmin(rough))
        best_labels = candidates[best]
        labels = np.full(edges.n_nodes, -1, dtype=np.int64)
        labels[edges.active] = _canonical_labels(best_labels)
        partitions.append(
            SpectralPartition(
                labels=labels,
                ncut=float(_ncuts_of_pieces(edges, best_labels[None, :], k, np.float64)[0]),
                k=k,
                eigenvalues=values[:k].copy(),
                n_isolated=edges.n_nodes - edges.n_active,
            )
        )
        report("k-means", done, len(ks))
    return partitions


def _no_stage(name: str, done: int, total: int) -> None:
    """A stage callback that reports nothing."""


def block_ncuts(
    blocks: Sequence[EdgeBlock],
    n_nodes: int,
    node_layer: np.ndarray,
    ks: Sequence[int],
    *,
    seed: int | np.random.SeedSequence | None = None,
    n_init: int | None = None,
    preset: str = "default",
) -> list[float]:
    """n-cut of the spectral partition at every k of the graph made of ``blocks``.

    The same numbers as ``spectral_partitions(graph.with_weights(...), ks, preset=preset)``
    gives, without assembling the sparse adjacency of the whole graph: what the null models
    need (their eigenvalues are not computed, since only the n-cut is reported).
    """
    edges = _edges_from_blocks(blocks, n_nodes, node_layer)
    if _check_preset(preset) == "filan2021":
        parts = _filan2021_partitions(edges, ks, seed=seed, n_init=n_init, eigenvalues=False)
    else:
        parts = _partitions(
            edges, ks, seed=seed, n_init=n_init or DEFAULT_N_INIT, eigenvalues=False
        )
    return [part.ncut for part in parts]


def _canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters by their first node in node order, so equal partitions get equal ids."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank_by_first_node = np.argsort(np.argsort(first))  # value index -> new label
    return rank_by_first_node[inverse].astype(np.int64)


def child_seed(root: np.random.SeedSequence, *key: int) -> np.random.SeedSequence:
    """The seed sequence at ``key`` below ``root``: a pure function of ``root`` and ``key``
    (unlike ``SeedSequence.spawn``, which depends on how many children were spawned before)."""
    return np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, *key))


def laplacian_eigenvalues(
    graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray,
    n: int,
    *,
    seed: int | np.random.SeedSequence | None = None,
) -> np.ndarray:
    """The ``n`` smallest eigenvalues of the normalised Laplacian (zero-degree nodes removed)."""
    edges = _edges_of(graph)
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    n = min(n, edges.n_active)
    solver = _EigenSolver(edges, n, np.random.default_rng(child_seed(root, 0)))
    return solver.solve(EIGENVALUE_TOL, vectors=False)[0]


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


# ---------------------------------------------------------------------------------------------
# The graph as pieces of edges
# ---------------------------------------------------------------------------------------------


@dataclass
class _Piece:
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
class _Edges:
    """A weight graph restricted to its non-isolated ("active") nodes, as edge pieces.

    ``sides`` (when the graph is bipartite) marks the second side; then every piece has its rows
    on the first side and its columns on the second.
    """

    n_nodes: int
    active: np.ndarray  # bool [n_nodes]
    degrees: np.ndarray  # [n_active]
    pieces: list[_Piece]
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


def _edges_of(graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray) -> _Edges:
    """The graph's edge pieces: a WeightGraph's weight blocks when they make its adjacency
    (cheaper products than a sparse matrix), else its adjacency."""
    if isinstance(graph, WeightGraph) and graph.blocks:
        edges = _graph_edges(graph)
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


def _edges_from_adjacency(adjacency: sp.csr_array, degrees: np.ndarray) -> _Edges:
    """Pieces of a symmetric adjacency without zero-degree nodes: for a bipartite graph its cross
    block (dense when mostly full), else the whole matrix."""
    n = adjacency.shape[0]
    sides = _bipartition(adjacency)
    if sides is None:
        nodes = np.arange(n)
        pieces = [_Piece(nodes, nodes, _maybe_dense(adjacency), symmetric=True)]
    else:
        first, second = np.flatnonzero(~sides), np.flatnonzero(sides)
        cross = sp.csr_array(adjacency[first][:, second])
        pieces = [_Piece(first, second, _maybe_dense(cross))]
    return _Edges(n, np.ones(n, dtype=bool), degrees, pieces, sides)


def _maybe_dense(matrix: sp.csr_array) -> np.ndarray | sp.csr_array:
    """Dense when at least a fifth full and small: BLAS products beat sparse ones by far."""
    rows, cols = matrix.shape
    if rows * cols <= DENSE_MAX_ENTRIES and matrix.nnz * 5 >= rows * cols:
        return matrix.toarray()
    return matrix


def _edges_from_blocks(blocks: Sequence[EdgeBlock], n_nodes: int, node_layer: np.ndarray) -> _Edges:
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
    remote: _RemoteBlocks | None = None,
) -> _Edges:
    """The edge pieces of blocks given as ``(rows, cols, weights, row sums, column sums)``:
    degrees summed in block order, zero-degree nodes dropped, each piece oriented with its rows
    on the first side of a bipartite graph. With ``remote``, the weights stay on the Dask
    workers (``weights`` is ``None``) and each becomes a :class:`_RemotePiece`, shaped there as
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
            pieces.append(_Piece(renumber[rows], renumber[cols], weights))
    if remote is not None:
        remote.prepare()
    sides = parity[active] if bipartite else None
    if sides is not None and (sides.all() or not sides.any()):
        sides = None
    return _Edges(n_nodes, active, degrees[active], pieces, sides)


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


def _refuse_placeholders(blocks: Sequence[EdgeBlock]) -> None:
    """Refuse blocks whose weights are not in this process (a remote graph's placeholders)."""
    if any(block.weight.size == 0 and len(block.src) and len(block.dst) for block in blocks):
        raise GraphError(
            "this graph's weight blocks are not in this process (their weights stay on Dask "
            "workers); compute on the graph itself (spectral_partitions, ncut, measure), which "
            "runs its products on the workers."
        )


# ---------------------------------------------------------------------------------------------
# The weight blocks on a Dask cluster
# ---------------------------------------------------------------------------------------------


def _dask_client(scheduler: Any) -> tuple[Any, bool]:
    """``(client, owned)``: a ``distributed.Client`` on ``scheduler`` (an address: a new client,
    owned by the caller, who closes it) or ``scheduler`` itself when it is a client."""
    try:
        from distributed import Client
    except ImportError as error:
        raise ConfigError(
            "a Dask scheduler needs Dask's distributed package: pip install "
            "'cluster-tracking[dask]'."
        ) from error
    if isinstance(scheduler, Client):
        return scheduler, False
    if not isinstance(scheduler, str):
        raise ConfigError(
            f"scheduler must be a Dask scheduler's address (tcp://HOST:PORT) or a "
            f"distributed.Client, got {scheduler!r}."
        )
    try:
        return Client(scheduler, timeout="5s", set_as_default=False), True
    except OSError as error:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {scheduler!r} ({error}); start one with "
            "`dask scheduler` or pass the right address."
        ) from error


@dataclass
class _RemotePiece:
    """A :class:`_Piece` whose weights a :class:`_BlockHolder` on a Dask worker holds: its
    products and within-cluster weights are computed there, by the same code."""

    rows: np.ndarray
    cols: np.ndarray
    holder: Any  # the worker's _BlockHolder actor
    index: int  # the block's position in the graph
    symmetric: bool = False
    dense: bool = True

    def submit(self, method: str, args: Any, dtype: Any) -> Any:
        """Start ``method`` (``"matmul"``, ``"rmatmul"`` or ``"within"``) on the worker; the
        result of the returned future is what ``_Piece`` would give here."""
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
    file by :func:`~cluster_tracking.graph.lazy.map_block_weights`, and the products the
    eigensolver and the n-cut ask of them (numpy and scipy only: no torch on the worker)."""

    def __init__(self) -> None:
        self.layouts: dict[int, Any] = {}
        self.pieces: dict[int, _Piece] = {}

    def load(
        self, source: Any, skeleton: dict[int, EdgeBlock]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Map the blocks ``skeleton`` names; their row and column sums (float64)."""
        from cluster_tracking.graph.lazy import map_block_weights

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
            self.pieces[index] = _Piece(_NO_IDS, _NO_IDS, weights)
        self.layouts.clear()  # blocks with no piece (every node isolated)

    def product(self, index: int, method: str, x: np.ndarray, dtype: str) -> np.ndarray:
        with threadpool_limits(1):
            result: np.ndarray = getattr(self.pieces[index], method)(x, np.dtype(dtype))
            return result

    def within(
        self, index: int, row_ids: np.ndarray, col_ids: np.ndarray, n_flat: int, dtype: str
    ) -> np.ndarray:
        with threadpool_limits(1):
            return _dense_within(self.pieces[index], row_ids, col_ids, n_flat, np.dtype(dtype))

    def weights(self, index: int) -> np.ndarray | sp.csr_array:
        return self.pieces[index].weights


_NO_IDS = np.empty(0, dtype=np.int64)


def _running_workers(client: Any) -> dict[str, Any]:
    """The scheduler's workers that run tasks (``{address: info}``): a worker paused for memory
    runs none, so work sent to it would wait until it frees memory.

    Raises:
        ConfigError: the cluster has no workers.
        GraphError: every worker is paused.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        raise ConfigError(
            f"the Dask scheduler {client.scheduler.address} has no workers; start some with "
            "`dask worker`."
        )
    running = {address: info for address, info in workers.items() if info.get("status") != "paused"}
    if not running:
        raise GraphError(
            f"every worker of the Dask scheduler {client.scheduler.address} is paused (above "
            "its memory's pause threshold), so none would run this; give them more memory "
            "(dask worker --memory-limit) or free what they hold."
        )
    return running


#: Seconds a Dask worker may take to start holding blocks (an actor starts at once on a
#: worker that runs tasks; one that does not is paused, or busy with other work).
ACTOR_START_TIMEOUT = 60.0


def _started(future: Any, worker: str, client: Any) -> Any:
    """The actor ``future`` makes on ``worker``, or a clear error when the worker does not
    start it (a worker paused for memory never runs a task, and the call would wait forever)."""
    from distributed import TimeoutError as DaskTimeoutError

    try:
        return future.result(timeout=ACTOR_START_TIMEOUT)
    except (TimeoutError, DaskTimeoutError):
        status = client.scheduler_info(n_workers=-1)["workers"].get(worker, {}).get("status")
        raise GraphError(
            f"Dask worker {worker} did not start holding its weight blocks within "
            f"{ACTOR_START_TIMEOUT:.0f} s (its status: {status or 'gone'}); a paused worker is "
            "above its memory's pause threshold: give it more memory (dask worker "
            "--memory-limit) or free what it holds."
        ) from None


class _RemoteBlocks:
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
                _started(future, worker, client)
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
    ) -> _RemotePiece:
        """The piece of block ``index`` (shaped on its worker at :meth:`prepare`)."""
        position, holder = self.holder_of[index]
        self.specs.setdefault(position, []).append((index, transposed, keep_rows, keep_cols))
        return _RemotePiece(rows, cols, holder, index)

    def prepare(self) -> None:
        """Have every worker shape its blocks as the pieces asked for."""
        holders = {position: holder for position, holder in self.holder_of.values()}
        pending = [
            holders[position].prepare(self.specs.get(position, [])) for position in sorted(holders)
        ]
        for future in pending:
            future.result()
        self.specs.clear()

    def edges(self) -> _Edges:
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
            self._edges = _Edges(0, np.zeros(0, dtype=bool), np.zeros(0), [], None)
            if self.owned:
                self.client.close()


def _graph_edges(graph: WeightGraph) -> _Edges:
    """A block-built graph's edge pieces: on the Dask workers for a remote graph."""
    remote = getattr(graph, "remote", None)
    if remote is not None:
        return remote.edges()
    return _edges_from_blocks(graph.blocks, graph.n_nodes, graph.node_layer)


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
        rows, cols = block._group_pattern()
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


# ---------------------------------------------------------------------------------------------
# The eigensolver
# ---------------------------------------------------------------------------------------------


class _CrossOperator:
    """``B = D_1^-1/2 A_12 D_2^-1/2``, the cross block of a bipartite graph's ``D^-1/2 A D^-1/2``
    (sides 1 and 2), applied to blocks of vectors: ``B X`` and ``B^T Y``."""

    def __init__(self, edges: _Edges, dtype: Any) -> None:
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
    if calls and isinstance(calls[0][0], _RemotePiece):
        pending = [piece.submit(method, x, dtype) for piece, method, x in calls]
        for future in pending:
            yield future.result()
        return
    for piece, method, x in calls:
        yield getattr(piece, method)(x, dtype)


class _SymmetricOperator:
    """``N = D^-1/2 A D^-1/2`` applied to blocks of vectors."""

    def __init__(self, edges: _Edges, dtype: Any) -> None:
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

    def __init__(self, edges: _Edges, n_components: int, rng: np.random.Generator) -> None:
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
            theta, right, left = _block_krylov(
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
        theta, right, _ = _block_krylov(
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


def _dense_cross(edges: _Edges, first: np.ndarray, second: np.ndarray) -> np.ndarray:
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


def _block_krylov(
    forward: Any,
    backward: Any,
    size: int,
    start: np.ndarray,
    n_wanted: int,
    tol: float,
    *,
    bipartite: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Block Krylov with Rayleigh-Ritz for the ``n_wanted`` largest eigenpairs.

    Bipartite (``forward = B``, ``backward = B^T``, basis V on B's column side): the basis spans
    ``V, B^T B V, (B^T B)^2 V, ...``; the Ritz values of ``B^T B`` come from the Gram matrix of the
    images ``B V`` and are the squared singular values. General (``forward = N``): the basis spans
    ``V, N V, ...`` and the Ritz values come from ``V^T N V``. Returns ``(values descending,
    right vectors, left vectors or None)``; stops when the wanted values move less than ``tol``
    between two steps, or when the basis spans the whole space.
    """
    first = _orthonormal(start, None)
    first_images = forward(first)
    gram = first.T @ first_images if not bipartite else first_images.T @ first_images
    previous: np.ndarray | None = None
    max_basis = min(size, KRYLOV_MAX_BLOCKS * start.shape[1])
    # The basis and its images grow in place in column-major arrays of their largest width:
    # concatenating them at every step would hold two copies at once (on a billion-edge graph
    # the images alone can reach 1 GB), and the pages of columns not yet written are never
    # touched, so they take no memory.
    width = max(max_basis, first.shape[1])
    basis_store = np.empty((first.shape[0], width), order="F")
    images_store = np.empty((first_images.shape[0], width), order="F")
    filled = first.shape[1]
    basis_store[:, :filled] = first
    images_store[:, :filled] = first_images
    del first, first_images
    basis, images = basis_store[:, :filled], images_store[:, :filled]
    while True:
        values, coefficients = np.linalg.eigh((gram + gram.T) / 2.0)
        values, coefficients = values[::-1][:n_wanted], coefficients[:, ::-1][:, :n_wanted]
        theta = np.sqrt(np.maximum(values, 0.0)) if bipartite else values
        converged = previous is not None and float(np.max(np.abs(theta - previous))) <= tol
        if converged or basis.shape[1] >= max_basis:
            break
        previous = theta
        last = images[:, -start.shape[1] :]
        direction = backward(last) if bipartite else last
        block = _orthonormal(direction, basis, limit=max_basis - basis.shape[1])
        if block.shape[1] == 0:  # the basis spans an invariant subspace: the values are exact
            break
        new_images = forward(block)
        if bipartite:
            cross = images.T @ new_images
            corner = new_images.T @ new_images
        else:
            cross = basis.T @ new_images
            corner = block.T @ new_images
        gram = np.block([[gram, cross], [cross.T, corner]])
        grown = filled + block.shape[1]
        basis_store[:, filled:grown] = block
        images_store[:, filled:grown] = new_images
        filled = grown
        basis, images = basis_store[:, :filled], images_store[:, :filled]
    right = basis @ coefficients
    left = None
    if bipartite:
        left = (images @ coefficients) / np.maximum(theta, 1e-300)[None, :]
    return theta, right, left


def _orthonormal(
    block: np.ndarray, basis: np.ndarray | None, limit: int | None = None
) -> np.ndarray:
    """Orthonormal columns spanning ``block`` minus its part in ``basis``; columns that are
    (numerically) in the basis already are dropped."""
    norms = np.linalg.norm(block, axis=0)
    if basis is not None:
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            block = block - basis @ (basis.T @ block)
    q, r = np.linalg.qr(block)
    keep = np.abs(np.diag(r)) > 1e-10 * max(float(norms.max(initial=0.0)), 1e-300)
    q = q[:, keep]
    if limit is not None:
        q = q[:, :limit]
    return q


def _bipartition(adjacency: sp.csr_array) -> np.ndarray | None:
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


def _kmeans_restarts(
    points: np.ndarray,
    k: int,
    rng: np.random.Generator,
    n_init: int,
    max_iter: int = KMEANS_MAX_ITER,
    tol: float = 1e-4,
) -> np.ndarray:
    """Lloyd's k-means from ``n_init`` k-means++ starts, all restarts at once.

    A restart stops after ``max_iter`` iterations, when its labels no longer change, or when its
    centers move less than ``tol`` times the mean variance of the points (scikit-learn's
    criterion); the others go on. Returns the
    labels of every restart, shape ``[n_init, n_points]``; no cluster is left empty.

    Distances and means are computed in float32: k-means only proposes partitions (the n-cut,
    in float64, chooses among them), and single precision halves every product.
    """
    n = points.shape[0]
    points32 = np.ascontiguousarray(points, dtype=np.float32)
    norms32 = (points32**2).sum(axis=1)  # [n]
    threshold = tol * float(np.mean(np.var(points, axis=0)))
    centers = _kmeans_plus_plus(points32, norms32, k, rng, n_init)  # [R, k, d] float32
    # [-2 x, 1, |x|^2]: the points' side of every distance product (see _nearest_centers)
    augmented = np.concatenate([-2.0 * points32, np.ones((n, 1), np.float32), norms32[:, None]], 1)
    labels = np.full((n_init, n), -1, dtype=np.int64)
    active = np.arange(n_init)
    for _ in range(max_iter):
        current = centers[active]  # [A, k, d]
        new_labels, distances = _nearest_centers(augmented, current)
        new_centers, counts = _cluster_means(points32, new_labels, k)
        if counts.min() == 0:
            new_labels = _fill_empty_clusters(new_labels, distances, counts)
            new_centers, counts = _cluster_means(points32, new_labels, k)
        shift = ((new_centers - current) ** 2).sum(axis=(1, 2), dtype=np.float64)
        unchanged = (new_labels == labels[active]).all(axis=1)
        labels[active] = new_labels
        centers[active] = new_centers
        active = active[~(unchanged | (shift <= threshold))]
        if active.size == 0:
            break
    return labels


def _nearest_centers(augmented: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest center of every point for every restart: ``(labels [R, n], distances [R, k, n])``.

    ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2`` for all restarts is one product, of the centers
    ``[c, |c|^2, 1]`` with the points ``augmented`` (``[-2 x, 1, |x|^2]``, ``[n, d + 2]``).
    The argmin over the k centers is the costly part (numpy reduces a short last axis slowly),
    so it is a minimum instead: non-negative float32 values order like their int32 bit
    patterns, and with the center's index written into the lowest ``ceil(log2 k)`` mantissa
    bits, the minimum over the centers carries its own argmin. This moves a distance by less
    than ``2^bits`` units in the last place (relative ``k * 2^-22`` at most, ``2^-19`` for
    k = 12), below the float32 rounding of the product itself; ties go to the lower index, as
    with argmin. The sign bit is cleared too: rounding can make a distance of about 0 slightly
    negative, and its absolute value is as good. The returned distances carry these changes.
    Above :data:`PACKED_MAX_K` clusters, argmin.
    """
    n_restarts, k, d = centers.shape
    n = augmented.shape[0]
    flat = centers.reshape(-1, d)  # [R * k, d]
    augmented_centers = np.concatenate(
        [flat, (flat**2).sum(axis=1, keepdims=True), np.ones((flat.shape[0], 1), flat.dtype)],
        axis=1,
    )
    # no pass over the result to add the norms: they are in the product
    distances = (augmented_centers @ augmented.T).reshape(n_restarts, k, n)
    if k > PACKED_MAX_K:
        return np.abs(distances).argmin(axis=1), distances
    bits = max(1, (k - 1).bit_length())
    packed = distances.view(np.int32)
    packed &= np.int32(0x7FFFFFFF & ~((1 << bits) - 1))  # clear the sign bit and the low bits
    packed |= np.repeat(np.arange(k, dtype=np.int32), n).reshape(1, k, n)  # contiguous: fast
    labels = np.minimum.reduce(packed, axis=1) & np.int32((1 << bits) - 1)
    return labels, distances


def _kmeans_plus_plus(
    points: np.ndarray, norms: np.ndarray, k: int, rng: np.random.Generator, n_init: int
) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) for every restart: ``[R, k, d]``.

    Each new center is a point drawn with probability proportional to its squared distance to
    the closest center chosen so far (``closest``, ``[R, n]``, zero-padded to whole runs of
    :data:`_DRAW_RUN` points for :func:`_draw_proportional`)."""
    n = points.shape[0]
    centers = np.empty((n_init, k, points.shape[1]), dtype=points.dtype)
    centers[:, 0] = points[rng.integers(0, n, size=n_init)]
    padded = np.zeros((n_init, -(-n // _DRAW_RUN) * _DRAW_RUN), dtype=points.dtype)
    closest = padded[:, :n]
    closest[:] = _sq_distances(points, norms, centers[:, 0])
    for c in range(1, k):
        chosen = _draw_proportional(padded, n, rng)
        centers[:, c] = points[chosen]
        np.minimum(closest, _sq_distances(points, norms, centers[:, c]), out=closest)
    return centers


#: :func:`_draw_proportional` sums the weights in runs of this many points.
_DRAW_RUN = 64


def _draw_proportional(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """One index below ``n`` per row of ``weights`` (``[R, m]``, non-negative, zero from column
    ``n`` on, ``m`` a multiple of :data:`_DRAW_RUN`), drawn with probability proportional to its
    weight; uniformly where a row is all zeros.

    Inverse-transform sampling in two levels: a cumulative sum over the sums of runs of
    :data:`_DRAW_RUN` points picks a run, and one within that run picks the point, so the
    sequential cumulative sum covers ``m / 64 + 64`` values per row instead of ``m``.
    """
    n_rows = weights.shape[0]
    rows = np.arange(n_rows)
    runs = weights.reshape(n_rows, -1, _DRAW_RUN)  # [R, n_runs, run]
    run_sums = runs.sum(axis=2, dtype=np.float64)  # [R, n_runs]
    cumulative = np.cumsum(run_sums, axis=1)
    totals = cumulative[:, -1]
    draws = rng.uniform(0.0, 1.0, n_rows) * totals
    run = np.minimum((cumulative < draws[:, None]).sum(axis=1), run_sums.shape[1] - 1)
    remaining = draws - (cumulative[rows, run] - run_sums[rows, run])
    inside = np.cumsum(runs[rows, run], axis=1, dtype=np.float64)  # [R, run]
    offset = np.minimum((inside < remaining[:, None]).sum(axis=1), _DRAW_RUN - 1)
    chosen = np.minimum(run * _DRAW_RUN + offset, n - 1)
    uniform = rng.integers(0, n, size=n_rows)
    return np.where(totals > 0, chosen, uniform)


def _sq_distances(points: np.ndarray, norms: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distances ``|x - c|^2`` of every point to one center per restart: ``[R, n]``
    (clipped at 0, where rounding would make them negative)."""
    distances = centers @ (-2.0 * points.T)
    distances += norms[None, :]
    distances += (centers**2).sum(axis=1)[:, None]
    return np.maximum(distances, 0.0, out=distances)


def _cluster_means(points: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each cluster's points for every restart, ``[R, k, d]``, and the cluster sizes,
    ``[R, k]`` (an empty cluster's mean is 0).

    The sums are one sparse product: ``S^T @ points`` with ``S`` the ``[n, R * k]`` one-hot
    matrix of every restart's labels (point i's row has a 1 in column ``r * k + labels[r, i]``
    for each restart r, in increasing order, so its CSR arrays are read off the labels).
    """
    n_restarts, n = labels.shape
    columns = (labels + k * np.arange(n_restarts)[:, None]).T.ravel()  # [n * R], row-major
    counts = np.bincount(columns, minlength=n_restarts * k).reshape(n_restarts, k)
    one_hot = sp.csr_array(
        (
            np.ones(columns.size, dtype=points.dtype),
            columns,
            np.arange(0, columns.size + 1, n_restarts),
        ),
        shape=(n, n_restarts * k),
    )
    sums = (one_hot.T @ points).reshape(n_restarts, k, -1)  # [R, k, d]
    return sums / np.maximum(counts, 1).astype(points.dtype)[:, :, None], counts


def _fill_empty_clusters(
    labels: np.ndarray, distances: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Give every empty cluster the point farthest from its own center (per restart), given
    ``distances`` (``[R, k, n]``) and the cluster sizes ``counts`` (``[R, k]``)."""
    n_init, n = labels.shape
    counts = counts.copy()
    labels = labels.copy()
    own = distances[np.arange(n_init)[:, None], labels, np.arange(n)[None, :]].astype(np.float64)
    for r in np.flatnonzero(counts.min(axis=1) == 0):
        for cluster in np.flatnonzero(counts[r] == 0):
            movable = counts[r][labels[r]] > 1
            candidates = np.where(movable, own[r], -np.inf)
            point = int(np.argmax(candidates))
            counts[r, labels[r, point]] -= 1
            labels[r, point] = cluster
            counts[r, cluster] += 1
            own[r, point] = 0.0
    return labels


def _ncuts_of_pieces(edges: _Edges, labels: np.ndarray, k: int, dtype: Any) -> np.ndarray:
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
    edges: _Edges, labels: np.ndarray, k: int, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``(vol, assoc)`` of every cluster of every row of ``labels`` (``[R, n_active]``, values
    in ``0..k-1``), both ``[R * k]`` (row r's cluster c at ``r * k + c``).

    ``assoc(C, C) = sum of A[i, j] over i, j in C`` (each edge twice). For a dense piece W, the
    within-cluster weight of every restart at once is one product ``onehot(row labels)^T W``
    (``[R * k, columns]``: each column of W summed by the clusters of its rows, in every restart),
    read at each column's own cluster. The one-hot matrix is sparse (R ones per row of W), so the
    product costs ``R`` passes over W where a dense one would cost ``R * k``; ``dtype=float32``
    halves it again where the values only rank the restarts. A large piece held in another dtype
    is read in row chunks (:meth:`_Piece.row_chunks`).
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
        if isinstance(piece, _RemotePiece):
            pending.append((factor, piece.submit("within", (row_ids, col_ids, n_flat), dtype)))
            continue
        if piece.dense:
            within += factor * _dense_within(piece, row_ids, col_ids, n_flat, dtype)
            continue
        i, j, w = piece.edge_list()
        for r in range(n_restarts):
            source = row_ids[r, i]
            same = source == col_ids[r, j]
            within += factor * np.bincount(source[same], weights=w[same], minlength=n_flat)
    for factor, future in pending:
        within += factor * future.result()
    return volumes, within


def _dense_within(
    piece: _Piece, row_ids: np.ndarray, col_ids: np.ndarray, n_flat: int, dtype: Any
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
        edges = _graph_edges(graph)
        active = labels[edges.active]
        if np.any(active < 0):
            raise ConfigError("labels leaves a node with edges unclustered (-1).")
        volumes, within = _cluster_weights(edges, active[None, :], k, np.float64)
        return np.maximum(volumes - within, 0.0), volumes
    adjacency = _as_csr(graph)
    volumes, within = _within_cluster(adjacency, np.asarray(labels), k)
    return np.maximum(volumes - within, 0.0), volumes


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


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_preset(preset: str) -> str:
    if preset not in ("default", "filan2021"):
        raise ConfigError(f"preset must be 'default' or 'filan2021', got {preset!r}.")
    return preset


def _check_k(k: int, n_active: int, n_nodes: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k must be an integer >= 2 (the number of clusters), got {k!r}.")
    if k > n_active:
        removed = n_nodes - n_active
        detail = f" ({removed} zero-degree nodes removed)" if removed else ""
        raise ConfigError(
            f"k={k} clusters asked of a graph with only {n_active} connected nodes{detail}; "
            f"choose k <= {n_active}."
        )
    return int(k)
