"""Log clusterability to MLflow: ``from cluster_tracking.integrations.mlflow import MlflowSink``.

>>> import mlflow
>>> from cluster_tracking import ClusterabilityTracker
>>> from cluster_tracking.integrations.mlflow import MlflowSink
>>> with mlflow.start_run():
...     tracker = ClusterabilityTracker(sinks=[MlflowSink()], every_n_steps=200)
...     for step, batch in enumerate(loader):
...         ...
...         tracker.step(model, step)
...     tracker.close()

What lands in the run:

* params ``clusterability.k``, ``clusterability.shuffles``, ``clusterability.method``,
  ``clusterability.seed``, ``clusterability.version``, ... once;
* at every measured step, the metrics of :data:`~cluster_tracking.report.METRIC_KEYS`
  (``clusterability/ncut``, ``clusterability/z_score``, ...) at that step, in one ``log_batch``;
* artifacts ``clusterability/step-<step>/report.json``, ``adjacency.png``, ``composition.png``;
* at the end ``clusterability/summary.json``, ``trajectory.png`` and ``report.html``.

Delivery is exactly once and survives a tracking server that goes away: every item is first written
to a local spool (a :class:`~cluster_tracking.sinks.LocalDirectorySink`), then sent with a few
quick retries (0.5 s, 1 s); when the server still does not answer the item stays spooled, and every
later call (and ``close()``) sends what is spooled, in order. ``delivered.json`` in the spool
records what the server acknowledged, so nothing is sent twice; after a failure whose outcome is
unknown, the run's metric history is checked before metrics are sent again. (A request already
under way when the server goes down is retried by MLflow's own client first, for minutes by
default: lower ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` to fall back to the spool sooner.)

MLflow is imported when the sink is created, so ``cluster_tracking`` itself works without it.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from cluster_tracking.outbox import DEFAULT_SPOOL_ROOT, Item, Outbox
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.sinks import (
    ARTIFACT_ROOT,
    LocalDirectorySink,
    SinkError,
    logged_metrics,
    step_artifact_dir,
)
from cluster_tracking.tracker import ClusterTrackingWarning

__all__ = ["INSTALL_HINT", "MlflowSink"]

#: How to install what this module needs.
INSTALL_HINT = "pip install 'cluster-tracking[mlflow]'"

# MLflow error codes that retrying cannot fix: the item is set aside (kept in the spool).
_PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "BAD_REQUEST",
    }
)

_log = logging.getLogger(__name__)


def _import_mlflow() -> ModuleType:
    try:
        import mlflow
    except ImportError as error:
        raise SinkError(
            f"MlflowSink needs the mlflow package, which is not installed: {INSTALL_HINT}"
        ) from error
    return mlflow


class _Unreachable(Exception):
    """The tracking server did not answer its health check."""


class MlflowSink:
    """A :class:`~cluster_tracking.sinks.Sink` that logs clusterability to an MLflow run.

    Everything goes through :class:`mlflow.MlflowClient` with an explicit run id, so it is safe
    from the tracker's background thread (the fluent ``mlflow.log_*`` API and its active-run stack
    are not used there).

    Args:
        run_id: the run to log to. ``None``: the active run (``mlflow.start_run()``); without one,
            a new run is created in ``experiment_name`` (or ``MLFLOW_EXPERIMENT_NAME`` /
            ``MLFLOW_EXPERIMENT_ID``, else the default experiment), and finished by ``close()``.
        tracking_uri: the tracking server or store; ``None``: MLflow's current one
            (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``).
        experiment_name: experiment of the run this sink creates (when there is no run).
        run_name: name of the run this sink creates.
        spool_dir: where items wait when the server is down; the spool of run ``R`` is
            ``spool_dir/R``. ``None``: a folder under the system's temp dir, removed by ``close()``
            once everything is delivered. A sink created later with the same ``run_id`` and
            ``spool_dir`` delivers what an earlier process left there.
        retries: tries per item before it stays spooled until the next call (at least 1).
        backoff: seconds before the 2nd try; doubled for each further try.
        probe_timeout: seconds the server's ``/health`` check may take (HTTP tracking URIs).
            The probe lets a down server fail in milliseconds instead of in MLflow's own
            retries, which take minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``).

    Raises:
        SinkError: mlflow is not installed, or there is no run and none can be created.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        probe_timeout: float = 2.0,
    ) -> None:
        mlflow = _import_mlflow()
        from mlflow.tracking import MlflowClient

        if retries < 1:
            raise SinkError(f"retries must be at least 1, got {retries}.")
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.probe_timeout = float(probe_timeout)
        self.tracking_uri: str = tracking_uri or mlflow.get_tracking_uri()
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._sync = "synchronous" in inspect.signature(self._client.log_batch).parameters
        self._lock = threading.RLock()
        self._owns_run = False
        self._closed = False
        self._offline_error: BaseException | None = None
        self.inert = not _is_rank_zero()
        self.run_id: str = run_id or ""
        if self.inert:  # other ranks of a distributed run: no run, no spool, no calls
            return

        if run_id is None:
            active = mlflow.active_run()
            if active is not None and (tracking_uri is None or tracking_uri == _fluent_uri()):
                run_id = active.info.run_id
        if run_id is None:
            run_id = self._create_run(experiment_name, run_name)
            self._owns_run = True
        self.run_id = run_id

        self._temporary_spool = spool_dir is None
        root = DEFAULT_SPOOL_ROOT if spool_dir is None else Path(spool_dir)
        self.spool_path = root / run_id
        self._spool: LocalDirectorySink | None = None  # created with the first item
        self._outbox = Outbox(
            self.spool_path,
            parts=_parts,
            identity={"run_id": self.run_id, "tracking_uri": self.tracking_uri},
        )

    # ------------------------------------------------------------------------------ Sink API

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Spool the tracker's settings and send them as run params."""
        if self.inert:
            return
        with self._lock:
            self.spool.log_params(params)
            self._append({"kind": "params", "params": {k: str(v) for k, v in params.items()}})
            self._drain()

    def log_report(
        self, report: ClusterabilityReport, step: int, artifacts: Mapping[str, Path]
    ) -> None:
        """Spool one report and send its metrics (at ``step``) and artifacts."""
        if self.inert:
            return
        with self._lock:
            self.spool.log_report(report, step, artifacts)
            self._append(
                {
                    "kind": "report",
                    "step": int(step),
                    "timestamp_ms": int(time.time() * 1000),
                    "metrics": logged_metrics(report),
                    "folder": step_artifact_dir(step),
                    "files": sorted(Path(name).name for name in artifacts),
                }
            )
            self._drain()

    def log_summary(
        self, reports: Sequence[ClusterabilityReport], artifacts: Mapping[str, Path]
    ) -> None:
        """Spool and send the summary artifacts (``clusterability/summary.json``...)."""
        if self.inert:
            return
        with self._lock:
            self.spool.log_summary(reports, artifacts)
            self._append(
                {
                    "kind": "summary",
                    "folder": ARTIFACT_ROOT,
                    "files": sorted(Path(name).name for name in artifacts),
                }
            )
            self._drain()

    def close(self) -> None:
        """Deliver what is spooled; finish the run if this sink created it. Idempotent.

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
                _warn(
                    f"{left} clusterability item(s) could not be delivered to MLflow at "
                    f"{self.tracking_uri} ({_describe(self._offline_error)}); they are kept in "
                    f"{self.spool_path}. Deliver them later with MlflowSink(run_id="
                    f"{self.run_id!r}, tracking_uri={self.tracking_uri!r}, spool_dir="
                    f"{str(self.spool_path.parent)!r}).close()."
                )
                return
            if self._owns_run:
                try:
                    self._client.set_terminated(self.run_id, "FINISHED")
                except Exception as error:
                    _warn(f"could not finish the MLflow run {self.run_id}: {_describe(error)}.")
            if self._temporary_spool:
                shutil.rmtree(self.spool_path, ignore_errors=True)

    # ---------------------------------------------------------------------------- delivery

    @property
    def spool(self) -> LocalDirectorySink:
        """The local copy of everything this sink was given (created on first use)."""
        if self._spool is None:
            self._spool = LocalDirectorySink(self.spool_path)
        return self._spool

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
        """Send every undelivered part, in order; stop at the first one the server refuses."""
        if not self._outbox.drain(self._deliver):
            return False
        if self._offline_error is not None:
            _log.info("MLflow at %s answers again; spooled items delivered.", self.tracking_uri)
            self._offline_error = None
        return True

    def _deliver(self, entry: dict[str, Any], key: str) -> bool:
        """One part of one item, with retries; False when the server stayed unreachable."""
        error: BaseException | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                self._probe()
                if key in self._outbox.attempted and self._already_landed(entry, key):
                    self._outbox.mark(done=key)
                    return True
                self._outbox.mark(attempted=key)
                self._send(entry, key.split(":", 1)[1])
                self._outbox.mark(done=key)
                return True
            except Exception as failure:
                if _is_permanent(failure):
                    self._outbox.mark(dropped=key)
                    _warn(
                        f"MLflow refused clusterability item {key} ({entry['kind']}"
                        f"{', step ' + str(entry['step']) if 'step' in entry else ''}): "
                        f"{_describe(failure)}. It is kept in {self.spool_path}."
                    )
                    return True
                error = failure
        if self._offline_error is None:
            _warn(
                f"MLflow at {self.tracking_uri} is unreachable or failing ({_describe(error)}); "
                f"clusterability reports are spooled to {self.spool_path} and will be delivered "
                "when it answers again. Training goes on."
            )
        self._offline_error = error
        return False

    def _send(self, entry: dict[str, Any], part: str) -> None:
        from mlflow.entities import Metric, Param

        # Synchronous on purpose: a delivery is recorded only once the server acknowledged it.
        sync: dict[str, Any] = {"synchronous": True} if self._sync else {}
        if part == "params":
            params = [Param(key, value) for key, value in sorted(entry["params"].items())]
            for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
                self._client.log_batch(self.run_id, params=params[start : start + 100], **sync)
        elif part == "metrics":
            metrics = [
                Metric(key, float(value), entry["timestamp_ms"], entry["step"])
                for key, value in entry["metrics"].items()
            ]
            self._client.log_batch(self.run_id, metrics=metrics, **sync)
        else:  # artifacts of a step or of the summary
            folder = self.spool_path / entry["folder"]
            for name in entry["files"]:
                self._client.log_artifact(self.run_id, str(folder / name), entry["folder"])

    def _already_landed(self, entry: dict[str, Any], key: str) -> bool:
        """After a failure of unknown outcome: did this entry's metrics reach the run?"""
        if not key.endswith(":metrics") or not entry["metrics"]:
            return False  # params and artifacts are idempotent: sending again is harmless
        probe_key = next(iter(entry["metrics"]))
        history = self._client.get_metric_history(self.run_id, probe_key)
        return any(
            m.step == entry["step"] and m.timestamp == entry["timestamp_ms"] for m in history
        )

    def _probe(self) -> None:
        """Fail fast when an HTTP tracking server is down (MLflow itself retries for minutes)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        url = self.tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=self.probe_timeout):
                return
        except urllib.error.HTTPError as error:
            if error.code >= 500:
                raise _Unreachable(f"{url} answered HTTP {error.code}") from error
        except (OSError, ValueError) as error:
            raise _Unreachable(f"no answer from {url}: {error}") from error

    def _create_run(self, experiment_name: str | None, run_name: str | None) -> str:
        try:
            experiment_id = self._experiment_id(experiment_name)
            run = self._client.create_run(experiment_id, run_name=run_name)
        except Exception as error:
            raise SinkError(
                f"no active MLflow run and none could be created at {self.tracking_uri} "
                f"({_describe(error)}). Start the tracking server, call mlflow.start_run() "
                "first, or pass run_id=..."
            ) from error
        return str(run.info.run_id)

    def _experiment_id(self, name: str | None) -> str:
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name is None:
            return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        return str(self._client.create_experiment(name))

    def __repr__(self) -> str:
        return f"MlflowSink(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"


def _fluent_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def _is_permanent(error: BaseException) -> bool:
    code = getattr(error, "error_code", None)
    return isinstance(code, str) and code in _PERMANENT_ERRORS


def _parts(entry: Item) -> tuple[str, ...]:
    """The parts of a spooled item, delivered (and recorded) one by one, in this order."""
    return ("metrics", "artifacts") if entry["kind"] == "report" else (entry["kind"],)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no error recorded"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _warn(message: str) -> None:
    warnings.warn(message, ClusterTrackingWarning, stacklevel=3)
