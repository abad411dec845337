"""The training thread's side of a tracker: a hook call becomes a snapshot queued for the
measuring thread (at most once per step, on rank 0 only), and ``close()`` may measure the model
of the latest call (``measure_final``).

Nothing here blocks training for long or raises into it: a snapshot that fails becomes a warning
and a failed step.
"""

from __future__ import annotations

import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from cluster_tracking.errors import GraphError, describe, warn
from cluster_tracking.tracking.backlog import _Backlog
from cluster_tracking.tracking.distributed import is_rank_zero
from cluster_tracking.tracking.fanout import _FanOut
from cluster_tracking.tracking.measuring import _Measuring


class _Requests(_Backlog, _Measuring, _FanOut):
    """Hook calls turned into snapshots for the measuring thread, which it starts."""

    def _note_latest(self, model: nn.Module | Mapping[str, Any], step: int) -> None:
        """Remember the model and step of the latest hook call (for ``measure_final``)."""
        self._last_step = step
        if isinstance(model, nn.Module):
            if not isinstance(self._last_model, weakref.ref) or self._last_model() is not model:
                self._last_model = weakref.ref(model)
        else:
            self._last_model = model

    def _measure_final(self) -> None:
        """At ``close()``: snapshot the latest model seen unless its step is measured or waits
        (the last due step was skipped, or steps ran past it)."""
        if self._closed or self._last_model is None or self._measure_thread is None:
            return
        step = self._last_step
        with self._lock:
            if step in self._requested and step not in self._skipped:
                return
        model = self._last_model
        if isinstance(model, weakref.ref):
            model = model()
            if model is None:
                return  # the model is gone: nothing newer to measure
        self._request(model, step, explicit=True)

    def _check_step(self, value: Any, what: str = "step") -> int | None:
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if isinstance(value, bool) or number < 0 or number != value:
            warn(f"{what}={value!r} is not an integer >= 0; the clusterability hook ignored it.")
            return None
        return number

    def _request(
        self, model: nn.Module | Mapping[str, Any], step: int, *, explicit: bool = False
    ) -> bool:
        """Snapshot ``model`` at ``step`` for the worker, unless the step was seen or skipped.

        ``explicit`` requests (checkpoints) are never skipped for backlog, and may take again a
        step that the backlog policy skipped before."""
        if self._closed:
            if not self._warned_closed:
                self._warned_closed = True
                warn(f"the clusterability tracker is closed; step {step} was not measured.")
            return False
        if not is_rank_zero(self.rank):
            return False
        with self._lock:
            if step in self._requested:
                if not (explicit and step in self._skipped):
                    return False
                self._skipped.remove(step)
            self._requested.add(step)
            self._in_flight += 1
        try:
            self._ensure_started()
            snapshot = self._snapshotter.take(model, step)
        except Exception as error:
            with self._idle:
                self._failed.append(step)
                self._finish_one()
            if not isinstance(error, GraphError):
                warn(
                    f"could not snapshot the model for clusterability at step {step}: "
                    f"{describe(error)}. Training goes on; this step is not measured."
                )
            elif not self._warned_untraceable:
                self._warned_untraceable = True
                warn(
                    f"could not build the weight graph for clusterability at step {step}: "
                    f"{describe(error)}. Training goes on; no due step of this model is "
                    "measured (warned once)."
                )
            return False
        snapshot.explicit = explicit
        return self._admit(snapshot)

    def _ensure_started(self) -> None:
        if self._measure_thread is not None:
            return
        self._workdir = Path(tempfile.mkdtemp(prefix="cluster-tracking-"))
        self._log_queue.put(("params", self._params()))
        self._log_thread = threading.Thread(
            target=self._log_loop, name="cluster-tracking-log", daemon=True
        )
        self._measure_thread = threading.Thread(
            target=self._measure_loop, name="cluster-tracking-measure", daemon=True
        )
        self._log_thread.start()
        self._measure_thread.start()
