"""The one exception family of cluster-tracking.

Every error a user can cause (a model the graph cannot follow, a bad ``k``, a missing checkpoint)
is a :class:`ClusterTrackingError` whose message says what was wrong and what to do about it. The
CLI turns these into one red line and a non-zero exit code; hooks turn them into warnings.

:data:`EXIT_STATUSES` is the one table of the CLI's exit codes (code, name, meaning, the error
classes that exit with it): :func:`exit_code`, the commands' ``--help`` and the docs' table
(:func:`exit_codes_markdown`) are generated from it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


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


def first_line(error: BaseException) -> str:
    """The first line of an error's message, its runs of whitespace collapsed, at most 300
    characters: a third-party error (torch.export, transformers) quoted inside one of ours."""
    return " ".join((str(error).strip().splitlines() or [""])[0].split())[:300]


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


@dataclass(frozen=True)
class ExitStatus:
    """One exit status of the CLI's commands (``audit``, ``compare``, ``demo``).

    Attributes:
        code: the process exit status.
        name: the constant that holds it (``EXIT_SOURCE``).
        summary: what it means, in a few words (the ``audit --help`` epilogue).
        details: the cases it covers (``--help``, the docs); empty when the summary says all.
        raised_by: the error classes that exit with it (:func:`exit_code` picks the class
            nearest to the error's own in its method resolution order).
    """

    code: int
    name: str
    summary: str
    details: str = ""
    raised_by: tuple[type[BaseException], ...] = ()

    @property
    def meaning(self) -> str:
        """The summary and, after a colon, the details."""
        return f"{self.summary}: {self.details}" if self.details else self.summary


#: The exit statuses of the CLI's commands: the one table that :func:`exit_code`, the commands'
#: ``--help`` and the docs' table are generated from.
EXIT_STATUSES: tuple[ExitStatus, ...] = (
    ExitStatus(0, "EXIT_OK", "success"),
    ExitStatus(
        1,
        "EXIT_INTERNAL",
        "internal error",
        "a bug, please report it: still one line; CLUSTER_TRACKING_TRACEBACK=1 shows the traceback",
    ),
    ExitStatus(
        2,
        "EXIT_USAGE",
        "bad command line or option value",
        "unknown option, --shuffles 1 or out of range, --k "
        "above the node count, a malformed tracking URI or scheduler address, a --plot/--csv "
        "extension, a run whose estimated memory passes --max-memory or whose estimated time "
        "passes 6 h without --allow-long-run, --log-to-run on a local file",
        (ClusterTrackingError,),
    ),
    ExitStatus(
        3,
        "EXIT_SOURCE",
        "source not found or unreadable",
        "missing or corrupt file, a device, FIFO or socket instead of a file, a folder too "
        "large to search, sizes declared in the file that it does not hold or that pass "
        "--max-memory, a path in MLmodel outside the model's folder, unknown URI scheme, no such "
        "run/model/artifact, a run without a model, a pickle refused without --trust-pickle",
        (SourceError,),
    ),
    ExitStatus(
        4,
        "EXIT_MODEL",
        "model cannot be measured",
        "no Linear/Conv layers, a state_dict that is not a chain, weights that do not chain, an "
        "unknown --layers name, NaN weights, empty or all-zero weights, bool (mask) or integer "
        "(quantized) weights, a model the graph cannot follow",
        (GraphError,),
    ),
    ExitStatus(
        5,
        "EXIT_PLATFORM",
        "MLflow, W&B or Dask unreachable",
        "the MLflow server, W&B or the Dask scheduler unreachable, silent for 10 s, refusing, "
        "or not installed; a local MLflow store that does not exist; a file store MLflow 3 "
        "refuses",
        (PlatformError, SinkError),
    ),
    ExitStatus(130, "EXIT_INTERRUPTED", "interrupted", "Ctrl-C"),
    ExitStatus(143, "EXIT_TERMINATED", "terminated", "SIGTERM: workers stopped, as for Ctrl-C"),
)

# The table's codes as constants, by the names the table gives them.
_BY_NAME = {status.name: status.code for status in EXIT_STATUSES}
EXIT_OK = _BY_NAME["EXIT_OK"]
EXIT_INTERNAL = _BY_NAME["EXIT_INTERNAL"]
EXIT_USAGE = _BY_NAME["EXIT_USAGE"]
EXIT_SOURCE = _BY_NAME["EXIT_SOURCE"]
EXIT_MODEL = _BY_NAME["EXIT_MODEL"]
EXIT_PLATFORM = _BY_NAME["EXIT_PLATFORM"]
EXIT_INTERRUPTED = _BY_NAME["EXIT_INTERRUPTED"]
EXIT_TERMINATED = _BY_NAME["EXIT_TERMINATED"]

#: Exit status -> its meaning, from :data:`EXIT_STATUSES`.
EXIT_CODES: dict[int, str] = {status.code: status.meaning for status in EXIT_STATUSES}


def exit_code(error: BaseException) -> int:
    """The CLI's exit code for an error, from :data:`EXIT_STATUSES`: that of the class nearest
    to the error's own among the table's ``raised_by`` (5 for a platform or a sink that cannot
    be set up, 3 for a source, 4 for a model, 2 for any other :class:`ClusterTrackingError`, a
    bad option), 1 for anything else (a bug)."""
    code_of = {cls: status.code for status in EXIT_STATUSES for cls in status.raised_by}
    for cls in type(error).__mro__:
        if cls in code_of:
            return code_of[cls]
    return EXIT_INTERNAL


def exit_codes_text() -> str:
    """The exit codes on one line, ``**0** success; **1** internal error (...); ...``, for the
    top-level ``--help`` (Markdown)."""
    return "; ".join(f"**{status.code}** {_parenthesised(status)}" for status in EXIT_STATUSES)


def exit_codes_summary() -> str:
    """The exit codes in a few words each, ``0 success, 1 internal error, ...``."""
    return ", ".join(f"{status.code} {status.summary}" for status in EXIT_STATUSES)


def exit_codes_markdown() -> str:
    """The exit codes as a Markdown table (code, name, meaning), for the docs."""
    rows = [f"| {status.code} | `{status.name}` | {status.meaning} |" for status in EXIT_STATUSES]
    return "\n".join(["| code | name | meaning |", "|---|---|---|", *rows])


def _parenthesised(status: ExitStatus) -> str:
    return f"{status.summary} ({status.details})" if status.details else status.summary
