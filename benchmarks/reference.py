"""The reference pipeline: the paper's method with scikit-learn, as Filan et al. (2021) ran it.

``SpectralClustering(affinity="precomputed", eigen_solver="arpack", assign_labels="kmeans")`` on the
sparse adjacency (int32 indices, as scikit-learn requires), ``n_init=25`` restarts (100 above 2000
nodes), chosen by k-means inertia. This module imports scikit-learn and scipy only, so a worker
process running it does not pay for importing torch.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import SpectralClustering
from threadpoolctl import threadpool_limits


def as_int32_csr(adjacency: sp.sparray | sp.spmatrix) -> sp.csr_matrix:
    """A ``csr_matrix`` with int32 indices and indptr (scikit-learn refuses int64 ones)."""
    matrix = sp.csr_matrix(adjacency, dtype=np.float64)
    matrix.indices = matrix.indices.astype(np.int32)
    matrix.indptr = matrix.indptr.astype(np.int32)
    return matrix


def reference_n_init(n_nodes: int) -> int:
    """The paper's k-means restarts: 25, or 100 above 2000 nodes."""
    return 100 if n_nodes > 2000 else 25


def reference_labels(matrix: sp.csr_matrix, k: int, seed: int, pin: bool = True) -> np.ndarray:
    """Cluster labels from scikit-learn's spectral clustering (one thread when ``pin``)."""
    model = SpectralClustering(
        n_clusters=k,
        affinity="precomputed",
        eigen_solver="arpack",
        assign_labels="kmeans",
        n_init=reference_n_init(matrix.shape[0]),
        random_state=seed,
    )
    if pin:
        with threadpool_limits(1):
            return np.asarray(model.fit(matrix).labels_)
    return np.asarray(model.fit(matrix).labels_)
