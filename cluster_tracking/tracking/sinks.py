"""Sinks: where a :class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker` sends
its reports.

A sink adapts the core's :class:`~cluster_tracking.report.ClusterabilityReport` to one destination
(a local directory, an MLflow run, a W&B run). The tracker calls every sink from its background
logging thread, one call at a time, in this order: :meth:`Sink.log_params` once, then
:meth:`Sink.log_report` for each measured step (in the order the measurements finish, which is
the order of the steps), :meth:`Sink.log_summary` once at the end, and :meth:`Sink.close` from
the thread that closes the tracker. An exception raised by a sink becomes a warning; it never
reaches the training loop.

Artifacts are plain files that the tracker wrote into its own working directory; a sink copies or
uploads them *during* the call (the tracker deletes its working directory when it closes). Their
names are stable (:data:`~cluster_tracking.report.STEP_ARTIFACTS` per step,
:data:`~cluster_tracking.report.SUMMARY_ARTIFACTS` in the summary). Every sink puts per-step
artifacts under ``clusterability/step-<step>/`` and summary artifacts under ``clusterability/``
(:mod:`cluster_tracking.report.layout`).

:class:`LocalDirectorySink` is the core's own sink; the MLflow sink also uses it as its spool.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cluster_tracking.errors import SinkError
from cluster_tracking.report import ARTIFACT_ROOT, ClusterabilityReport, step_artifact_dir


@runtime_checkable
class Sink(Protocol):
    """What a tracker needs from a destination of clusterability reports.

    Implement the four methods (no base class needed). Calls come from the tracker's background
    thread, never concurrently; ``close`` comes last, from the thread that closes the tracker.
    """

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the tracker's settings once (``clusterability.k``, ``clusterability.seed``...)."""

    def log_report(
        self, report: ClusterabilityReport, step: int, artifacts: Mapping[str, Path]
    ) -> None:
        """Record one measurement: ``report.metrics()`` at ``step`` and the files in
        ``artifacts`` (name -> path, valid only during the call) under
        ``clusterability/step-<step>/``."""

    def log_summary(
        self, reports: Sequence[ClusterabilityReport], artifacts: Mapping[str, Path]
    ) -> None:
        """Record the end of the run: all reports (by step) and the summary files (name -> path,
        valid only during the call) under ``clusterability/``."""

    def close(self) -> None:
        """Deliver anything still buffered and release resources. Called once."""


class LocalDirectorySink:
    """A sink that writes everything to a local directory, readable without any platform.

    Layout under ``path``::

        params.json                               the tracker's settings, and "run_id"
        reports.jsonl                             one report per line (ClusterabilityReport JSON)
        clusterability/step-<step>/report.json    per step: report, heat map, composition chart
        clusterability/step-<step>/adjacency.png
        clusterability/step-<step>/composition.png
        clusterability/summary.json               at close: all steps, skipped steps
        clusterability/trajectory.png             n-cut against step with the null band
        clusterability/report.html                self-contained HTML report

    Each line of ``reports.jsonl`` parses with :meth:`ClusterabilityReport.from_json`; read them
    all with :meth:`read_reports`. Every sink is one run with its own :attr:`run_id`, written into
    each report line (``config["run_id"]``) and into ``params.json``, so a second run writing to
    the same directory appends lines that ``read_reports(run_id=...)`` tells apart (its plots
    and summary replace the first run's; give each run its own directory to keep both).

    Args:
        path: the directory (created if missing).
        run_id: this run's id; default a new one, ``YYYYmmdd-HHMMSS-`` and 6 random hex digits.
    """

    def __init__(self, path: str | os.PathLike[str], *, run_id: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id if run_id is not None else new_run_id()
        if not isinstance(self.run_id, str) or not self.run_id.strip():
            raise SinkError(f"run_id must be a non-empty string, got {run_id!r}.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SinkError(
                f"cannot create the report directory {str(self.path)!r} ({error}); "
                "pass a writable path."
            ) from error

    @property
    def reports_file(self) -> Path:
        """The JSON-lines file of reports."""
        return self.path / "reports.jsonl"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Write (or update) ``params.json``."""
        file = self.path / "params.json"
        current: dict[str, Any] = {}
        if file.exists():
            current = json.loads(file.read_text(encoding="utf-8"))
        current.update({str(key): _plain(value) for key, value in params.items()})
        current["run_id"] = self.run_id
        _write_atomic(file, json.dumps(current, indent=2, sort_keys=True))

    def log_report(
        self, report: ClusterabilityReport, step: int, artifacts: Mapping[str, Path]
    ) -> None:
        """Append the report, with this run's id, to ``reports.jsonl`` and copy its artifacts to
        its step folder."""
        self.copy_artifacts(artifacts, self.path / step_artifact_dir(step))
        line = _with_run(report, step, self.run_id).to_json() + "\n"
        with open(self.reports_file, "a", encoding="utf-8") as handle:
            handle.write(line)  # one write per line: a reader never sees half a report
            handle.flush()

    def log_summary(
        self, reports: Sequence[ClusterabilityReport], artifacts: Mapping[str, Path]
    ) -> None:
        """Copy the summary artifacts to ``clusterability/``."""
        self.copy_artifacts(artifacts, self.path / ARTIFACT_ROOT)

    def close(self) -> None:
        """Nothing to release: every call already wrote its files."""

    def read_reports(self, run_id: str | None = None) -> list[ClusterabilityReport]:
        """The reports written so far, in the order they were logged: every run's, or only those
        of ``run_id`` (``sink.run_id`` for this sink's own)."""
        if not self.reports_file.exists():
            return []
        lines = self.reports_file.read_text(encoding="utf-8").splitlines()
        reports = [ClusterabilityReport.from_json(line) for line in lines if line.strip()]
        if run_id is None:
            return reports
        return [report for report in reports if report.config.get("run_id") == run_id]

    @staticmethod
    def copy_artifacts(artifacts: Mapping[str, Path], folder: Path) -> dict[str, Path]:
        """Copy ``artifacts`` (name -> path) into ``folder``; returns name -> new path."""
        folder.mkdir(parents=True, exist_ok=True)
        copied = {}
        for name, source in artifacts.items():
            target = folder / Path(name).name
            shutil.copyfile(source, target)
            copied[name] = target
        return copied

    def __repr__(self) -> str:
        return f"LocalDirectorySink({str(self.path)!r})"


def new_run_id() -> str:
    """A new run id for :class:`LocalDirectorySink`: the UTC time and 6 random hex digits
    (``20261204-184200-3fa9c1``), so ids sort by start time and never collide in practice."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _with_run(report: ClusterabilityReport, step: int, run_id: str) -> ClusterabilityReport:
    """A copy of ``report`` at ``step`` with ``config["run_id"]`` set (the caller's is kept)."""
    data = report.to_dict()
    data["step"] = int(step)
    data["config"] = {**data.get("config", {}), "run_id": run_id}
    return ClusterabilityReport.from_dict(data)


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a parameter value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old or the new file, never half."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
