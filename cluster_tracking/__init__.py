"""cluster-tracking: how clusterable a neural network is, as live metrics in MLflow and W&B.

Implements Filan et al. (2021), "Clusterability in Neural Networks" (arXiv:2103.03386):

>>> import cluster_tracking as ct
>>> graph = ct.weight_graph(model)                  # neurons as nodes, |weights| as edges
>>> report = ct.measure(model, k=12, shuffles=50)   # spectral partition, n-cut, null model
>>> report.ncut, report.baseline.z_score, report.baseline.p_value
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from cluster_tracking.clusterable_init import clusterable_init_, module_assignment
from cluster_tracking.errors import ClusterTrackingError, ConfigError, GraphError, SourceError
from cluster_tracking.graph import EdgeBlock, WeightGraph, weight_graph
from cluster_tracking.measure import measure
from cluster_tracking.normalization import ReLUWeightNormalizer
from cluster_tracking.regularizer import SpectralRegularizer
from cluster_tracking.report import (
    METRIC_KEYS,
    Baseline,
    ClusterabilityReport,
    ClusterSummary,
    Partition,
)
from cluster_tracking.sinks import LocalDirectorySink, Sink, SinkError
from cluster_tracking.spectral import SpectralPartition, ncut, spectral_partition
from cluster_tracking.tracker import ClusterabilityTracker, ClusterTrackingWarning

try:
    __version__ = _version("cluster-tracking")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "METRIC_KEYS",
    "Baseline",
    "ClusterSummary",
    "ClusterTrackingError",
    "ClusterTrackingWarning",
    "ClusterabilityReport",
    "ClusterabilityTracker",
    "ConfigError",
    "EdgeBlock",
    "GraphError",
    "LocalDirectorySink",
    "Partition",
    "ReLUWeightNormalizer",
    "Sink",
    "SinkError",
    "SourceError",
    "SpectralPartition",
    "SpectralRegularizer",
    "WeightGraph",
    "__version__",
    "clusterable_init_",
    "measure",
    "module_assignment",
    "ncut",
    "spectral_partition",
    "weight_graph",
]
