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

Delivery is exactly once and survives W&B calls that fail: every item is first written to a local
spool (a :class:`~cluster_tracking.tracking.sinks.LocalDirectorySink`), then sent with a few quick
retries
(0.5 s, 1 s); when W&B still fails the item stays spooled, a
:class:`~cluster_tracking.errors.ClusterTrackingWarning` says so, training goes on, and
every later
call (and ``close()``) sends what is spooled, in order. ``delivered.json`` in the spool records what
was sent, so nothing is logged twice; after a send whose outcome is unknown (the process died during
it), the run's summary is checked before a history row is sent again. Config, summary fields and
artifacts are idempotent (an artifact with the same contents is the same version).

Threads: the tracker calls the sink from its background logging thread. W&B's ``run.log`` may be
called from any thread (checked with wandb 0.31: every record goes to wandb-core through one
asyncio thread); the sink never runs two W&B calls at once, and with ``commit=False`` it does not
touch the run's own step counter. wandb is imported when the sink is created, so
``cluster_tracking`` itself works without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cluster_tracking.errors import SinkError, describe, warn
from cluster_tracking.integrations.mlflow import _is_rank_zero
from cluster_tracking.report import (
    ARTIFACT_ROOT,
    ClusterabilityReport,
    logged_metrics,
    step_artifact_dir,
)
from cluster_tracking.tracking.sinks import LocalDirectorySink
from cluster_tracking.tracking.spool import DEFAULT_SPOOL_ROOT, Item, Outbox

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

#: The run param (W&B: config key) naming the procedure of the logged numbers.
PROCEDURE_PARAM = "clusterability.procedure"

#: The step metric every ``clusterability/*`` metric is plotted against (public).
STEP_METRIC = f"{ARTIFACT_ROOT}/step"
#: Artifact type of the per-step partition (one version per measured step).
PARTITION_ARTIFACT_TYPE = "clusterability-partition"
#: Artifact type of the summary files written at the end.
SUMMARY_ARTIFACT_TYPE = "clusterability-summary"
#: The cluster table's fixed columns; one column per layer (its node count) follows.
CLUSTER_TABLE_COLUMNS = ("cluster", "size", "cut", "volume", "ncut_term")

_UNKNOWN_ROW = -1  # our last row went out, but to which W&B step is not known
_TABLE_KEY = f"{ARTIFACT_ROOT}/clusters"
#: The per-step plots (:data:`~cluster_tracking.report.STEP_ARTIFACTS`) and their history
#: keys.
_IMAGE_KEYS = {
    "adjacency.png": f"{ARTIFACT_ROOT}/adjacency",
    "cluster_matrix.png": f"{ARTIFACT_ROOT}/cluster_matrix",
    "composition.png": f"{ARTIFACT_ROOT}/composition",
}
_TRAJECTORY_CHART_KEY = f"{ARTIFACT_ROOT}/trajectory"
_TRAJECTORY_IMAGE_KEY = f"{ARTIFACT_ROOT}/trajectory_image"
_REPORT_HTML_KEY = f"{ARTIFACT_ROOT}/report"

# The parts of each spooled item, delivered (and recorded) one by one, in this order.
_PARTS = {
    "params": ("params",),
    "report": ("metrics", "artifact"),
    "summary": ("partition", "artifact", "chart", "fields"),
}


def _import_wandb() -> ModuleType:
    try:
        import wandb
    except ImportError as error:
        raise SinkError(
            f"WandbSink needs the wandb package, which is not installed: {INSTALL_HINT}"
        ) from error
    return wandb


class _RunFinished(Exception):
    """The W&B run was finished before the tracker: nothing more can be logged to it."""


