"""Spectral clustering of weight graphs and the normalised cut (Filan et al. 2021, section 2).

One idea per module:

- :mod:`~cluster_tracking.spectral.partition`: the partition procedures (the default one and the
  published ``filan2021`` one), :func:`spectral_partition` and the n-cuts of null networks;
- :mod:`~cluster_tracking.spectral.cuts`: the n-cut, cut and volume of a partition;
- :mod:`~cluster_tracking.spectral.eigensolver`: the smallest eigenpairs of the normalised
  Laplacian, densely or by block Krylov, through the graph's edge pieces;
- :mod:`~cluster_tracking.spectral.krylov`: the block-Krylov solver itself (:func:`block_krylov`);
- :mod:`~cluster_tracking.spectral.kmeans`: k-means on the embedding, all restarts at once;
- :mod:`~cluster_tracking.spectral.adjacency`: a graph or an adjacency as edge pieces, and the
  two-colouring of a bipartite graph (:func:`bipartition`).

How it is fast (``benchmarks/`` measures it against scikit-learn on the same graphs):

- A :class:`~cluster_tracking.graph.types.WeightGraph` is multiplied through its weight blocks
  (dense BLAS products, one per layer; :mod:`cluster_tracking.graph.edges`), not through its
  sparse adjacency; null networks are partitioned straight from their shuffled blocks
  (:func:`block_ncuts`), never assembling an adjacency.
- Large graphs are embedded by block Krylov (block Lanczos with Rayleigh-Ritz) in float32 until
  the eigenvalues settle to :data:`~cluster_tracking.spectral.partition.PARTITION_TOL`
  (:data:`~cluster_tracking.spectral.partition.LARGE_PARTITION_TOL` above
  :data:`~cluster_tracking.spectral.partition.LARGE_GRAPH_NODES` nodes): k-means needs the
  subspace, not ten digits. The eigenvalues a partition reports are then refined in float64 to
  :data:`~cluster_tracking.spectral.eigensolver.EIGENVALUE_TOL`.
- k-means proposes partitions and the n-cut chooses: all restarts run at once in float32,
  Lloyd's iterations are capped (:data:`~cluster_tracking.spectral.kmeans.KMEANS_MAX_ITER`), the
  nearest center of every point in every restart is one product and one integer minimum, and the
  n-cuts of all restarts come from one product of each weight block with the restarts' one-hot
  labels.

Beyond one machine: a graph whose weight blocks stay on the workers of a Dask cluster
(``safetensors_graph(..., scheduler=...)``; :mod:`cluster_tracking.graph.remote`, one Dask actor
per worker) has edge pieces whose products run on the worker that holds them, by the same code,
sent to all workers at once and summed here in block order: the same labels, n-cut and
eigenvalues as the local path for the same seed.

Numpy and scipy only (no torch).
"""

from cluster_tracking.spectral.adjacency import bipartition
from cluster_tracking.spectral.cuts import cluster_cuts, ncut
from cluster_tracking.spectral.eigensolver import laplacian_embedding
from cluster_tracking.spectral.krylov import block_krylov
from cluster_tracking.spectral.partition import (
    CLUSTERING_PROCEDURES,
    DEFAULT_N_INIT,
    SpectralPartition,
    StageCallback,
    block_ncuts,
    child_seed,
    filan2021_labels,
    filan2021_n_init,
    laplacian_eigenvalues,
    spectral_partition,
    spectral_partitions,
)

__all__ = [
    "CLUSTERING_PROCEDURES",
    "DEFAULT_N_INIT",
    "SpectralPartition",
    "StageCallback",
    "bipartition",
    "block_krylov",
    "block_ncuts",
    "child_seed",
    "cluster_cuts",
    "filan2021_labels",
    "filan2021_n_init",
    "laplacian_eigenvalues",
    "laplacian_embedding",
    "ncut",
    "spectral_partition",
    "spectral_partitions",
]
