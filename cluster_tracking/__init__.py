"""cluster-tracking: how clusterable a neural network is, as live metrics in MLflow and W&B.

Implements Filan et al. (2021), "Clusterability in Neural Networks" (arXiv:2103.03386):

>>> import cluster_tracking as ct
>>> graph = ct.weight_graph(model)                  # neurons as nodes, |weights| as edges
>>> report = ct.measure(model, k=12, shuffles=50)   # spectral partition, n-cut, null model
>>> report.ncut, report.baseline.z_score, report.baseline.p_value

The measurement core (graph types, spectral clustering, null models, reports) is imported with
the package and needs numpy and scipy only; the names that need torch (graph extraction, the
tracker, the regulariser, ...) are imported on first use, so the CLI and the processes that
partition null networks start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cluster_tracking.errors import (
    ClusterTrackingError,
    ClusterTrackingWarning,
    ConfigError,
    GraphError,
    SinkError,
    SourceError,
)
from cluster_tracking.graph.types import EdgeBlock, WeightGraph
from cluster_tracking.measure import measure
from cluster_tracking.report import (
    METRIC_KEYS,
    Baseline,
    ClusterabilityReport,
    ClusterSummary,
    Partition,
)
from cluster_tracking.spectral.cuts import ncut
from cluster_tracking.spectral.partition import SpectralPartition, spectral_partition
from cluster_tracking.version import __version__

if TYPE_CHECKING:
    from cluster_tracking.graph import weight_graph
    from cluster_tracking.promote.clusterable_init import clusterable_init_, module_assignment
    from cluster_tracking.promote.normalization import ReLUWeightNormalizer
    from cluster_tracking.promote.regularizer import SpectralRegularizer
    from cluster_tracking.tracking.sinks import LocalDirectorySink, Sink
    from cluster_tracking.tracking.tracker import ClusterabilityTracker

#: Public names imported on first use, and the module each comes from.
_LAZY = {
    "weight_graph": "cluster_tracking.graph",
    "clusterable_init_": "cluster_tracking.promote.clusterable_init",
    "module_assignment": "cluster_tracking.promote.clusterable_init",
    "ReLUWeightNormalizer": "cluster_tracking.promote.normalization",
    "SpectralRegularizer": "cluster_tracking.promote.regularizer",
    "LocalDirectorySink": "cluster_tracking.tracking.sinks",
    "Sink": "cluster_tracking.tracking.sinks",
    "ClusterabilityTracker": "cluster_tracking.tracking.tracker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cluster_tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
