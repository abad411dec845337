"""Spectral clustering of weight graphs and the normalised cut (Filan et al. 2021, section 2).

The partition follows Shi & Malik / von Luxburg's normalised spectral clustering, as scikit-learn's
``SpectralClustering(affinity="precomputed", assign_labels="kmeans")`` does:

1. drop zero-degree nodes (they belong to no cluster and are reported);
2. embed each node with the eigenvectors of the k smallest eigenvalues of the normalised Laplacian
   ``L = I - D^-1/2 A D^-1/2``, scaled by ``D^-1/2`` (the random-walk eigenvectors);
3. run k-means on the embedding from many random starts and keep the partition whose **n-cut**
   (the quantity we report) is lowest, where scikit-learn keeps the lowest k-means inertia.

The n-cut of a partition into clusters ``C_1..C_k`` is ``sum_c cut(C_c, rest) / vol(C_c)`` with
``vol(C) = sum of the degrees of C's nodes``; lower means more clusterable.

A chain of layers is a bipartite graph (even layers against odd ones), so ``D^-1/2 A D^-1/2`` has
the block form ``[[0, B], [B^T, 0]]`` and its top eigenvectors are ``[u; v] / sqrt(2)`` for the top
singular triplets ``(u, sigma, v)`` of ``B``: a much cheaper and better-conditioned problem than the
interior eigenvalues scikit-learn asks ARPACK for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph import WeightGraph

#: Graphs up to this many (non-isolated) nodes are embedded with a dense eigensolver.
DENSE_MAX_NODES = 600
#: Default number of k-means restarts (the best n-cut among them is kept).
DEFAULT_N_INIT = 25


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
        graph: a :class:`~cluster_tracking.graph.WeightGraph` or a symmetric adjacency matrix.
        labels: cluster of every node, in node order (shape ``[n_nodes]``, integers). Nodes
            labelled ``-1`` belong to no cluster; they must have zero degree.

    Returns:
        The n-cut, between 0 (no edge between clusters) and the number of clusters. A cluster of
        zero volume contributes nothing.
    """
    adjacency = _as_csr(graph)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != adjacency.shape[0]:
        raise ConfigError(
            f"labels has shape {labels.shape} but the graph has {adjacency.shape[0]} nodes; "
            "pass one label per node, in node order."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError("labels must be integers (cluster ids, -1 for unclustered nodes).")
    clustered = labels >= 0
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    if np.any(degrees[~clustered] > 0):
        raise ConfigError(
            "labels leaves a node with edges unclustered (-1); only zero-degree nodes may be -1."
        )
    if not clustered.any():
        return 0.0
    compact = np.unique(labels[clustered], return_inverse=True)[1]
    active = adjacency[clustered][:, clustered]  # the unclustered nodes have no edge
    n_clusters = int(compact.max()) + 1
    return float(_ncuts_of_restarts(active, degrees[clustered], compact[None, :], n_clusters)[0])


def spectral_partition(
    graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray,
    k: int = 12,
    *,
    seed: int | np.random.SeedSequence | None = None,
    n_init: int = DEFAULT_N_INIT,
) -> SpectralPartition:
    """Partition a weight graph into ``k`` clusters by normalised spectral clustering.

    Zero-degree nodes are removed first and labelled ``-1``. Of ``n_init`` k-means restarts on the
    spectral embedding, the one with the lowest n-cut is kept. Clusters are numbered in the order
    of their first node, so the same partition always gets the same labels. The result is
    deterministic for a given ``seed``.

    Args:
        graph: a :class:`~cluster_tracking.graph.WeightGraph` or a symmetric adjacency matrix.
        k: number of clusters (the paper uses 12).
        seed: seed of the k-means starts and of the eigensolver's start vector.
        n_init: number of k-means restarts.
    """
    return spectral_partitions(graph, [k], seed=seed, n_init=n_init)[0]


def spectral_partitions(
    graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray,
    ks: Sequence[int],
    *,
    seed: int | np.random.SeedSequence | None = None,
    n_init: int = DEFAULT_N_INIT,
) -> list[SpectralPartition]:
    """:func:`spectral_partition` for several k at once, sharing one eigendecomposition.

    The eigenvectors of the k smallest Laplacian eigenvalues are the first k of those for the
    largest k, so one embedding serves every k. k-means for each k draws from its own stream,
    derived from ``seed`` and k, so a k's partition does not depend on which other k are asked.
    """
    adjacency = _as_csr(graph)
    n_init = _check_positive_int(n_init, "n_init")
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    connected = degrees > 0
    n_active = int(connected.sum())
    ks = [_check_k(k, n_active, adjacency.shape[0]) for k in ks]
    if not ks:
        raise ConfigError("at least one k is needed.")

    active = adjacency[connected][:, connected] if n_active < adjacency.shape[0] else adjacency
    active_degrees = degrees[connected]
    eigenvalues, embedding = laplacian_embedding(
        active, max(ks), degrees=active_degrees, rng=np.random.default_rng(child_seed(root, 0))
    )
    partitions = []
    for k in ks:
        rng = np.random.default_rng(child_seed(root, 1, k))
        candidates = _kmeans_restarts(embedding[:, :k], k, rng, n_init)
        ncuts = _ncuts_of_restarts(active, active_degrees, candidates, k)
        best = int(np.argmin(ncuts))
        labels = np.full(adjacency.shape[0], -1, dtype=np.int64)
        labels[connected] = _canonical_labels(candidates[best])
        partitions.append(
            SpectralPartition(
                labels=labels,
                ncut=float(ncuts[best]),
                k=k,
                eigenvalues=eigenvalues[:k],
                n_isolated=adjacency.shape[0] - n_active,
            )
        )
    return partitions


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
    adjacency = _as_csr(graph)
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    connected = degrees > 0
    active = adjacency[connected][:, connected]
    n = min(n, int(connected.sum()))
    values, _ = laplacian_embedding(
        active, n, degrees=degrees[connected], rng=np.random.default_rng(child_seed(root, 0))
    )
    return values


def laplacian_embedding(
    adjacency: sp.csr_array,
    n_components: int,
    *,
    degrees: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_components`` smallest eigenpairs of the normalised Laplacian of a graph.

    The graph must have no zero-degree node. Returns ``(eigenvalues, embedding)``: the eigenvalues
    of ``L = I - D^-1/2 A D^-1/2`` in ascending order, shape ``[n_components]``, and the node
    embedding ``D^-1/2 V`` (V the eigenvectors), shape ``[n_nodes, n_components]``, as
    scikit-learn's ``spectral_embedding(norm_laplacian=True, drop_first=False)`` returns up to sign
    and rotation within repeated eigenvalues.
    """
    rng = np.random.default_rng() if rng is None else rng
    if degrees is None:
        degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    inv_sqrt_degree = 1.0 / np.sqrt(degrees)
    n = adjacency.shape[0]
    sides = _bipartition(adjacency)
    if sides is not None:
        top, vectors = _bipartite_top_eigenpairs(
            adjacency, inv_sqrt_degree, sides, n_components, rng
        )
    else:
        normalised = _normalised_adjacency(adjacency, inv_sqrt_degree)
        top, vectors = _symmetric_top_eigenpairs(normalised, n_components, rng)
    order = np.argsort(-top, kind="stable")
    eigenvalues = np.clip(1.0 - top[order], 0.0, 2.0)
    embedding = vectors[:, order] * inv_sqrt_degree[:, None]
    assert embedding.shape == (n, n_components)
    return eigenvalues, embedding


def _normalised_adjacency(adjacency: sp.csr_array, inv_sqrt_degree: np.ndarray) -> sp.csr_array:
    """``D^-1/2 A D^-1/2``."""
    scale = sp.dia_array((inv_sqrt_degree[None, :], [0]), shape=adjacency.shape)
    return sp.csr_array(scale @ adjacency @ scale)


def _symmetric_top_eigenpairs(
    normalised: sp.csr_array, n_components: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Largest eigenpairs of a symmetric matrix with spectrum in [-1, 1]."""
    n = normalised.shape[0]
    if n <= DENSE_MAX_NODES or n_components >= n - 1:
        values, vectors = scipy.linalg.eigh(
            normalised.toarray(), subset_by_index=[n - n_components, n - 1]
        )
        return values, vectors
    # Shift by the identity so the wanted eigenvalues are the largest in magnitude (in [0, 2]).
    shifted = normalised + sp.eye_array(n, format="csr")
    values, vectors = spla.eigsh(
        shifted, k=n_components, which="LA", v0=rng.uniform(-1.0, 1.0, n), tol=1e-10
    )
    return values - 1.0, vectors


def _bipartite_top_eigenpairs(
    adjacency: sp.csr_array,
    inv_sqrt_degree: np.ndarray,
    sides: np.ndarray,
    n_components: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Top eigenpairs of ``D^-1/2 A D^-1/2`` for a bipartite graph, from the SVD of its cross block.

    With nodes split into sides E and O, ``D^-1/2 A D^-1/2 = [[0, B], [B^T, 0]]`` where
    ``B = D_E^-1/2 A_EO D_O^-1/2``; for each singular triplet ``(u, s, v)`` of B,
    ``[u; v] / sqrt 2`` is an eigenvector with eigenvalue ``s`` (and ``[u; -v] / sqrt 2`` one with
    eigenvalue ``-s``).
    """
    even = np.flatnonzero(~sides)
    odd = np.flatnonzero(sides)
    cross = sp.csr_array(adjacency[even][:, odd])
    scale_even = sp.dia_array((inv_sqrt_degree[even][None, :], [0]), shape=(len(even), len(even)))
    scale_odd = sp.dia_array((inv_sqrt_degree[odd][None, :], [0]), shape=(len(odd), len(odd)))
    block = sp.csr_array(scale_even @ cross @ scale_odd)
    small_side = min(block.shape)
    if small_side <= max(DENSE_MAX_NODES // 2, n_components + 1) or n_components >= small_side:
        u, s, vt = scipy.linalg.svd(block.toarray(), full_matrices=False)
        u, s, vt = u[:, :n_components], s[:n_components], vt[:n_components]
    else:
        v0 = rng.uniform(-1.0, 1.0, small_side)
        u, s, vt = spla.svds(block, k=n_components, v0=v0, tol=1e-8)
    if s.shape[0] < n_components:
        # Fewer singular values than wanted (a tiny side): pad with eigenvalue-0 directions of the
        # form [u; -v] / sqrt 2 is not possible without more vectors, so fall back to dense.
        normalised = _normalised_adjacency(adjacency, inv_sqrt_degree)
        values, vectors = scipy.linalg.eigh(normalised.toarray())
        return values[-n_components:], vectors[:, -n_components:]
    vectors = np.zeros((adjacency.shape[0], n_components))
    vectors[even] = u / np.sqrt(2.0)
    vectors[odd] = vt.T / np.sqrt(2.0)
    return s, vectors


def _bipartition(adjacency: sp.csr_array) -> np.ndarray | None:
    """Two-colouring of a graph (True = second side), or None when it has an odd cycle."""
    n = adjacency.shape[0]
    n_components, component = csgraph.connected_components(adjacency, directed=False)
    side = np.zeros(n, dtype=bool)
    for c in range(n_components):
        root = int(np.flatnonzero(component == c)[0])
        order, predecessors = csgraph.breadth_first_order(
            adjacency, root, directed=False, return_predecessors=True
        )
        for node in order[1:]:
            side[node] = not side[predecessors[node]]
    coo = adjacency.tocoo()
    if np.any(side[coo.row] == side[coo.col]):
        return None
    if side.all() or not side.any():
        return None
    return side


def _kmeans_restarts(
    points: np.ndarray,
    k: int,
    rng: np.random.Generator,
    n_init: int,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> np.ndarray:
    """Lloyd's k-means from ``n_init`` k-means++ starts, all restarts at once.

    A restart stops when its labels no longer change or its centers move less than ``tol`` times
    the mean variance of the points (scikit-learn's criterion); the others go on. Returns the
    labels of every restart, shape ``[n_init, n_points]``; no cluster is left empty.
    """
    n, _ = points.shape
    norms = (points**2).sum(axis=1)  # [n]
    threshold = tol * float(np.mean(np.var(points, axis=0)))
    centers = _kmeans_plus_plus(points, norms, k, rng, n_init)
    labels = np.full((n_init, n), -1, dtype=np.int64)
    active = np.arange(n_init)
    for _ in range(max_iter):
        distances = _sq_distances(points, norms, centers[active])  # [R, n, k]
        new_labels = _fill_empty_clusters(distances.argmin(axis=2), distances, k)
        new_centers = _cluster_means(points, new_labels, k)
        shift = ((new_centers - centers[active]) ** 2).sum(axis=(1, 2))
        unchanged = (new_labels == labels[active]).all(axis=1)
        labels[active] = new_labels
        centers[active] = new_centers
        active = active[~(unchanged | (shift <= threshold))]
        if active.size == 0:
            break
    return labels


def _kmeans_plus_plus(
    points: np.ndarray, norms: np.ndarray, k: int, rng: np.random.Generator, n_init: int
) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) for every restart: ``[R, k, d]``."""
    n = points.shape[0]
    centers = np.empty((n_init, k, points.shape[1]))
    centers[:, 0] = points[rng.integers(0, n, size=n_init)]
    closest = _sq_distances(points, norms, centers[:, :1])[:, :, 0]  # [R, n]
    for c in range(1, k):
        weights = np.maximum(closest, 0.0)
        cumulative = np.cumsum(weights, axis=1)
        totals = cumulative[:, -1]
        draws = rng.uniform(0.0, 1.0, n_init) * totals
        chosen = (cumulative < draws[:, None]).sum(axis=1)
        # a restart whose points all coincide with chosen centers draws uniformly
        uniform = rng.integers(0, n, size=n_init)
        chosen = np.where(totals > 0, np.minimum(chosen, n - 1), uniform)
        centers[:, c] = points[chosen]
        closest = np.minimum(closest, _sq_distances(points, norms, centers[:, c : c + 1])[:, :, 0])
    return centers


def _sq_distances(points: np.ndarray, norms: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distances ``|x - c|^2`` of every point to every center: ``[R, n, m]``."""
    cross = points @ centers.transpose(0, 2, 1)  # [R, n, m]
    return norms[None, :, None] - 2.0 * cross + (centers**2).sum(axis=2)[:, None, :]


def _cluster_means(points: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean of each cluster's points for every restart: ``[R, k, d]``."""
    one_hot = (labels[:, :, None] == np.arange(k)[None, None, :]).astype(points.dtype)  # [R, n, k]
    sums = one_hot.transpose(0, 2, 1) @ points  # [R, k, d]
    counts = one_hot.sum(axis=1)  # [R, k]
    return sums / np.maximum(counts, 1.0)[:, :, None]


def _fill_empty_clusters(labels: np.ndarray, distances: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the point farthest from its own center (per restart)."""
    n_init, n = labels.shape
    counts = np.stack([np.bincount(row, minlength=k) for row in labels])
    if counts.min() > 0:
        return labels
    labels = labels.copy()
    own = distances[np.arange(n_init)[:, None], np.arange(n)[None, :], labels]  # [R, n]
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


def _ncuts_of_restarts(
    adjacency: sp.csr_array, degrees: np.ndarray, labels: np.ndarray, k: int
) -> np.ndarray:
    """n-cut of each row of ``labels`` (shape ``[R, n]``, values in ``0..k-1``): ``[R]``.

    ``cut(C) = vol(C) - assoc(C, C)``, where ``assoc(C, C)`` sums ``A[i, j]`` over ordered pairs
    of nodes inside C (twice each edge of the upper triangle), so
    ``ncut = sum_C (vol(C) - assoc(C, C)) / vol(C)``.
    """
    upper = sp.triu(adjacency, k=1, format="coo")
    rows, cols, weights = upper.row, upper.col, upper.data
    ncuts = np.empty(labels.shape[0])
    for r, row_labels in enumerate(labels):
        volumes = np.bincount(row_labels, weights=degrees, minlength=k)
        source = row_labels[rows]
        same = source == row_labels[cols]
        within = 2.0 * np.bincount(source[same], weights=weights[same], minlength=k)
        cut = np.maximum(volumes - within, 0.0)
        ncuts[r] = np.divide(cut, volumes, out=np.zeros_like(cut), where=volumes > 0).sum()
    return ncuts


def cluster_cuts(
    graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(cut, volume)`` of each cluster ``0..k-1`` of a labelling (``-1`` nodes ignored)."""
    adjacency = _as_csr(graph)
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    labels = np.asarray(labels)
    clustered = labels >= 0
    volumes = np.bincount(labels[clustered], weights=degrees[clustered], minlength=k)
    coo = adjacency.tocoo()
    same = (labels[coo.row] == labels[coo.col]) & (labels[coo.row] >= 0)
    within = np.bincount(labels[coo.row][same], weights=coo.data[same], minlength=k)
    return np.maximum(volumes - within, 0.0), volumes


def _as_csr(graph: WeightGraph | sp.sparray | sp.spmatrix | np.ndarray) -> sp.csr_array:
    adjacency = graph.adjacency if isinstance(graph, WeightGraph) else graph
    adjacency = sp.csr_array(adjacency, dtype=np.float64)
    if adjacency.shape[0] != adjacency.shape[1]:
        raise ConfigError(f"the adjacency must be square, got shape {adjacency.shape}.")
    return adjacency


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


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
