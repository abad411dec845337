"""Closing a tracker: the measuring thread measures what waits at full speed, the logging thread
delivers it, then every sink is closed; within ``close(timeout)``, or else what is left is named
in one warning, the worker process is ended (no orphan), and what was measured still goes to the
sinks.
"""

from __future__ import annotations

import shutil
import time

from cluster_tracking.errors import warn
from cluster_tracking.tracking.fanout import _FanOut
from cluster_tracking.tracking.state import _STOP


class _Closing(_FanOut):
    """The end of a tracker's threads, worker process and sinks."""

    def _close(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if self._measure_thread is not None and self._log_thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify_all()
            self._closing.set()  # measure what is left at full speed
            worker = self._worker
            if worker is not None:
                worker.unthrottle()
            self._measure_thread.join(remaining())
            if self._measure_thread.is_alive():
                self._give_up(timeout)
            self._log_thread.join(remaining())
            if self._log_thread.is_alive():
                warn(
                    f"gave up waiting for the clusterability tracker's sinks after {timeout} s "
                    "(a sink is still busy with a report); the sinks were not closed."
                )
                return
        self._close_sinks(deadline)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._snapshotter.clear()

    def _give_up(self, timeout: float | None) -> None:
        """``close(timeout)`` ran out while measuring: drop what waits, end the worker process
        (no orphan is left), and let the logging thread deliver what was measured."""
        with self._lock:
            self._abandoned = True
            dropped = sorted([snapshot.step for snapshot in self._pending])
            self._pending.clear()
            unmeasured = self._in_flight - self._log_queue.qsize()
        worker = self._worker
        if worker is not None:
            worker.kill()
        self._log_queue.put(_STOP)  # after the reports already measured
        warn(
            f"gave up waiting for the clusterability tracker after {timeout} s: "
            f"{max(unmeasured, len(dropped))} due step(s) were not measured"
            f"{' (' + ', '.join(map(str, dropped)) + ' waiting)' if dropped else ''}; the worker "
            "process was ended. What was measured goes to the sinks."
        )
