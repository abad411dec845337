"""The memory limit of the readers, and the bounds of the audit's options.

A model file can declare anything: a safetensors header or a ``.pt2`` config can name a 640 GB
tensor in a 2 KB file, and a deflated zip member can inflate a thousandfold. Every reader of
:mod:`cluster_tracking.loading` therefore *budgets* what a file declares before it allocates it:
:class:`MemoryBudget` adds up the bytes a read will hold and refuses, with the estimate and the
limit in one line, as soon as they pass :func:`current_memory_limit`.

The limit is ``--max-memory`` on the command line (:func:`parse_size`: ``512MiB``, ``4G``...),
``max_memory=`` of :func:`~cluster_tracking.loading.load_source`, or by default
:func:`default_memory_limit`: half the memory available now, and half of what the process may
still map when its address space is limited (``ulimit -v``, ``RLIMIT_AS``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from cluster_tracking.errors import ConfigError, LimitError

__all__ = [
    "MAX_JOBS_NOTE",
    "MAX_SHUFFLES",
    "MemoryBudget",
    "cpu_count",
    "current_memory_limit",
    "default_memory_limit",
    "format_size",
    "memory_limit",
    "parse_size",
]

#: Upper bound of ``--shuffles``: the paper uses 50-100, a p-value's resolution is 1/(n+1).
MAX_SHUFFLES = 10_000

#: How a capped ``--jobs`` is reported.
MAX_JOBS_NOTE = "--jobs {asked} is more than the {cpus} CPUs this process may use: using {cpus}."

#: Smallest limit ``--max-memory`` accepts (the interpreter and torch alone need more).
MIN_MEMORY_LIMIT = 16 * 2**20

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}

_LIMIT: ContextVar[int | None] = ContextVar("cluster_tracking_memory_limit", default=None)


def parse_size(text: str | int, *, option: str = "--max-memory") -> int:
    """A size in bytes from ``"512MiB"``, ``"4G"``, ``"1.5 GB"`` or a plain number of bytes.

    Raises:
        ConfigError: not a size, or below :data:`MIN_MEMORY_LIMIT`.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"{option} {text!r} is not a size; write bytes with a unit, e.g. 512MiB, 4GiB "
                "or 8G."
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < MIN_MEMORY_LIMIT:
        raise ConfigError(
            f"{option} {text!r} is below {format_size(MIN_MEMORY_LIMIT)}, too little to read any "
            "model."
        )
    return value


def format_size(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: bytes in binary units, for messages."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover


def _available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else physical memory, else ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    """What this process may still map under ``RLIMIT_AS`` (``None``: unlimited)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = 0
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(soft - mapped, 0)


def default_memory_limit() -> int:
    """Half the memory available now (and half the address space left under ``RLIMIT_AS``),
    at least :data:`MIN_MEMORY_LIMIT`; 2 GiB when neither can be read."""
    shares = [size // 2 for size in (_available_memory(), _address_space_left()) if size]
    return max(min(shares), MIN_MEMORY_LIMIT) if shares else 2 * 2**30


def current_memory_limit() -> int:
    """The limit in force: the innermost :func:`memory_limit`, else :func:`default_memory_limit`."""
    value = _LIMIT.get()
    return value if value is not None else default_memory_limit()


@contextmanager
def memory_limit(nbytes: int | None) -> Iterator[int]:
    """Readers inside the ``with`` block hold at most ``nbytes`` (``None``: the default limit)."""
    limit = nbytes if nbytes is not None else current_memory_limit()
    token = _LIMIT.set(limit)
    try:
        yield limit
    finally:
        _LIMIT.reset(token)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


class MemoryBudget:
    """The bytes one read will hold, checked against the limit *before* they are allocated.

    Args:
        source: how messages name what is read (a path).
        limit: bytes; ``None``: :func:`current_memory_limit`.
    """

    def __init__(self, source: object, limit: int | None = None) -> None:
        self.source = str(source)
        self.limit = limit if limit is not None else current_memory_limit()
        self.used = 0

    def take(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` more for ``what``.

        Raises:
            LimitError: the total passes the limit (the message gives both).
        """
        self.used += max(int(nbytes), 0)
        if self.used > self.limit:
            raise LimitError(
                f"{self.source}: reading it needs about {format_size(self.used)} ({what}), more "
                f"than the memory limit of {format_size(self.limit)}; if the machine has the "
                "memory, raise the limit with --max-memory (e.g. --max-memory "
                f"{_suggest(self.used)})."
            )


def _suggest(nbytes: int) -> str:
    gib = max(int(nbytes * 1.25 / 2**30) + 1, 1)
    return f"{gib}GiB"