class WandbSink:
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
        wandb = _import_wandb()
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
        self._staged = 0  # artifact versions staged in the run folder
        self._wandb = wandb
        self._lock = threading.RLock()
        self._closed = False
        self._offline_error: BaseException | None = None
        self._defined = False
        self._pending_row: int | None = None  # W&B step whose open row holds our last data
        self.inert = not _is_rank_zero()
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

        self._temporary_spool = spool_dir is None
        root = DEFAULT_SPOOL_ROOT if spool_dir is None else Path(spool_dir)
        folder = "-".join(part for part in ("wandb", project, self.run_id) if part)
        self.spool = LocalDirectorySink(root / re.sub(r"[^A-Za-z0-9._-]", "_", folder))
        self._outbox = Outbox(
            self.spool.path,
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

    def _warn_if_other_procedure(self, params: Mapping[str, Any]) -> None:
        """One warning when the run's config (a resumed run, or a run an earlier tracker
        wrote to) names another clustering procedure than ``params``: n-cuts and z-scores of
        the two are not comparable. The config then takes the new value, as W&B allows."""
        try:
            old = dict(self.run.config).get(PROCEDURE_PARAM) if self.run is not None else None
        except Exception:  # a config W&B cannot read now: nothing to compare with
            return
        new = params.get(PROCEDURE_PARAM)
        if old is not None and new is not None and str(old) != str(new):
            warn(
                f"W&B run {self.run_id} was already measured under clustering procedure "
                f"{str(old)!r}; this tracker measures under {str(new)!r}: the run's n-cuts and "
                "z-scores of the two are not comparable (log them to separate runs). Its config "
                f"now says {str(new)!r}."
            )

    def log_report(
        self, report: ClusterabilityReport, step: int, artifacts: Mapping[str, Path]
    ) -> None:
        """Spool one report; send its history row (at ``clusterability/step`` = ``step``) and
        its partition artifact version."""
        if self.inert:
            return
        with self._lock:
            self.spool.copy_artifacts(artifacts, self.spool.path / step_artifact_dir(step))
            every = self.partition_every
            item = {
                "kind": "report",
                "step": int(step),
                "metrics": logged_metrics(report),
                "clusters": _cluster_table(report),
                "folder": step_artifact_dir(step),
                "files": sorted(Path(name).name for name in artifacts),
                "version": every is not None and self._measured % every == 0,
            }
            self._measured += 1
            previous, self._last_report = self._last_report, self._outbox.append(item)
            if previous is not None and all(previous is not kept for kept in self._outbox.items):
                shutil.rmtree(self.spool.path / previous["folder"], ignore_errors=True)
            self._drain()

    def log_summary(
        self, reports: Sequence[ClusterabilityReport], artifacts: Mapping[str, Path]
    ) -> None:
        """Spool and send the summary: artifact, trajectory plot and run summary fields."""
        if self.inert:
            return
        with self._lock:
            self.spool.log_summary(reports, artifacts)
            ordered = sorted(reports, key=lambda report: report.step or 0)
            last = self._last_report
            partition = None
            if last is not None and not last["version"]:  # the last step's version, at the end
                partition = {key: last[key] for key in ("step", "metrics", "folder", "files")}
            self._append(
                {
                    "kind": "summary",
                    "folder": ARTIFACT_ROOT,
                    "files": sorted(Path(name).name for name in artifacts),
                    "trajectory": [_trajectory_point(report) for report in ordered],
                    "final": _final_fields(ordered[-1]) if ordered else {},
                    "partition": partition,
                }
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
                warn(
                    f"{left} clusterability item(s) could not be delivered to the W&B run "
                    f"{self.run_id} ({describe(self._offline_error)}); they are kept in "
                    f"{self.spool.path}. Deliver them later to the resumed run with "
                    f"WandbSink(wandb.init(id={self.run_id!r}, resume='must'), spool_dir="
                    f"{str(self.spool.path.parent)!r}).close()."
                )
                return
            if self._temporary_spool:
                shutil.rmtree(self.spool.path, ignore_errors=True)

    # ---------------------------------------------------------------------------- delivery

    @property
    def pending(self) -> int:
        """Number of spooled items (params, reports, summary) not yet delivered."""
        if self.inert:
            return 0
        with self._lock:
            return self._outbox.pending

    def flush(self) -> bool:
        """Try to deliver everything spooled now; True when nothing is left."""
        if self.inert:
            return True
        with self._lock:
            return self._drain()

    def _append(self, entry: Item) -> None:
        self._outbox.append(entry)

    def _drain(self) -> bool:
        """Send every undelivered part, in order; stop at the first one W&B does not take."""
        delivered = self._outbox.drain(self._deliver)
        for item in self._outbox.prune():  # delivered items leave the spool at once
            if item is self._last_report and not item["version"]:
                continue  # its files are versioned at the end (see partition_every)
            if item["kind"] in ("report", "summary"):
                folder = self.spool.path / item["folder"]
                if item["kind"] == "summary":
                    for name in item["files"]:
                        (folder / name).unlink(missing_ok=True)
                    if item.get("partition"):  # the last step's files, versioned at the end
                        shutil.rmtree(
                            self.spool.path / item["partition"]["folder"], ignore_errors=True
                        )
                else:
                    shutil.rmtree(folder, ignore_errors=True)
        if not delivered:
            return False
        self._offline_error = None
        return True

    def _deliver(self, entry: dict[str, Any], key: str) -> bool:
        """One part of one item, with retries; False when W&B kept failing."""
        error: BaseException | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                if self._run_is_finished():
                    raise _RunFinished(f"the W&B run {self.run_id} is finished")
                if key in self._outbox.attempted and self._already_landed(entry, key):
                    self._outbox.mark(done=key)
                    return True
                self._outbox.mark(attempted=key)
                self._send(entry, key.split(":", 1)[1])
                self._outbox.mark(done=key)
                return True
            except _RunFinished as failure:
                error = failure
                break  # retrying cannot help
            except (TypeError, ValueError) as failure:  # W&B refuses this data: it never will
                self._outbox.mark(dropped=key)
                warn(
                    f"W&B refused clusterability item {key} ({_what(entry)}): "
                    f"{describe(failure)}. It is kept in {self.spool.path}."
                )
                return True
            except Exception as failure:
                error = failure
        if self._offline_error is None:
            if isinstance(error, _RunFinished):
                warn(
                    f"the W&B run {self.run_id} was finished before the clusterability tracker "
                    f"was closed; {_what(entry)} and later items are kept in {self.spool.path}. "
                    "Call tracker.close() before run.finish()."
                )
            else:
                warn(
                    f"W&B failed to log to run {self.run_id} ({describe(error)}); "
                    f"clusterability reports are spooled to {self.spool.path} and will be "
                    "delivered at the next report or at close(). Training goes on."
                )
        self._offline_error = error
        return False

    def _send(self, entry: dict[str, Any], part: str) -> None:
        with self._staging_in_run_folder():
            self._send_part(entry, part)

    @contextlib.contextmanager
    def _staging_in_run_folder(self) -> Iterator[None]:
        """While this sink calls W&B, W&B's data folder (``WANDB_DATA_DIR``, where it stages
        the files of artifacts and of the tables in history rows, and where offline runs leave
        them for good) is a folder inside the run's own folder, under ``WANDB_DIR``. The
        variable is read by W&B at each call; it is restored right after."""
        previous = os.environ.get("WANDB_DATA_DIR")
        os.environ["WANDB_DATA_DIR"] = str(self._staging_root() / "wandb-data")
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("WANDB_DATA_DIR", None)
            else:
                os.environ["WANDB_DATA_DIR"] = previous

    def _send_part(self, entry: dict[str, Any], part: str) -> None:
        run = self._run()
        if part == "params":
            run.config.update(entry["params"], allow_val_change=True)
        elif part == "metrics":
            self._log_row(self._report_row(entry))
        elif part == "artifact" and entry["kind"] == "report":
            if entry.get("version", True):
                self._log_partition(entry)
        elif part == "partition":
            if entry.get("partition"):
                self._log_partition(entry["partition"])
        elif part == "artifact":
            self._log_files(
                entry, self.summary_artifact_name, SUMMARY_ARTIFACT_TYPE, ["latest"], {}
            )
        elif part == "chart":
            row = self._summary_row(entry)
            if row:
                self._log_row(row)
        elif part == "fields":
            if entry["final"]:
                run.summary.update(entry["final"])
        else:  # an outbox written by a newer release
            raise ValueError(f"unknown part {part!r}")

    # ------------------------------------------------------------------------- W&B content

    def _define_metrics(self) -> None:
        """Plot ``clusterability/*`` against ``clusterability/step`` (once, before any row)."""
        if self._defined:
            return
        run = self._run()
        run.define_metric(STEP_METRIC)
        run.define_metric(f"{ARTIFACT_ROOT}/*", step_metric=STEP_METRIC)
        self._defined = True

    def _log_row(self, row: dict[str, Any]) -> None:
        """Add ``row`` to the run's history without touching the run's step counter.

        ``commit=False`` puts the values into the row being built at the current W&B step (the
        training loop's row), which the loop's next commit (or ``run.finish()``) writes. Values
        are plotted against ``clusterability/step``, so the W&B step they share does not matter;
        a committing ``run.log`` here would move the W&B step past the loop's current one, and
        W&B drops the loop's next values for that step. Two rows of ours must not share one
        W&B step (the second would overwrite the first): then the open row is committed first.

        The training loop may move to its next step at any moment, so the step our values went
        to is read *after* logging them: it is that step, or a later one when the loop moved on
        meanwhile (then our row is already written and a commit before our next row is merely
        unneeded, never harmful to our data).
        """
        self._define_metrics()
        run = self._run()
        try:
            current = int(run.step)
        except Exception:  # "shared" mode has no step to ask for: let W&B number the rows
            run.log(row)
            return
        if self._pending_row in (current, _UNKNOWN_ROW):
            run.log({}, commit=True)
        run.log(row, commit=False)
        self._pending_row = _UNKNOWN_ROW  # until we know better: the row is out
        try:
            self._pending_row = int(run.step)
        except Exception:  # the row was logged; commit before the next one to be safe
            pass

    def _report_row(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The history row of one measured step: images, cluster table, metrics, step."""
        wandb = self._wandb
        folder = self.spool.path / entry["folder"]
        row: dict[str, Any] = {}
        for name, key in _IMAGE_KEYS.items():
            if name in entry["files"]:
                # the media panel's slider is W&B's _step (when the row arrived): the caption
                # names the training step that was measured
                row[key] = wandb.Image(str(folder / name), caption=image_caption(entry["step"]))
        table = entry["clusters"]
        row[_TABLE_KEY] = wandb.Table(columns=table["columns"], data=table["data"])
        row.update(entry["metrics"])
        row[STEP_METRIC] = entry["step"]
        return row

    def _summary_row(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The history row of the end: n-cut trajectory with the null band, its image, the
        HTML report."""
        wandb = self._wandb
        folder = self.spool.path / entry["folder"]
        row: dict[str, Any] = {}
        points = entry["trajectory"]
        if points:
            band = [point for point in points if point["mean"] is not None]
            xs: list[list[int]] = [[point["step"] for point in points]]
            ys: list[list[float]] = [[point["ncut"] for point in points]]
            keys = ["ncut"]
            if band:
                steps = [point["step"] for point in band]
                xs += [steps] * 3
                ys += [
                    [point["mean"] for point in band],
                    [point["mean"] - point["std"] for point in band],
                    [point["mean"] + point["std"] for point in band],
                ]
                keys += ["null mean", "null mean - std", "null mean + std"]
            row[_TRAJECTORY_CHART_KEY] = wandb.plot.line_series(
                xs=xs,
                ys=ys,
                keys=keys,
                title="n-cut against training step, with the null model's mean +- std",
                xname="step",
            )
        if "trajectory.png" in entry["files"]:
            row[_TRAJECTORY_IMAGE_KEY] = wandb.Image(str(folder / "trajectory.png"))
        if "report.html" in entry["files"]:
            row[_REPORT_HTML_KEY] = wandb.Html(str(folder / "report.html"), inject=False)
        return row

    def _log_partition(self, entry: dict[str, Any]) -> None:
        """One version of the partition artifact, aliased ``step-<step>`` and ``latest``."""
        step = entry["step"]
        metadata = {"step": step}
        metadata.update({key.split("/", 1)[1]: value for key, value in entry["metrics"].items()})
        self._log_files(
            entry, self.artifact_name, PARTITION_ARTIFACT_TYPE, [f"step-{step}", "latest"], metadata
        )

    def _log_files(
        self,
        entry: dict[str, Any],
        name: str,
        kind: str,
        aliases: list[str],
        metadata: dict[str, Any],
    ) -> None:
        """Log the spooled files of ``entry`` as a version of artifact ``name``, under their
        folder (``clusterability/step-<step>/`` or ``clusterability/``)."""
        if not entry["files"]:
            return
        artifact = self._wandb.Artifact(name, type=kind, metadata=metadata)
        folder = self.spool.path / entry["folder"]
        # W&B would copy each file into its shared staging folder (``WANDB_DATA_DIR``, outside
        # ``WANDB_DIR``), where offline runs leave them for good: stage them in the run's own
        # folder instead, and add them as files W&B need not copy.
        self._staged += 1
        staging = self._staging_root() / f"{name}-{self._staged}" / entry["folder"]
        staging.mkdir(parents=True, exist_ok=True)
        for file in entry["files"]:
            staged = staging / file
            shutil.copyfile(folder / file, staged)
            artifact.add_file(
                str(staged), name=f"{entry['folder']}/{file}", policy="immutable", skip_cache=True
            )
        self._run().log_artifact(artifact, aliases=aliases)

    def _staging_root(self) -> Path:
        """Where this run's artifact files are staged: beside the run's ``files/`` folder."""
        run_dir = getattr(self._run(), "dir", None)
        if run_dir:
            return Path(run_dir).parent / "clusterability-artifacts"
        return self.spool.path / "staged"

    # ------------------------------------------------------------------------- bookkeeping

    def _already_landed(self, entry: dict[str, Any], key: str) -> bool:
        """After a send of unknown outcome: did this history row reach the run?

        The run's summary holds the last written value of each key, and rows are sent in
        order, so a report's row landed when the summary's ``clusterability/step`` is its
        step, and the summary's row when the trajectory is in the summary. A row that W&B
        holds open (not yet written) is not in the summary yet; sending it again puts the same
        values into the same open row, which is harmless. Config, summary fields and
        artifacts are idempotent: they are simply sent again.
        """
        summary = self._run().summary
        if key.endswith(":metrics"):
            return bool(summary.get(STEP_METRIC) == entry["step"])
        if key.endswith(":chart"):
            return summary.get(_TRAJECTORY_IMAGE_KEY) is not None or any(
                str(name).startswith(_TRAJECTORY_CHART_KEY) for name in summary.keys()
            )
        return False

    def _run(self) -> Run:
        assert self.run is not None  # only an inert sink has no run, and it sends nothing
        return self.run

    def _run_is_finished(self) -> bool:
        return bool(getattr(self.run, "_is_finished", False))

    def __repr__(self) -> str:
        return f"WandbSink(run_id={self.run_id!r})"


def image_caption(step: int) -> str:
    """The caption of a measured step's images: the training step they show (W&B's media
    panels are indexed by ``_step``, the row's arrival, not by the measured step)."""
    return f"measured at step {int(step)}"


def _plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Config values W&B shows as they are (numbers, strings, booleans); others as text."""
    plain = (bool, int, float, str)
    return {
        str(key): value if value is None or isinstance(value, plain) else str(value)
        for key, value in params.items()
    }


def _cluster_table(report: ClusterabilityReport) -> dict[str, list[Any]]:
    """Columns and rows of the cluster table: one row per cluster, one node count per layer.

    A layer whose name is already a column (``size``, ...) gets the column ``layer:<name>``.
    """
    layers = [layer.name for layer in report.layers]
    columns = list(CLUSTER_TABLE_COLUMNS)
    for name in layers:
        columns.append(name if name not in columns else f"layer:{name}")
    data = [
        [
            cluster.cluster,
            cluster.size,
            cluster.cut,
            cluster.volume,
            cluster.ncut_term,
            *(int(cluster.per_layer.get(name, 0)) for name in layers),
        ]
        for cluster in report.partition.clusters
    ]
    return {"columns": columns, "data": data}


def _trajectory_point(report: ClusterabilityReport) -> dict[str, Any]:
    baseline = report.baseline
    return {
        "step": report.step,
        "ncut": report.ncut,
        "mean": baseline.mean if baseline is not None else None,
        "std": baseline.std if baseline is not None else None,
    }


def _final_fields(report: ClusterabilityReport) -> dict[str, Any]:
    """Run summary fields of the last measured step (undefined values left out)."""
    metrics = report.metrics()
    fields: dict[str, Any] = {f"{ARTIFACT_ROOT}/final_step": report.step}
    for name in ("ncut", "z_score", "p_value"):
        value = metrics.get(f"{ARTIFACT_ROOT}/{name}")
        if value is not None:
            fields[f"{ARTIFACT_ROOT}/final_{name}"] = value
    return fields


def _what(entry: dict[str, Any]) -> str:
    if entry["kind"] == "report":
        return f"the report of step {entry['step']}"
    return f"the {entry['kind']}"
