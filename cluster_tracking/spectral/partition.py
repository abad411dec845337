"""Spectral clustering of weight graphs (Filan et al. 2021, section 2): the partition procedures.

The partition follows Shi & Malik / von Luxburg's normalised spectral clustering, as scikit-learn's
``SpectralClustering(affinity="precomputed", assign_labels="kmeans")`` does:

1. drop zero-degree nodes (they belong to no cluster and are reported);
2. embed each node with the eigenvectors of the k smallest eigenvalues of the normalised Laplacian
   ``L = I - D^-1/2 A D^-1/2``, scaled by ``D^-1/2`` (the random-walk eigenvectors;
   :mod:`~cluster_tracking.spectral.eigensolver`);
3. run k-means on the embedding from many random starts (:mod:`~cluster_tracking.spectral.kmeans`)
   and keep the partition whose **n-cut** (:mod:`~cluster_tracking.spectral.cuts`, the quantity we
   report) is lowest, where scikit-learn keeps the lowest k-means inertia.

Under ``preset="filan2021"`` the partition is scikit-learn's own ``SpectralClustering(...,
eigen_solver="arpack")`` as the published code of Filan et al. calls it (:func:`filan2021_labels`):
ARPACK eigenvectors, k-means to convergence, the restart of lowest inertia kept, 25 restarts (100
above 2,000 nodes). Its n-cuts are higher and its null spread wider than the default's; the
preset exists so that numbers can be set beside the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.edges import GraphEdges, edges_from_blocks
from cluster_tracking.graph.types import EdgeBlock, WeightGraph
from cluster_tracking.spectral.adjacency import _edges_of
from cluster_tracking.spectral.cuts import _ncuts_of_pieces
from cluster_tracking.spectral.eigensolver import EIGENVALUE_TOL, _EigenSolver
from cluster_tracking.spectral.kmeans import KMEANS_MAX_ITER, _kmeans_restarts

#: Default number of k-means restarts (the best n-cut among them is kept), as the paper's 25.
#: Chosen by n-cut they reach lower n-cuts than scikit-learn's 25 chosen by inertia
#: (benchmarks/; on weight graphs the two criteria often disagree), and 20 would not always.
DEFAULT_N_INIT = 25


#: Tolerance on the eigenvalues of the embedding that seeds k-means (benchmarks/: the n-cuts
#: reached are the same at 1e-3, with one Krylov step more), for graphs of up to
#: :data:`LARGE_GRAPH_NODES` active nodes.
PARTITION_TOL = 3e-3


#: Above this many active nodes the embedding is solved to :data:`LARGE_PARTITION_TOL`: larger
#: graphs have narrower eigengaps, so the same eigenvalue tolerance leaves a looser subspace
#: (benchmarks/: on an 8,000-node MLP, n-cut 9.600 at 3e-3, 9.589 at 1e-4, scikit-learn 9.587).
LARGE_GRAPH_NODES = 2000


LARGE_PARTITION_TOL = 1e-4


#: The ``filan2021`` preset's k-means restarts: :data:`FILAN2021_N_INIT`, or
#: :data:`FILAN2021_LARGE_N_INIT` on graphs of more than :data:`FILAN2021_LARGE_NODES`
#: non-isolated nodes (the published code's ``cluster_net``).
FILAN2021_N_INIT = 25


FILAN2021_LARGE_N_INIT = 100


FILAN2021_LARGE_NODES = 2000


#: Which clustering procedure each preset runs (recorded in ``report.config["clustering"]``).
CLUSTERING_PROCEDURES = {
    "default": (
        f"cluster-tracking: block-Krylov embedding in float32 to an eigenvalue tolerance of "
        f"{PARTITION_TOL:g} ({LARGE_PARTITION_TOL:g} above {LARGE_GRAPH_NODES} active nodes), "
        f"k-means capped at {KMEANS_MAX_ITER} iterations, the restart of lowest n-cut kept"
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
    edges: GraphEdges,
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


def _sparse_adjacency(edges: GraphEdges) -> sp.csr_array:
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
    edges: GraphEdges,
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
    edges = edges_from_blocks(blocks, n_nodes, node_layer)
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
