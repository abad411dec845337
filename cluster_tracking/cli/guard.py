"""The one error guard of the CLI's commands: every error is one red line and an exit code.

:func:`cli_errors` wraps the body of each command (``demo``, ``audit``, ``compare``). The exit
codes are those of :data:`cluster_tracking.errors.EXIT_STATUSES`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from cluster_tracking.cli.console import print_error
from cluster_tracking.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    ClusterTrackingError,
    exit_code,
)

#: Loggers whose chatter the commands silence (errors still pass).
QUIET_LOGGERS = ("mlflow", "alembic", "urllib3", "wandb", "matplotlib", "torch")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises :class:`KeyboardInterrupt`, so that
    both stop the same way (workers stopped, one line); exit code 143."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _descendants() -> list[int]:
    """Process ids of this process's children and their children (Linux ``/proc``)."""
    parents: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    found: list[int] = []
    pending = [os.getpid()]
    while pending:
        for child in parents.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _reap(children: list[int], grace: float) -> list[int]:
    """Wait up to ``grace`` seconds for ``children`` to exit; those still running."""
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (a grandchild) or already reaped
                done = pid if not os.path.exists(f"/proc/{pid}") else 0
            if done:
                children.remove(pid)
        time.sleep(0.05)
    return children


def stop_workers(grace: float = 2.0) -> None:
    """Stop every worker process this command started (joblib's loky executor, the null
    workers, their helpers): SIGTERM, then SIGKILL after ``grace`` seconds."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    if executor is not None:
        try:
            executor.shutdown(wait=False, kill_workers=True)
        except Exception:  # best effort: the processes are signalled below anyway
            pass
    children = _descendants()
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    for pid in _reap(children, grace):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, os.WNOHANG)
        except OSError:
            pass


@contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Third-party loggers (:data:`QUIET_LOGGERS`) at ERROR level, and back."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[bool]:
    """SIGTERM raises :class:`Terminated` in the main thread while the block runs; yields
    whether this is the main thread (only it can handle signals)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    previous_int = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        yield main_thread
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if main_thread and previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Run a command: third-party chatter silenced, every error one red line and an exit code.

    A :class:`~cluster_tracking.errors.ClusterTrackingError` exits with its code of
    :data:`~cluster_tracking.errors.EXIT_STATUSES` (2 for a bad option, 3 for a source, 4 for a
    model, 5 for a platform); Ctrl-C with 130 and SIGTERM with 143, after the workers were
    stopped; anything else (a bug) with 1, still as one line (set
    ``CLUSTER_TRACKING_TRACEBACK=1`` to see the traceback).
    """
    with _quiet_loggers(), _sigterm_as_interrupt() as main_thread:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except typer.Exit:
            raise
        except ClusterTrackingError as error:
            print_error(str(error))
            raise typer.Exit(exit_code(error)) from None
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            if main_thread:  # a second signal must not interrupt the clean-up
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            stop_workers()
            print_error("terminated." if terminated else "interrupted.")
            raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
        except Exception as error:
            if os.environ.get("CLUSTER_TRACKING_TRACEBACK"):
                raise
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            print_error(
                f"unexpected {type(error).__name__}: {first} (a bug; please report it, with the "
                "traceback from CLUSTER_TRACKING_TRACEBACK=1)."
            )
            raise typer.Exit(EXIT_INTERNAL) from None
