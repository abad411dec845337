"""The one exception family of cluster-tracking.

Every error a user can cause (a model the graph cannot follow, a bad ``k``, a missing checkpoint)
is a :class:`ClusterTrackingError` whose message says what was wrong and what to do about it. The
CLI turns these into one red line and a non-zero exit code; hooks turn them into warnings.
"""

from __future__ import annotations

import warnings


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


class PlatformError(SourceError):
    """A tracking platform (an MLflow server or store, W&B) cannot be reached, refuses the
    request, or its client package is not installed."""


class SinkError(ClusterTrackingError):
    """A sink cannot be set up: its platform package is missing or it has nowhere to log to."""


class ClusterTrackingWarning(UserWarning):
    """Something went wrong in a hook (a measurement, a plot, a sink) and training went on."""


def describe(error: BaseException | None) -> str:
    """``"Type: message"`` of an error, on one line (the first line of its message, at most 300
    characters), for warnings and one-line reports; ``"no error recorded"`` for ``None``.

    An error whose class sets ``described = True`` (one re-raised from a worker process, whose
    message is the original ``Type: message`` already) is given as its message alone."""
    if error is None:
        return "no error recorded"
    lines = str(error).strip().splitlines()
    text = lines[0].strip().rstrip(".")[:300] if lines else ""
    if getattr(error, "described", False) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def warn(message: str, stacklevel: int = 3) -> None:
    """Issue ``message`` as a :class:`ClusterTrackingWarning`, attributed to the caller's caller
    (the user's code that called the hook)."""
    warnings.warn(message, ClusterTrackingWarning, stacklevel=stacklevel)


#: Exit status of the CLI's commands (``audit``, ``compare``, ``demo``), by kind of error.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SOURCE = 3
EXIT_MODEL = 4
EXIT_PLATFORM = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def exit_code(error: BaseException) -> int:
    """The CLI's exit code for an error: 5 for a platform (:class:`PlatformError`, a sink that
    cannot be set up), 3 for a source, 4 for a model, 2 for any other :class:`ClusterTrackingError`
    (a bad option), 1 for anything else (a bug)."""
    if isinstance(error, PlatformError):
        return EXIT_PLATFORM
    if isinstance(error, SourceError):
        return EXIT_SOURCE
    if isinstance(error, GraphError):
        return EXIT_MODEL
    if isinstance(error, ClusterTrackingError):
        return EXIT_PLATFORM if isinstance(error, SinkError) else EXIT_USAGE
    return EXIT_INTERNAL
