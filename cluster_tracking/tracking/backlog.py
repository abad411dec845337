"""The backlog policy: what a due step does while snapshots already wait for the worker.

At most ``max_pending`` snapshots wait. When one more is due, the newest wins, so that the
dashboard follows training: ``on_backlog="skip"`` replaces the *oldest* waiting snapshot with
the new one, ``on_backlog="queue"`` the *newest* (the older ones are measured in order). A
snapshot of ``checkpoint()`` is never replaced; when only those wait, the new due step is the
one skipped. Skipped steps are recorded, counted in
:data:`~cluster_tracking.report.SKIPPED_STEPS_METRIC`, and the first one gives a warning that
names the knobs.
"""

from __future__ import annotations

from cluster_tracking.errors import warn
from cluster_tracking.report import SKIPPED_STEPS_METRIC
from cluster_tracking.tracking.snapshots import Snapshot
from cluster_tracking.tracking.state import _TrackerState


class _Backlog(_TrackerState):
    """The training thread's side of the queue of snapshots."""

    def _admit(self, snapshot: Snapshot) -> bool:
        """Queue ``snapshot`` for the worker under the backlog policy (training thread); False
        when it was skipped itself (only checkpoints wait)."""
        taken = True
        with self._wake:
            warn_skip = False
            if not snapshot.explicit and len(self._pending) >= self.max_pending:
                replaceable = [waiting for waiting in self._pending if not waiting.explicit]
                if replaceable:  # newest wins: a waiting snapshot makes room
                    victim = replaceable[0] if self.on_backlog == "skip" else replaceable[-1]
                    self._pending.remove(victim)
                    self._skipped.append(victim.step)
                else:  # only checkpoints wait, and they are never dropped
                    self._skipped.append(snapshot.step)
                    taken = False
                self._skipped_since += 1
                self._finish_one()
                warn_skip, self._warned_skip = not self._warned_skip, True
            if taken:
                self._pending.append(snapshot)
                self._wake.notify_all()
        if warn_skip:
            self._warn_cannot_keep_up()
        return taken

    def _warn_cannot_keep_up(self) -> None:
        """The first skipped step's warning: what was replaced, and the knobs that help."""
        budget = (
            "no max_overhead limit"
            if self.max_overhead is None
            else f"max_overhead={self.max_overhead:g}: measuring slows training by at most "
            f"{self.max_overhead:.0%}"
        )
        warn(
            f"clusterability cannot keep up with training ({budget}, "
            f"every_n_steps={self.every_n_steps}, shuffles={self.shuffles}, "
            f"plots={self.plots}): a newer due step replaced a waiting one "
            f"(on_backlog={self.on_backlog!r}, max_pending={self.max_pending}); skipped "
            f"steps are counted in the metric {SKIPPED_STEPS_METRIC} and listed in the "
            "summary. To measure more of them, raise max_overhead, measure less often, use "
            "fewer shuffles, or pass plots=False.",
            stacklevel=5,
        )
