"""A child Python process that runs jobs, named by dotted name, one at a time, fed by a pipe.

Measuring is CPU-bound Python and numpy code. In a thread of the training process it would hold
the GIL for milliseconds at a time, and a training loop, which releases and re-takes the GIL at
every torch call, would wait for it each time: a small loop runs several times slower while a
measurement runs. So by default the tracker measures in a child process of its own, fed through
a pipe: the weight graph goes in, the report and the PNG plots come back
(:mod:`cluster_tracking.tracking.jobs`); ``measure``'s null workers are children of the same kind
(:mod:`cluster_tracking.nulls.local_workers`).

A job is named ``"package.module:function"`` and imported in the child on its first call
(:func:`resolve_job`), so this module imports nothing of the package above the parallel runtime,
and the child imports only what its jobs need (no torch for the tracker's and the nulls' jobs:
it starts in well under a second instead of competing with the training loop for the seconds
torch takes to import).
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cluster_tracking.parallel.throttle import Throttle, can_throttle

#: The environment variable naming the modules a child imports before it is ready
#: (comma-separated), e.g. the plotting libraries of the tracker's jobs.
PRELOAD_VARIABLE = "CLUSTER_TRACKING_PRELOAD"

#: Jobs this process has imported, by dotted name.
_JOBS: dict[str, Callable[..., Any]] = {}


def resolve_job(job: str) -> Callable[..., Any]:
    """The function named ``job`` (``"package.module:function"``), imported on first use."""
    function = _JOBS.get(job)
    if function is None:
        module, _, name = job.partition(":")
        if not module or not name:
            raise ValueError(f"a job is named 'package.module:function', got {job!r}")
        function = _JOBS[job] = getattr(importlib.import_module(module), name)
    return function


def run_job(job: str, *args: Any) -> Any:
    """Run the job ``job`` (see :func:`resolve_job`) in this process: what a child does for
    :meth:`WorkerProcess.call`, for a caller that has no child."""
    return resolve_job(job)(*args)


# Runs in the child: put the package's folder first on sys.path (so it imports this very copy of
# cluster_tracking, whatever the training script did to sys.path), then serve requests.
_WORKER_BOOTSTRAP = (
    "import os, sys\n"
    "try:  # Linux: die with the thread that started it, even while busy (no orphan)\n"
    "    import ctypes, signal\n"
    "    assert sys.argv[3] != '-'\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != int(sys.argv[3]):\n        os._exit(0)\n"
    "except Exception:\n    pass\n"
    "if sys.argv[2] == 'nice':\n"
    "    try:\n        os.nice(19)\n"
    "    except (OSError, AttributeError):\n        pass\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from cluster_tracking.parallel.child import _worker_main\n"
    "_worker_main()"
)


class WorkerError(Exception):
    """A job raised in the child process; the message is the original ``Type: message``.

    :func:`~cluster_tracking.errors.describe` gives that message as it is (``described``), not
    prefixed with ``WorkerError``.
    """

    #: the message already says the original error's type
    described = True


def _write_frame(stream: Any, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(stream: Any) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the worker's pipe closed")
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the worker's pipe closed mid-message")
    return pickle.loads(data)


class WorkerProcess:
    """A child Python process that runs jobs (:func:`resolve_job`), one call at a time.

    Requests and answers are pickled frames on the child's stdin and stdout (its own pipes: only
    its owner talks to it). The tracker's child runs at the lowest CPU priority (``nice``: nice
    19), so training keeps the CPU when both want it, and the tracker also paces its requests to
    a budget (:class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker`'s ``max_overhead``);
    ``nice=False`` runs it at normal priority (the null workers of ``measure``). The child exits
    when its stdin closes (so it never outlives its parent; with ``die_with_thread`` it is also
    killed when the thread that started it ends, even mid-measurement) and writes nothing else to
    the pipe (stray prints go to stderr).
    Every answer carries the child's CPU seconds so far (:attr:`cpu_seconds`).

    Args:
        start_timeout: seconds the child may take to start before it is killed.
        nice: run the child at nice 19.
        env: environment variables set in the child, on top of this process's.
        wait: wait here until the child has started; otherwise the first :meth:`call` waits.
        die_with_thread: on Linux, kill the child when the thread creating it ends
            (``PR_SET_PDEATHSIG``): for a child owned by one long-lived thread.
        share: the share of wall time the child may run during a call, enforced by a
            :class:`~cluster_tracking.parallel.throttle.Throttle` (``None``: no limit); needs
            ``die_with_thread`` on Linux, so that a paused child cannot be orphaned.
        throttle_start: with a ``share``, hold the child's start (its imports) to it too;
            ``False`` lets it start at full speed (a one-off, before its first call).

    In the child, the modules named in the environment variable :data:`PRELOAD_VARIABLE`
    (comma-separated) are imported before it says it is ready: part of its start, not of its
    first job.
    """

    def __init__(
        self,
        start_timeout: float = 120.0,
        *,
        nice: bool = True,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        die_with_thread: bool = False,
        share: float | None = None,
        throttle_start: bool = True,
    ) -> None:
        if share is not None and not (die_with_thread and can_throttle()):
            raise ValueError("share needs die_with_thread on Linux (no orphaned paused child)")
        if share is not None and not 0 < share < 1:
            raise ValueError(f"share must be a fraction in (0, 1), got {share!r}")
        #: the share of wall time the child may run during a call (None: no limit)
        self.share = share
        #: wall-clock seconds the child was allowed to run during calls (all of a call's wall
        #: time when it is not throttled)
        self.run_seconds = 0.0
        #: what pauses the child to hold it to ``share`` (None without a share)
        self._throttle: Throttle | None = None
        package_root = str(Path(__file__).resolve().parents[1])
        self._spawned = time.monotonic()
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER_BOOTSTRAP,
                package_root,
                "nice" if nice else "-",
                str(os.getpid()) if die_with_thread else "-",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            env={**os.environ, **env} if env else None,
        )
        self._ready = threading.Event()
        #: CPU seconds the child has used (user + system), as of its last answer.
        self.cpu_seconds = 0.0
        #: CPU seconds the child used to start (imports), as of its first message.
        self.start_cpu_seconds = 0.0
        #: wall-clock seconds a child with a share was allowed to run while it started (all of
        #: its start when that was not throttled; 0 without a share)
        self.start_run_seconds = 0.0

        def give_up() -> None:
            if not self._ready.is_set():
                self._process.kill()  # its pipe closes: the read of its first message fails

        self._timer = threading.Timer(start_timeout, give_up)
        self._timer.daemon = True
        self._timer.start()
        if share is not None:
            self._throttle = Throttle(self.pid, share)
            if throttle_start:  # its imports take CPU seconds too
                self._throttle.start()
        self._throttled_start = share is not None and throttle_start
        if wait:
            self._await_ready()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def throttle_cpu_seconds(self) -> float:
        """CPU seconds this process spent pausing and resuming the child (0 without a share)."""
        return self._throttle.cpu_seconds if self._throttle is not None else 0.0

    def running(self) -> bool:
        """Whether the child is still running."""
        return self._process.poll() is None

    def wait_ready(self) -> None:
        """Wait until the child has started (raises as :meth:`call` does if it cannot)."""
        self._await_ready()

    def _await_ready(self) -> None:
        """Read the child's first message, which says it has started."""
        if self._ready.is_set():
            return
        try:
            kind, _, cpu = _read_frame(self._process.stdout)
            self.cpu_seconds = self.start_cpu_seconds = float(cpu)
        except Exception:
            self.stop()
            raise
        finally:
            self._ready.set()
            self._timer.cancel()
            if self._throttled_start:  # idle, it waits for requests unpaused
                assert self._throttle is not None
                self.start_run_seconds = self._throttle.stop()
            elif self.share is not None:
                self.start_run_seconds = time.monotonic() - self._spawned
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"unexpected first message from the worker: {kind!r}")

    def call(self, job: str, *args: Any) -> Any:
        """Run the job named ``job`` (``"package.module:function"``, see :func:`resolve_job`) on
        ``args`` in the child and return its result; raises :class:`WorkerError` when it raised,
        ``EOFError``/``OSError`` when the child is gone."""
        if not self.running():
            raise EOFError(f"the worker exited with code {self._process.returncode}")
        self._await_ready()
        started = time.monotonic()
        throttle = self._throttle if self.share is not None else None
        run_before = 0.0
        if throttle is not None:
            run_before = throttle.run_seconds
            throttle.start()
        try:
            _write_frame(self._process.stdin, (job, args))
            kind, value, cpu = _read_frame(self._process.stdout)
        finally:
            self.run_seconds += (
                time.monotonic() - started if throttle is None else throttle.stop() - run_before
            )
        self.cpu_seconds = float(cpu)
        if kind == "error":
            raise WorkerError(value)
        return value

    def unthrottle(self) -> None:
        """Let the child run at full speed from now on, the call under way included."""
        self.share = None
        if self._throttle is not None:
            self._throttle.close()  # for good: a call starting now cannot pause it again

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to exit; kill it if it does not within ``timeout`` seconds."""
        process = self._process
        if self._throttle is not None:
            self._throttle.close()  # it must run to exit
        try:
            if process.poll() is None and process.stdin is not None:
                _write_frame(process.stdin, None)
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
        if process.stdout is not None:
            process.stdout.close()

    def kill(self) -> None:
        """End the child now (a measurement in progress is abandoned) and reap it."""
        process = self._process
        if process.poll() is None:
            process.kill()
        if self._throttle is not None:
            self._throttle.close()
        try:
            process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
            pass


def _worker_main() -> None:
    """The worker process's loop (see :class:`WorkerProcess`)."""
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the pipe
    # Ctrl-C in a terminal reaches the whole process group; the training script decides what
    # happens then (typically tracker.close()), and the worker goes when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in filter(None, os.environ.get(PRELOAD_VARIABLE, "").split(",")):
        try:  # part of the start, not of the first job (the tracker's budget)
            importlib.import_module(module.strip())
        except Exception:
            pass  # the job that needs it reports the error
    try:
        _write_frame(answers, ("ready", None, time.process_time()))
    except OSError:  # the parent is gone already
        return
    while True:
        try:
            request = _read_frame(requests)
        except EOFError:
            return
        if request is None:
            return
        job, args = request
        try:
            answer = ("ok", run_job(job, *args))
        except Exception as error:
            answer = ("error", f"{type(error).__name__}: {str(error).strip()}")
        try:
            _write_frame(answers, (*answer, time.process_time()))
        except OSError:  # the parent closed the pipe (it gave up waiting): leave quietly
            return
