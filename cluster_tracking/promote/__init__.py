"""Promoting clusterability (Filan et al. 2021, section 5): the spectral regulariser, the ReLU
weight normaliser and the clusterable initialisation.

* :mod:`~cluster_tracking.promote.regularizer`: ``SpectralRegularizer``, the penalty, built from
  :mod:`~cluster_tracking.promote.live_blocks` (edge matrices from the live parameters),
  :mod:`~cluster_tracking.promote.operators` (the normalised adjacency, dense eigenvalues, the
  Hellmann-Feynman gradient), :mod:`~cluster_tracking.promote.krylov` (block Krylov eigenpairs
  in torch) and :mod:`~cluster_tracking.promote.eigenpairs` (eigenvectors followed across
  optimiser steps);
* :mod:`~cluster_tracking.promote.normalization`: ``ReLUWeightNormalizer``;
* :mod:`~cluster_tracking.promote.clusterable_init`: ``clusterable_init_``.
"""
