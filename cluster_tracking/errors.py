"""The one exception family of cluster-tracking.

Every error a user can cause (a model the graph cannot follow, a bad ``k``, a missing checkpoint)
is a :class:`ClusterTrackingError` whose message says what was wrong and what to do about it. The
CLI turns these into one red line and a non-zero exit code; hooks turn them into warnings.
"""

from __future__ import annotations


class ClusterTrackingError(Exception):
    """Base class of every error raised on purpose by cluster-tracking."""


class GraphError(ClusterTrackingError):
    """The model's weights cannot become a weight graph (unsupported layer, NaN weights...)."""


class ConfigError(ClusterTrackingError, ValueError):
    """An argument is out of range or inconsistent (``k`` above the node count, unknown method)."""


class SourceError(ClusterTrackingError):
    """A checkpoint, logged model or URI cannot be found, read or trusted."""


class LimitError(SourceError):
    """Reading a source would take more memory than the limit allows (``--max-memory``), or the
    source is larger than any reader accepts; the message gives the estimate and the limit."""
