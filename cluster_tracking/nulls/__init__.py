"""Null models: networks with the same weights but none of the structure (Filan et al. 2021, §3).

An observed n-cut means little alone: a network's widths and weight distribution already set what
n-cut spectral clustering can reach. The paper compares it with the n-cuts of null networks:

- :mod:`~cluster_tracking.nulls.shuffles`: each weight tensor shuffled separately (``layer``,
  ``layer_nonzero``, and the kernel-density draws ``layer_nonzero_distribution``,
  ``layer_all_distribution``, ``layer_all_distribution_dense``);
- :mod:`~cluster_tracking.nulls.networks`: a graph's blocks shuffled into a null network (dead
  units stay dead), and its n-cuts;
- :mod:`~cluster_tracking.nulls.reinit`: ``random_init``, the architecture freshly initialised;
- :mod:`~cluster_tracking.nulls.statistics`: z-score, p-value and percentile against the nulls;
- :mod:`~cluster_tracking.nulls.preconditions`: where a null model applies;
- :mod:`~cluster_tracking.nulls.dispatch`, :mod:`~cluster_tracking.nulls.local_workers`,
  :mod:`~cluster_tracking.nulls.mapped`: where the null networks are measured (this process and
  its workers, joblib, Dask).

The names of the null models and presets, and their validators, live in
:mod:`cluster_tracking.config`, shared with every other layer.
"""

from cluster_tracking.nulls.mapped import mapped_null_ncuts
from cluster_tracking.nulls.networks import (
    live_masks,
    node_degrees,
    null_blocks,
    prepare_null_blocks,
    shuffled_ncuts,
)
from cluster_tracking.nulls.preconditions import (
    MAGNITUDE_SHUFFLES,
    check_magnitude_blocks,
    check_null_backend,
    check_shuffle_preconditions,
)
from cluster_tracking.nulls.reinit import NAMED_INITS, reinitialised_copy
from cluster_tracking.nulls.shuffles import (
    FILAN2021_BANDWIDTH,
    kde_bandwidth,
    shuffle_tensor,
    shuffle_weights,
)
from cluster_tracking.nulls.statistics import null_statistics

__all__ = [
    "FILAN2021_BANDWIDTH",
    "MAGNITUDE_SHUFFLES",
    "NAMED_INITS",
    "check_magnitude_blocks",
    "check_null_backend",
    "check_shuffle_preconditions",
    "kde_bandwidth",
    "live_masks",
    "mapped_null_ncuts",
    "node_degrees",
    "null_blocks",
    "null_statistics",
    "prepare_null_blocks",
    "reinitialised_copy",
    "shuffle_tensor",
    "shuffle_weights",
    "shuffled_ncuts",
]
