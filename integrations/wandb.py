"""Log clusterability to Weights & Biases: ``cluster_tracking.integrations.wandb.WandbSink``.

>>> import wandb
>>> from cluster_tracking.integrations.wandb import WandbSink
>>> from cluster_tracking.tracking.tracker import ClusterabilityTracker
>>> run = wandb.init(project="p")
>>> tracker = ClusterabilityTracker(sinks=[WandbSink(run)], every_n_steps=200)
>>> for step, batch in enumerate(loader):
...     ...
...     run.log({"loss": loss}, step=step)   # your own logging stays as it is
...     tracker.step(model, step)
>>> tracker.close()                          # before run.finish()
>>> run.finish()

What lands in the run:

* config ``clusterability.k``, ``clusterability.shuffles``, ``clusterability.method``,
  ``clusterability.seed``, ... once;
* at every measured step, one history row with the metrics of
  :data:`~cluster_tracking.report.METRIC_KEYS` (``clusterability/ncut``, ``clusterability/z_score``,
  ...), the training step as ``clusterability/step``, the clusters as a :class:`wandb.Table`
  ``clusterability/clusters`` (columns ``cluster``, ``size``, ``cut``, ``volume``, ``ncut_term``
  and one node count per layer) and the plots as :class:`wandb.Image` ``clusterability/adjacency``,
  ``clusterability/cluster_matrix`` and ``clusterability/composition``, each captioned
  ``measured at step <step>``;
* on a schedule (``partition_every``: the first measured step, every 10th after it, and the last
  one at the end), a new version of the artifact ``clusterability-partition-<run id>`` (type
  ``clusterability-partition``, aliases ``step-<step>`` and ``latest``) holding
  ``clusterability/step-<step>/report.json``, ``adjacency.png``, ``cluster_matrix.png`` and
  ``composition.png``, so a long run does not write hundreds of versions;
* at the end, the artifact ``clusterability-summary-<run id>`` (type ``clusterability-summary``)
  with ``clusterability/summary.json``, ``trajectory.png`` and ``report.html``; a native line plot
  ``clusterability/trajectory`` of the n-cut against the step with the null model's mean and
  mean +- one standard deviation; the image ``clusterability/trajectory_image`` and the HTML
  report ``clusterability/report``; and the run summary fields ``clusterability/final_ncut``,
  ``clusterability/final_z_score``, ``clusterability/final_p_value``, ``clusterability/final_step``.

Steps. The ``clusterability/*`` metrics are plotted against their own step metric
``clusterability/step`` (``run.define_metric``), never against W&B's ``_step``: the sink never
passes ``step=`` to ``run.log`` and never advances the run's step counter itself. Its rows join
the row your loop is building (``commit=False``), so your ``run.log(..., step=s)`` calls keep their
steps. Only when two of its rows would land in the same W&B step (a burst of deliveries after an
outage, or measurements finishing faster than the loop logs) does it close that step first (one
``run.log({}, commit=True)``); a loop that logs that same step again afterwards then gets W&B's
usual warning for a step that went backwards. (A plain ``run.log(row)``, which commits every time,
would do this at every measurement.)

So a measured step's row, metrics and images together, lands at the W&B step (``_step``) that is
current when the tracker delivers it: the loop's own row of that step when measuring keeps pace
with training (a few steps after the measured one: the time of one measurement), later rows
when it falls behind, and rows after the loop's last step for measurements delivered at
``close()`` (each in a W&B step of its own). W&B cannot add to a step that was already written.
Line charts use ``clusterability/step`` and are exact whatever ``_step`` is; media panels (the
heat map, cluster matrix and composition images, the cluster table) step through ``_step``, and
each image's caption names the training step measured (``measured at step 2000``).

Delivery is exactly once and survives W&B calls that fail
(:mod:`cluster_tracking.tracking.delivery`): every item is first written to a local spool, then
sent with a few quick retries (0.5 s, 1 s); when W&B still fails the item stays spooled, a
:class:`~cluster_tracking.errors.ClusterTrackingWarning` says so, training goes on, and every
later call (and ``close()``) sends what is spooled, in order. ``delivered.json`` in the spool
records what was sent, so nothing is logged twice; after a send whose outcome is unknown (the
process died during it), the run's summary is checked before a history row is sent again.
Config, summary fields and artifacts are idempotent.

Threads: the tracker calls the sink from its background logging thread. W&B's ``run.log`` may be
called from any thread (checked with wandb 0.31: every record goes to wandb-core through one
asyncio thread); the sink never runs two W&B calls at once, and with ``commit=False`` it does not
touch the run's own step counter. wandb is imported when the sink is created, so
``cluster_tracking`` itself works without it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster_tracking.errors import SinkError, describe, warn
from cluster_tracking.integrations._wandb_rows import (
    CLUSTER_TABLE_COLUMNS,
    PARTITION_ARTIFACT_TYPE,
    STEP_METRIC,
    SUMMARY_ARTIFACT_TYPE,
    _WandbRows,
    cluster_table,
    final_fields,
    image_caption,
    trajectory_point,
)
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.tracking.delivery import Outcome, require_package, send_with_retries
from cluster_tracking.tracking.spool import DEFAULT_SPOOL_ROOT, Item

if TYPE_CHECKING:
    from wandb import Run

__all__ = [
    "CLUSTER_TABLE_COLUMNS",
    "INSTALL_HINT",
    "PARTITION_ARTIFACT_TYPE",
    "STEP_METRIC",
    "SUMMARY_ARTIFACT_TYPE",
    "WandbSink",
    "image_caption",
]

#: How to install what this module needs.
INSTALL_HINT = "pip install 'cluster-tracking[wandb]'"

# The parts of each spooled item, delivered (and recorded) one by one, in this order.
_PARTS = {
    "params": ("params",),
    "report": ("metrics", "artifact"),
    "summary": ("partition", "artifact", "chart", "fields"),
}


class _RunFinished(Exception):
    """The W&B run was finished before the tracker: nothing more can be logged to it."""


class WandbSink(_WandbRows):
    """A :class:`~cluster_tracking.tracking.sinks.Sink` that logs clusterability to a W&B run.

    The sink logs to a run you started; it never starts or finishes one. Close the tracker before
    ``run.finish()`` so that the last report and the summary reach the run.

    Args:
        run: the run to log to (what ``wandb.init()`` returned). ``None``: the current
            ``wandb.run``.
        spool_dir: where items wait while W&B fails; the spool of run ``R`` of project ``P`` is
            ``spool_dir/wandb-P-R``. ``None``: a folder under the system's temp dir, removed by
            ``close()`` once everything is delivered. A sink created later for the same (resumed)
            run with the same ``spool_dir`` delivers what an earlier process left there.
        retries: tries per item before it stays spooled until the next call (at least 1).
        backoff: seconds before the 2nd try; doubled for each further try.
        artifact_name: name of the partition artifact (``None``:
            ``clusterability-partition-<run id>``).
        partition_every: version the partition artifact at the first measured step and at
            every ``partition_every``-th one after it; the last measured step is versioned at
            the end in any case. ``1``: every measured step; ``None``: the last one only.

    Artifact files, and the cluster tables W&B stages for history rows, are staged inside the
    run's own folder (``clusterability-artifacts/`` beside its ``files/``, under ``WANDB_DIR``),
    not in W&B's shared staging folder (``WANDB_DATA_DIR``, by default under ``~/.local/share``),
    so that nothing of the run is left outside ``WANDB_DIR`` after ``run.finish()``; ``wandb
    sync`` of an offline run uploads them from there.

    Raises:
        SinkError: wandb is not installed, there is no run, ``retries`` is below 1, or
            ``artifact_name`` is not a valid W&B artifact name.
    """

    def __init__(
        self,
        run: Run | None = None,
        *,
        spool_dir: str | os.PathLike[str] | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        artifact_name: str | None = None,
        partition_every: int | None = 10,
    ) -> None:
        wandb = require_package("wandb", "WandbSink", INSTALL_HINT)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise SinkError(f"retries must be an integer >= 1, got {retries!r}.")
        self.retries = retries
        self.backoff = float(backoff)
        if partition_every is not None and (
            isinstance(partition_every, bool)
            or not isinstance(partition_every, int)
            or partition_every < 1
        ):
            raise SinkError(
                f"partition_every must be an integer >= 1 or None, got {partition_every!r}."
            )
        self.partition_every = partition_every
        self._measured = 0  # reports given to this sink
        self._last_report: dict[str, Any] | None = None  # the newest report item
        self._init_rows(wandb)
        self._init_delivery()
        self.run: Run | None = None
        self.run_id = ""
        self.artifact_name = self.summary_artifact_name = ""
        if self.inert:  # other ranks of a distributed run: no run, no spool, no calls
            return

        if run is None:
            run = wandb.run
        if run is None:
            raise SinkError(
                "WandbSink has no W&B run to log to: call wandb.init() first or pass "
                "run=wandb.init(...)."
            )
        self.run = run
        self.run_id = str(run.id)
        project = str(getattr(run, "project", "") or "")
        self.artifact_name = artifact_name or f"clusterability-partition-{self.run_id}"
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", self.artifact_name):
            raise SinkError(
                f"artifact_name={self.artifact_name!r}: W&B artifact names are 1-128 letters, "
                "digits, '-', '_' or '.'."
            )
        self.summary_artifact_name = f"clusterability-summary-{self.run_id}"

        root = DEFAULT_SPOOL_ROOT if spool_dir is None else Path(spool_dir)
        folder = "-".join(part for part in ("wandb", project, self.run_id) if part)
        self._open_spool(
            root / re.sub(r"[^A-Za-z0-9._-]", "_", folder),
            temporary=spool_dir is None,
            parts=lambda entry: _PARTS[entry["kind"]],
            identity={"run_id": self.run_id},
        )
        try:
            self._define_metrics()
        except Exception:  # retried before the first row; a failing W&B must not stop training
            pass

    # ------------------------------------------------------------------------------ Sink API

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Spool the tracker's settings and send them to the run's config."""
        if self.inert:
            return
        self._warn_if_other_procedure(params)
        with self._lock:
            self.spool.log_params(params)
            self._append({"kind": "params", "params": _plain_params(params)})
            self._drain()

    def log_report(
        self, report: ClusterabilityReport, step: int, artifacts: Mapping[str, Path]
    ) -> None:
        """Spool one report; send its history row (at ``clusterability/step`` = ``step``) and
        its partition artifact version."""
        if self.inert:
            return
        with self._lock:
            every = self.partition_every
            item = self._spool_report(
                report,
                step,
                artifacts,
                clusters=cluster_table(report),
                version=every is not None and self._measured % every == 0,
            )
            self._measured += 1
            previous, self._last_report = self._last_report, item
            if previous is not None and all(previous is not kept for kept in self._outbox.items):
                shutil.rmtree(self.spool_path / previous["folder"], ignore_errors=True)
            self._drain()

    def log_summary(
        self, reports: Sequence[ClusterabilityReport], artifacts: Mapping[str, Path]
    ) -> None:
        """Spool and send the summary: artifact, trajectory plot and run summary fields."""
        if self.inert:
            return
        with self._lock:
            ordered = sorted(reports, key=lambda report: report.step or 0)
            last = self._last_report
            partition = None
            if last is not None and not last["version"]:  # the last step's version, at the end
                partition = {key: last[key] for key in ("step", "metrics", "folder", "files")}
            self._spool_summary(
                reports,
                artifacts,
                trajectory=[trajectory_point(report) for report in ordered],
                final=final_fields(ordered[-1]) if ordered else {},
                partition=partition,
            )
            self._drain()

    def close(self) -> None:
        """Deliver what is spooled. Never finishes the run. Idempotent.

        Whatever still cannot be delivered stays in :attr:`spool` (a warning says where).
        """
        if self.inert:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            delivered = self._drain()
            left = self.pending
            if not delivered or left:
                self._warn_undelivered(
                    left,
                    describe(self._offline_error),
                    f"later to the resumed run with WandbSink(wandb.init(id={self.run_id!r}, "
                    f"resume='must'), spool_dir="
                    f"{str(self.spool_path.parent)!r}).close()",
                )
                return
            self._remove_temporary_spool()

    # ---------------------------------------------------------------------------- delivery

    def flush(self) -> bool:
        """Try to deliver everything spooled now; True when nothing is left."""
        if self.inert:
            return True
        with self._lock:
            return self._drain()

    def _destination(self) -> str:
        return f"the W&B run {self.run_id}"

    def _drain(self) -> bool:
        """Send every undelivered part, in order; stop at the first one W&B does not take."""
        delivered = self._outbox.drain(self._deliver)
        self._prune()  # delivered items leave the spool at once
        if not delivered:
            return False
        self._offline_error = None
        return True

    def _discard(self, item: Item) -> None:
        if item is self._last_report and not item["version"]:
            return  # its files are versioned at the end (see partition_every)
        super()._discard(item)
        if item["kind"] == "summary" and item.get("partition"):
            # the last step's files, versioned at the end
            shutil.rmtree(self.spool_path / item["partition"]["folder"], ignore_errors=True)

    def _deliver(self, entry: dict[str, Any], key: str) -> bool:
        """One part of one item, with retries; False when W&B kept failing."""

        def send() -> None:
            if self._run_is_finished():
                raise _RunFinished(f"the W&B run {self.run_id} is finished")
            if key in self._outbox.attempted and self._already_landed(entry, key):
                self._outbox.mark(done=key)
                return
            self._outbox.mark(attempted=key)
            self._send(entry, key.split(":", 1)[1])
            self._outbox.mark(done=key)

        outcome, error = send_with_retries(
            send,
            retries=self.retries,
            backoff=self.backoff,
            # W&B refuses this data (TypeError, ValueError): it never will
            refused=lambda failure: isinstance(failure, (TypeError, ValueError)),
            hopeless=lambda failure: isinstance(failure, _RunFinished),
        )
        if outcome is Outcome.DELIVERED:
            return True
        if outcome is Outcome.REFUSED:
            self._outbox.mark(dropped=key)
            warn(
                f"W&B refused clusterability item {key} ({_what(entry)}): "
                f"{describe(error)}. It is kept in {self.spool_path}."
            )
            return True
        if isinstance(error, _RunFinished):
            message = (
                f"the W&B run {self.run_id} was finished before the clusterability tracker "
                f"was closed; {_what(entry)} and later items are kept in {self.spool_path}. "
                "Call tracker.close() before run.finish()."
            )
        else:
            message = (
                f"W&B failed to log to run {self.run_id} ({describe(error)}); "
                f"clusterability reports are spooled to {self.spool_path} and will be "
                "delivered at the next report or at close(). Training goes on."
            )
        self._went_offline(error, message)
        return False

    def _run_is_finished(self) -> bool:
        return bool(getattr(self.run, "_is_finished", False))

    def __repr__(self) -> str:
        return f"WandbSink(run_id={self.run_id!r})"


def _plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Config values W&B shows as they are (numbers, strings, booleans); others as text."""
    plain = (bool, int, float, str)
    return {
        str(key): value if value is None or isinstance(value, plain) else str(value)
        for key, value in params.items()
    }


def _what(entry: dict[str, Any]) -> str:
    if entry["kind"] == "report":
        return f"the report of step {entry['step']}"
    return f"the {entry['kind']}"
