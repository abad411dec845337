"""What the W&B sink puts into a run: history rows (metrics, images, the cluster table, the
trajectory chart) and artifact versions, staged inside the run's own folder.

The private half of :mod:`cluster_tracking.integrations.wandb` (which documents the layout and
exports the public names): :class:`_WandbRows` is mixed into ``WandbSink`` and calls W&B only
through the run the sink holds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cluster_tracking.errors import warn
from cluster_tracking.report import ARTIFACT_ROOT, PROCEDURE_PARAM, ClusterabilityReport
from cluster_tracking.tracking.delivery import SpooledSink

if TYPE_CHECKING:
    from wandb import Run

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


class _WandbRows(SpooledSink):
    """The W&B content of a sink: rows, tables, artifacts (see the module docstring)."""

    run: Run | None
    run_id: str
    artifact_name: str
    summary_artifact_name: str

    def _init_rows(self, wandb: ModuleType) -> None:
        self._wandb = wandb
        self._staged = 0  # artifact versions staged in the run folder
        self._defined = False
        self._pending_row: int | None = None  # W&B step whose open row holds our last data

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

    def _send(self, entry: dict[str, Any], part: str) -> None:
        with self._staging_in_run_folder():
            self._send_part(entry, part)

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


def image_caption(step: int) -> str:
    """The caption of a measured step's images: the training step they show (W&B's media
    panels are indexed by ``_step``, the row's arrival, not by the measured step)."""
    return f"measured at step {int(step)}"


def cluster_table(report: ClusterabilityReport) -> dict[str, list[Any]]:
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


def trajectory_point(report: ClusterabilityReport) -> dict[str, Any]:
    baseline = report.baseline
    return {
        "step": report.step,
        "ncut": report.ncut,
        "mean": baseline.mean if baseline is not None else None,
        "std": baseline.std if baseline is not None else None,
    }


def final_fields(report: ClusterabilityReport) -> dict[str, Any]:
    """Run summary fields of the last measured step (undefined values left out)."""
    metrics = report.metrics()
    fields: dict[str, Any] = {f"{ARTIFACT_ROOT}/final_step": report.step}
    for name in ("ncut", "z_score", "p_value"):
        value = metrics.get(f"{ARTIFACT_ROOT}/{name}")
        if value is not None:
            fields[f"{ARTIFACT_ROOT}/final_{name}"] = value
    return fields
