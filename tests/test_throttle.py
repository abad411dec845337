"""The throttle that keeps the tracker's measuring child to its share of the machine.

No wall-clock asserts: a busy machine only gives the child *less* CPU, so the checks are upper
bounds on the CPU the child got, and states of the child read from ``/proc``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster_tracking.parallel.throttle import Throttle, can_throttle

pytestmark = pytest.mark.skipif(not can_throttle(), reason="SIGSTOP throttling is Linux-only")

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def state(pid: int) -> str:
    """``R``, ``S``, ``T`` (stopped), ... of ``pid``."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def spinner():
    """A child that burns CPU until killed."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield child
    child.kill()
    child.wait()


def test_a_throttled_child_gets_at_most_its_share_and_is_never_left_paused(spinner) -> None:
    share = 0.2
    before_threads = set(threading.enumerate())
    throttle = Throttle(spinner.pid, share)
    try:
        for _ in range(2):  # one thread serves every cycle
            before, started = cpu_seconds(spinner.pid), time.monotonic()
            throttle.start()
            time.sleep(1.5)
            run = throttle.stop()
            wall = time.monotonic() - started
            used = cpu_seconds(spinner.pid) - before
            # bursts of 5 ms on, 20 ms off: a fifth of the wall time at most (plus a tick or
            # two of /proc's resolution and the scheduler's slack)
            assert used <= share * wall * 1.5 + 0.05, (used, wall)
            assert 0 < run <= wall * 1.01
            assert state(spinner.pid) != "T"  # stop() leaves it running
            time.sleep(0.05)
            assert state(spinner.pid) != "T"
        assert len(set(threading.enumerate()) - before_threads) == 1  # one thread served both
    finally:
        throttle.close()
    assert set(threading.enumerate()) <= before_threads
    assert state(spinner.pid) != "T"
    throttle.start()  # after close() nothing pauses it again
    time.sleep(0.05)
    assert state(spinner.pid) != "T"


def test_stop_wakes_a_paused_child_at_once(spinner) -> None:
    """A long pause (a small share) ends as soon as stop() is called, not after the pause."""
    throttle = Throttle(spinner.pid, 0.001, burst=0.005)  # pauses of about 5 s
    try:
        throttle.start()
        deadline = time.monotonic() + 5
        while state(spinner.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert state(spinner.pid) == "T"  # paused now, for seconds
        throttle.stop()
        assert state(spinner.pid) != "T"
    finally:
        throttle.close()


def test_the_throttle_survives_its_child(spinner) -> None:
    before_threads = set(threading.enumerate())
    throttle = Throttle(spinner.pid, 0.5)
    throttle.start()
    spinner.kill()
    spinner.wait()
    time.sleep(0.05)
    throttle.stop()
    throttle.close()  # no OSError, no thread left
    assert set(threading.enumerate()) <= before_threads


def test_a_child_runs_jobs_by_dotted_name_and_reports_their_errors_as_they_were() -> None:
    """The child imports a job by its dotted name; an error in it comes back as the original
    ``Type: message``, which ``describe`` gives as it is."""
    from cluster_tracking.errors import describe
    from cluster_tracking.parallel.child import WorkerError, WorkerProcess

    child = WorkerProcess(nice=False)
    try:
        assert child.call("os.path:join", "a", "b") == os.path.join("a", "b")
        with pytest.raises(WorkerError) as raised:
            child.call("cluster_tracking.config:check_shuffles", 1)
        assert describe(raised.value).startswith("ConfigError: shuffles=1: a null model needs")
        with pytest.raises(WorkerError, match="ModuleNotFoundError"):
            child.call("cluster_tracking.no_such_module:job")
        assert child.running()  # a failed job leaves the child serving
    finally:
        child.stop()


def test_the_parallel_runtime_imports_nothing_above_it() -> None:
    """``parallel/`` is the lowest layer beside ``errors``, ``config``, ``report`` and
    ``resources``: no module of it imports (even inside a function) a higher one; its child
    finds the jobs of higher layers by name."""
    import ast

    import cluster_tracking.parallel

    allowed = ("cluster_tracking.parallel", "cluster_tracking.errors")
    folder = Path(cluster_tracking.parallel.__file__).parent
    seen = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("cluster_tracking") and not name.startswith(allowed):
                    seen.append(f"{path.name}: {name}")
    assert seen == []
