"""A CPU throttle for a child process: it runs at most a share of the wall time, in short bursts.

Used for the tracker's measuring child (:class:`~cluster_tracking.parallel.child.WorkerProcess`'s
``share``), so that a training loop that keeps every core busy is slowed by a bounded factor.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

#: Longest stretch the tracker's throttled child runs before it is paused (seconds).
THROTTLE_BURST_SECONDS = 0.005


class Throttle:
    """Lets a child process run at most ``share`` of the wall time, in bursts of ``burst`` s.

    One thread of the parent, for the child's whole life: between :meth:`start` and
    :meth:`stop` it alternates ``SIGCONT`` (the child may run for ``burst`` seconds) and
    ``SIGSTOP`` (it is paused for ``(1 - share) / share`` times as long as it ran, which is
    ``burst`` or more: this thread may wake late while the training thread holds the GIL, and a
    long burst is paid back by a long pause); :meth:`stop` returns
    once the child runs unpaused again, and :meth:`close` ends the thread. The kernel enforces
    the pause whatever the child is doing (a long numpy or scipy call included), unlike a signal
    handler in the child, which Python runs only between bytecodes. Why a wall-time share and
    not a CPU share: a training loop whose threads keep every core busy loses a core while the
    child runs on it, and its OpenMP threads then wait for each other, so the loop can stall for
    the whole time the child runs; bounding that time to ``share`` bounds the loop's slowdown to
    ``1 / (1 - share)``. Short bursts keep each stall to a few milliseconds. (One thread, not
    one per measurement: every new thread of the training process may get a malloc arena of its
    own, and the process's memory grew with the number of measurements.)

    A paused child cannot be orphaned: the tracker's child dies with the thread that started it
    (``PR_SET_PDEATHSIG`` sends ``SIGKILL``, which also ends a stopped process).
    """

    def __init__(self, pid: int, share: float, burst: float = THROTTLE_BURST_SECONDS) -> None:
        self._pid = pid
        self._on = burst
        self._pause_per_run = (1.0 - share) / share
        self._changed = threading.Condition()
        self._wanted = False  # pause the child in cycles (between start() and stop())
        self._cycling = False  # the thread is cycling (the child may be paused)
        self._closed = False
        #: wall-clock seconds the child was allowed to run (not paused) while cycling, so far
        self.run_seconds = 0.0
        #: CPU seconds of the throttling thread itself, so far (it wakes every burst)
        self.cpu_seconds = 0.0
        self._thread = threading.Thread(
            target=self._loop, name="cluster-tracking-throttle", daemon=True
        )
        self._thread.start()

    def start(self) -> None:
        """Begin pausing the child in cycles."""
        with self._changed:
            if not self._closed:
                self._wanted = True
                self._changed.notify_all()

    def stop(self) -> float:
        """Stop pausing the child; returns once it runs unpaused, with :attr:`run_seconds`."""
        with self._changed:
            self._wanted = False
            self._changed.notify_all()
            while self._cycling:
                self._changed.wait()
            return self.run_seconds

    def close(self) -> None:
        """Stop pausing the child for good and end the thread (the child runs on)."""
        with self._changed:
            self._closed = True
        self.stop()
        self._thread.join()

    def _loop(self) -> None:
        with self._changed:
            while True:
                while not self._wanted and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                self._cycling = True
                self._cycle()
                self._cycling = False
                self._changed.notify_all()

    def _cycle(self) -> None:
        """Pause and resume the child until :meth:`stop` (with ``_changed`` held; its waits
        release it)."""
        resumed = time.monotonic()
        try:
            while self._wanted:
                self._changed.wait(self._on)
                if not self._wanted:
                    break
                os.kill(self._pid, signal.SIGSTOP)
                ran = time.monotonic() - resumed
                self.run_seconds += ran
                self.cpu_seconds = time.thread_time()
                # paused in proportion to how long it really ran: this thread wakes late when
                # the training thread holds the GIL, and a burst that ran long is paid back
                self._changed.wait(ran * self._pause_per_run)  # stop() wakes it at once
                os.kill(self._pid, signal.SIGCONT)
                resumed = time.monotonic()
        except OSError:  # the child is gone
            self._wanted = False
        finally:
            self.run_seconds += time.monotonic() - resumed
            try:
                os.kill(self._pid, signal.SIGCONT)  # never leave it paused
            except OSError:
                pass


def can_throttle() -> bool:
    """Whether :class:`Throttle` can pause a child here (POSIX signals and, so that a paused
    child cannot be orphaned, Linux's ``PR_SET_PDEATHSIG``)."""
    return sys.platform.startswith("linux") and hasattr(signal, "SIGSTOP")
