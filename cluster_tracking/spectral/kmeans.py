"""k-means on the spectral embedding: all restarts at once, in float32.

k-means only proposes partitions (the n-cut, in float64, chooses among them), so Lloyd's
iterations are capped at :data:`KMEANS_MAX_ITER`, distances and means are computed in single
precision, and the nearest center of every point in every restart is one product and one integer
minimum (:func:`_nearest_centers`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: k-means with at most this many clusters finds nearest centers by a packed integer minimum
#: (:func:`_nearest_centers`); more clusters use argmin.
PACKED_MAX_K = 256


#: Lloyd iterations per restart at most: k-means only proposes partitions and the n-cut picks
#: one; on weight graphs the n-cut stops improving after a few iterations, long before the
#: inertia converges (benchmarks/: 5 to 10 iterations reach lower n-cuts than 300).
KMEANS_MAX_ITER = 10


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
