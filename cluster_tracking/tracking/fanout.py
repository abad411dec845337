"""The tracker's logging thread: hands every report, and the summary, to every sink.

Calls come one at a time, in order (params once, a report per measured step, the summary at the
end); a sink's exception becomes a warning and the report stays in the tracker's other sinks. A
step's working files go as soon as every sink has had them. ``close`` reaches each sink last,
from the thread that closes the tracker, with what is left of ``close(timeout)`` when the sink
takes a ``timeout``.
"""

from __future__ import annotations

import inspect
import shutil
import time
from typing import Any

from cluster_tracking.errors import describe, warn
from cluster_tracking.tracking.state import _STOP, _TrackerState


class _FanOut(_TrackerState):
    """The logging thread of a tracker, and the closing of its sinks."""

    def _log_loop(self) -> None:
        while True:
            self._log_cpu = time.thread_time()  # counted in the budget (see _pace)
            item = self._log_queue.get()
            if item is _STOP:
                return
            kind = item[0]
            if kind == "params":
                self._call_sinks("log_params", item[1])
            elif kind == "report":
                _, report, artifacts = item
                self._call_sinks(
                    "log_report", report, report.step, artifacts, where=f" at step {report.step}"
                )
                shutil.rmtree(next(iter(artifacts.values())).parent, ignore_errors=True)
                with self._idle:
                    self._finish_one()
            elif kind == "summary":
                self._call_sinks("log_summary", item[1], item[2], where=" (the summary)")

    def _call_sinks(self, method: str, *args: Any, where: str = "") -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as error:
                warn(
                    f"{sink!r}.{method}{where} failed: {describe(error)}. Training goes on; "
                    "the report stays in the tracker's other sinks."
                )

    def _close_sinks(self, deadline: float | None) -> None:
        """Close every sink, passing what is left until ``deadline`` to those that take a
        ``timeout``; a failure becomes a warning."""
        for sink in self.sinks:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if "timeout" in inspect.signature(sink.close).parameters:
                    sink.close(timeout=remaining)  # type: ignore[call-arg]
                else:
                    sink.close()
            except Exception as error:
                warn(f"closing {sink!r} failed: {describe(error)}.", stacklevel=4)
