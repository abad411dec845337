"""The memory limit of the readers, the bounds of the audit's options, and its time estimate.

A model file can declare anything: a safetensors header or a ``.pt2`` config can name a 640 GB
tensor in a 2 KB file, and a deflated zip member can inflate a thousandfold. Every reader of
:mod:`cluster_tracking.audit.sources` therefore *budgets* what a file declares before it allocates
it: :class:`MemoryBudget` adds up the bytes a read will hold and refuses, with the estimate and the
limit in one line, as soon as they pass :func:`current_memory_limit`.

The limit is ``--max-memory`` on the command line (:func:`parse_size`: ``512MiB``, ``4G``...),
``max_memory=`` of :func:`~cluster_tracking.audit.sources.load_source`, or by default
:func:`default_memory_limit`: half the memory available now, and half of what the process may
still map when its address space is limited (``ulimit -v``, ``RLIMIT_AS``).

A run can also be absurdly *long*: ``--shuffles 10000`` on a model of millions of edges is days
of spectral clustering. :func:`run_time_estimate` estimates a measurement's seconds from its
graph's nodes and edges, the null networks, the k values and the workers, and
:func:`check_run_time` refuses, before any work, a run estimated above :data:`MAX_RUN_SECONDS`,
naming the estimate and the options that fit (``--allow-long-run`` goes ahead anyway).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from cluster_tracking.errors import ConfigError, LimitError

__all__ = [
    "MAX_JOBS_NOTE",
    "MAX_RUN_SECONDS",
    "MAX_SHUFFLES",
    "MemoryBudget",
    "check_run_time",
    "cpu_count",
    "current_memory_limit",
    "default_memory_limit",
    "format_size",
    "memory_limit",
    "parse_size",
    "partition_seconds",
    "run_time_estimate",
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


# ---------------------------------------------------------------------------------------------
# How long a measurement takes
# ---------------------------------------------------------------------------------------------

#: Estimated seconds above which a run is refused unless the user insists (``--allow-long-run``).
MAX_RUN_SECONDS = 6 * 3600.0

#: Seconds of one partition of one network at k = 12 on one core of the 2-core development
#: machine, as ``floor + coefficient * stored ** exponent`` of the graph's stored adjacency
#: entries (each edge twice): the eigensolver's sparse products dominate, and ARPACK (the
#: ``filan2021`` preset's solver, with its 100 k-means restarts above 2,000 nodes) needs more
#: iterations on larger graphs. Fitted by ``python -m benchmarks.bench_run_time`` on MLPs of
#: 0.5 to 16 million stored entries: within 2x of every timing there, on a shared machine.
_PARTITION_COST = {
    # preset: (coefficient, exponent, floor seconds)
    "default": (7e-8, 1.0, 0.01),
    "filan2021": (7.3e-10, 1.5, 0.02),
}


def partition_seconds(n_stored: int, ks: Sequence[int], preset: str = "default") -> float:
    """Estimated seconds of partitioning one weight graph of ``n_stored`` stored adjacency
    entries at every k of ``ks``, on one core; a k costs ``sqrt(k / 12)`` times k = 12."""
    coefficient, exponent, floor = _PARTITION_COST.get(preset, _PARTITION_COST["default"])
    at_12 = floor + coefficient * float(n_stored) ** exponent
    return sum(at_12 * math.sqrt(max(k, 2) / 12) for k in ks)


def run_time_estimate(
    n_stored: int,
    *,
    shuffles: int,
    ks: Sequence[int],
    jobs: int,
    preset: str = "default",
) -> float:
    """Estimated seconds of a measurement of a weight graph of ``n_stored`` stored adjacency
    entries (each edge twice): the observed network and ``shuffles`` null networks, each
    partitioned at every k of ``ks`` (:func:`partition_seconds`), the null networks shared by
    ``jobs`` workers."""
    one_network = partition_seconds(n_stored, ks, preset)
    workers = max(1, min(jobs, shuffles)) if shuffles else 1
    return one_network * (1 + shuffles / workers)


def format_duration(seconds: float) -> str:
    """``5400`` -> ``"1.5 h"``: a duration for messages."""
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def check_run_time(
    n_nodes: int,
    n_stored: int,
    *,
    shuffles: int,
    ks: Sequence[int],
    jobs: int,
    preset: str = "default",
    label: str = "this model",
    limit: float | None = None,
) -> float:
    """Refuse a measurement whose :func:`run_time_estimate` passes ``limit`` seconds
    (``None``: :data:`MAX_RUN_SECONDS`), before it starts; return the estimate.

    Raises:
        ConfigError: with the estimate, the limit, the options that fit, and
            ``--allow-long-run`` to go ahead anyway.
    """
    estimate = run_time_estimate(n_stored, shuffles=shuffles, ks=ks, jobs=jobs, preset=preset)
    limit = MAX_RUN_SECONDS if limit is None else float(limit)
    if estimate <= limit:
        return estimate
    one_network = run_time_estimate(n_stored, shuffles=0, ks=ks, jobs=1, preset=preset)
    workers = max(1, min(jobs, shuffles)) if shuffles else 1
    fitting = int((limit / one_network - 1) * workers) if one_network < limit else 0
    fits: list[str] = []
    if fitting >= 2:
        fits.append(f"--shuffles {min(fitting, shuffles - 1)} or fewer")
    if len(ks) > 1:
        fits.append("fewer k values")
    cpus = cpu_count()
    if jobs < min(cpus, shuffles):
        fits.append(f"--jobs {cpus}")
    if preset == "filan2021" and limit >= run_time_estimate(
        n_stored, shuffles=shuffles, ks=ks, jobs=jobs, preset="default"
    ):
        fits.append("--preset default (faster clustering; its z-scores are not the paper's)")
    fits.append("fewer --layers")
    k_text = ", ".join(str(k) for k in ks)
    raise ConfigError(
        f"{label}: measuring its weight graph ({n_nodes} nodes, {n_stored // 2} edges) at k = "
        f"{k_text} with {shuffles} shuffled networks on {workers} worker(s) would take about "
        f"{format_duration(estimate)}, more than the {format_duration(limit)} a run may take "
        f"(estimated from this package's speed on one core); use {', '.join(fits)}, or pass "
        "--allow-long-run to go ahead anyway."
    )
