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

Delivery is exactly once, never waits in the training process's way, and survives a tracking
server that is slow or goes away: every item is first written to a local spool (a folder with
``outbox.jsonl`` and ``delivered.json``), and the sink's own sender thread delivers it, a backlog
in bulk (:mod:`cluster_tracking.tracking.sender`). A slow server is not a dead one: requests
carry MLflow's own timeout (``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s by default), and the server's
``/health`` is probed (``probe_timeout``) only after a request failed, until it answers again;
before that, a TCP connect (no request) tells a server that is not there from a slow one in
milliseconds. ``delivered.json`` records what the server acknowledged, so nothing is sent twice;
after a failure whose outcome is unknown, the run's metric history is checked before metrics
are sent again. (A request already under way when the server goes down is retried by MLflow's
own client first, for minutes by default: lower ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` to fall back
to the spool sooner.)

Bounded: a delivered item leaves the spool at once; while the server is slow or down, the
plots and ``report.json`` of all but the newest ``max_backlog`` waiting steps are thinned (every
step's metrics are kept), with one warning. MLflow is imported when the sink is created, so
``cluster_tracking`` itself works without it.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster_tracking.errors import SinkError, describe, warn
from cluster_tracking.integrations.tracking_uri import check_connectable, probe_health
from cluster_tracking.report import PROCEDURE_PARAM, ClusterabilityReport
from cluster_tracking.tracking.delivery import require_package
from cluster_tracking.tracking.sender import BackgroundSender
from cluster_tracking.tracking.spool import DEFAULT_SPOOL_ROOT, Item

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "INSTALL_HINT", "MlflowSink"]

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

#: Seconds :meth:`MlflowSink.close` spends delivering by default before it leaves the rest in
#: the spool.
DEFAULT_CLOSE_TIMEOUT = 10.0


class MlflowSink(BackgroundSender):
    """A :class:`~cluster_tracking.tracking.sinks.Sink` that logs clusterability to an MLflow run.

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
        probe_timeout: seconds the server's ``/health`` check may take (HTTP tracking URIs). It
            is probed only after a request failed, so that a down server fails fast instead of
            in MLflow's own retries, which take minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``);
            a server slower than this counts as down until it answers in time.
        max_backlog: waiting steps whose plots and ``report.json`` are kept while the server is
            slow or down; older waiting steps keep their metrics only (at least 1).
        upload_threads: artifact uploads under way at once when a backlog drains.
        retry_interval: seconds between delivery attempts while the server is unreachable.
        close_timeout: the most seconds :meth:`close` waits for the server's next answer while
            it delivers (default 10; ``None``: as long as it takes): a slow server that keeps
            answering gets everything, a hung one holds ``close()`` this long. What is not
            delivered by then stays in the spool, named in one warning with the code that
            delivers it later; a request still under way is left to finish in the background,
            and nothing more is sent by this sink. ``close(timeout=...)`` bounds the whole.

    Raises:
        SinkError: mlflow is not installed, or there is no run and none can be created.
    """

    platform = "MLflow"

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
        probe_timeout: float = 10.0,
        max_backlog: int = 8,
        upload_threads: int = 8,
        retry_interval: float = 5.0,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        mlflow = require_package("mlflow", "MlflowSink", INSTALL_HINT)
        from mlflow.tracking import MlflowClient

        if retries < 1:
            raise SinkError(f"retries must be at least 1, got {retries}.")
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.probe_timeout = float(probe_timeout)
        if max_backlog < 1 or upload_threads < 1:
            raise SinkError(
                f"max_backlog and upload_threads must be at least 1, got {max_backlog} and "
                f"{upload_threads}."
            )
        self.max_backlog = int(max_backlog)
        self.upload_threads = int(upload_threads)
        self.retry_interval = float(retry_interval)
        if close_timeout is not None and not close_timeout >= 0:
            raise SinkError(f"close_timeout must be >= 0 seconds or None, got {close_timeout}.")
        self.close_timeout = None if close_timeout is None else float(close_timeout)
        self.tracking_uri: str = tracking_uri or mlflow.get_tracking_uri()
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._sync_supported = "synchronous" in inspect.signature(self._client.log_batch).parameters
        self._init_delivery()
        self._init_sender()
        self._owns_run = False
        self.run_id: str = run_id or ""
        if self.inert:  # other ranks of a distributed run: no run, no spool, no calls
            return

        if run_id is None:
            active = mlflow.active_run()
            if active is not None and (
                tracking_uri is None or tracking_uri == str(mlflow.get_tracking_uri())
            ):
                run_id = active.info.run_id
        if run_id is None:
            run_id = self._create_run(experiment_name, run_name)
            self._owns_run = True
        self.run_id = run_id

        root = DEFAULT_SPOOL_ROOT if spool_dir is None else Path(spool_dir)
        self._open_spool(
            root / run_id,
            temporary=spool_dir is None,
            parts=_parts,
            identity={"run_id": self.run_id, "tracking_uri": self.tracking_uri},
        )

    # ------------------------------------------------------------------------------ Sink API

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Spool the tracker's settings and send them as run params."""
        if self.inert:
            return
        params = self._params_the_run_takes(params)
        with self._lock:
            self.spool.log_params(params)
            self._append({"kind": "params", "params": {k: str(v) for k, v in params.items()}})
        self._kick()

    def _params_the_run_takes(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """``params`` less those that a resumed run already holds with another value (MLflow
        refuses to change a param, and would refuse the whole batch), with one warning; the
        warning says when the run was measured under another clustering procedure, whose
        z-scores are not comparable with this tracker's. A run this sink created holds none;
        a server that does not answer now is left to the delivery's retries."""
        if self._owns_run:
            return params
        held = self._held_params()
        if held is None:
            return params
        changed = sorted(k for k, v in params.items() if k in held and held[k] != str(v))
        if not changed:
            return params
        kept = ", ".join(f"{key}={held[key]!r}" for key in changed[:8])
        old, new = held.get(PROCEDURE_PARAM), params.get(PROCEDURE_PARAM)
        if old is not None and new is not None and old != str(new):
            warn(
                f"MLflow run {self.run_id} was already measured under clustering procedure "
                f"{old!r}; this tracker measures under {str(new)!r}: the run's n-cuts and "
                "z-scores of the two are not comparable (log them to separate runs). MLflow "
                f"cannot change a param, so the run keeps {kept}."
            )
        else:
            warn(
                f"MLflow run {self.run_id} already holds other clusterability settings; MLflow "
                f"cannot change a param, so the run keeps {kept}."
            )
        return {key: value for key, value in params.items() if key not in changed}

    def _held_params(self) -> dict[str, str] | None:
        """The params the run holds, or ``None`` when the server does not tell within
        ``probe_timeout`` seconds (no ``/health`` probe: a slow server is given its time, and the
        read runs in a thread of its own so that a hung one costs that timeout once)."""
        answer: list[dict[str, str]] = []

        def read() -> None:
            try:
                check_connectable(self.tracking_uri, self.probe_timeout)
                answer.append(dict(self._client.get_run(self.run_id).data.params))
            except Exception:
                pass

        reader = threading.Thread(target=read, name="cluster-tracking-mlflow-params", daemon=True)
        reader.start()
        reader.join(self.probe_timeout)
        return answer[0] if answer else None

    def log_report(
        self, report: ClusterabilityReport, step: int, artifacts: Mapping[str, Path]
    ) -> None:
        """Spool one report and send its metrics (at ``step``) and artifacts."""
        if self.inert:
            return
        with self._lock:
            self._spool_report(report, step, artifacts, timestamp_ms=int(time.time() * 1000))
            self._thin()
        self._kick()

    def log_summary(
        self, reports: Sequence[ClusterabilityReport], artifacts: Mapping[str, Path]
    ) -> None:
        """Spool and send the summary artifacts (``clusterability/summary.json``...)."""
        if self.inert:
            return
        with self._lock:
            self._spool_summary(reports, artifacts)
        self._kick()

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is spooled; finish the run if this sink created it. Idempotent.

        Args:
            timeout: seconds to spend delivering in all (``None``: no bound); it also stops
                once the server has answered nothing for ``close_timeout`` seconds. Whatever
                is not delivered by then stays in :attr:`spool`, and one warning says where and
                how to deliver it.
        """
        if self.inert or not self._finish_delivery(timeout, self.close_timeout):
            return
        if self._owns_run:
            try:
                self._client.set_terminated(self.run_id, "FINISHED")
            except Exception as error:
                warn(f"could not finish the MLflow run {self.run_id}: {describe(error)}.")
        self._remove_temporary_spool()

    # ---------------------------------------------------------------------------- delivery

    def _send_params(self, entry: Item) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in sorted(entry["params"].items())]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self._client.log_batch(self.run_id, params=params[start : start + 100], **self._sync)

    def _send_metrics(self, keys: Mapping[str, Item]) -> None:
        """The metrics of every waiting report, in one ``log_batch`` (up to 1,000 metrics a
        request). A key sent before with an unknown outcome is checked against the run first."""
        from mlflow.entities import Metric

        with self._lock:
            unsure = [key for key in keys if key in self._outbox.attempted]
        landed = [key for key in unsure if self._already_landed(keys[key], key)]
        metrics = [
            Metric(name, float(value), item["timestamp_ms"], item["step"])
            for key, item in keys.items()
            if key not in landed
            for name, value in item["metrics"].items()
        ]
        with self._lock:
            self._outbox.mark(attempted=[key for key in keys if key not in landed])
        for start in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + 1000], **self._sync)

    def _send_file(self, entry: Item, name: str) -> None:
        folder = self.spool_path / entry["folder"]
        self._client.log_artifact(self.run_id, str(folder / name), entry["folder"])

    @property
    def _sync(self) -> dict[str, Any]:
        # Synchronous on purpose: a delivery is recorded only once the server acknowledged it.
        return {"synchronous": True} if self._sync_supported else {}

    def _already_landed(self, entry: dict[str, Any], key: str) -> bool:
        """After a failure of unknown outcome: did this entry's metrics reach the run?"""
        if not key.endswith(":metrics") or not entry["metrics"]:
            return False  # params and artifacts are idempotent: sending again is harmless
        probe_key = next(iter(entry["metrics"]))
        history = self._client.get_metric_history(self.run_id, probe_key)
        return any(
            m.step == entry["step"] and m.timestamp == entry["timestamp_ms"] for m in history
        )

    def _check(self, suspect: bool) -> None:
        """Before a request: after a failure (``suspect``), the server's ``/health``, until it
        answers again; else only a TCP connect (no request, so a slow server is fine)."""
        if suspect:
            probe_health(self.tracking_uri, self.probe_timeout)
        else:
            check_connectable(self.tracking_uri, self.probe_timeout)

    def _refused(self, error: BaseException) -> bool:
        """MLflow error codes that retrying cannot fix: the item is set aside (kept in the
        spool)."""
        code = getattr(error, "error_code", None)
        return isinstance(code, str) and code in _PERMANENT_ERRORS

    def _warn_refused(self, keys: list[str], error: BaseException) -> None:
        warn(
            f"MLflow refused clusterability item(s) {', '.join(keys)}: "
            f"{describe(error)}. They are kept in {self.spool_path}."
        )

    def _offline_message(self, error: BaseException | None) -> str:
        return (
            f"MLflow at {self.tracking_uri} is unreachable or failing ({describe(error)}); "
            f"clusterability reports are spooled to {self.spool_path} and will be delivered "
            "when it answers again. Training goes on."
        )

    def _thinning_message(self, first_step: int) -> str:
        return (
            f"MLflow at {self.tracking_uri} is slower than the measurements: to keep the "
            f"spool bounded, the plots and report.json of steps waiting beyond the newest "
            f"{self.max_backlog} are dropped (first: step {first_step}); every step's "
            "metrics are kept and delivered. Raise max_backlog= to keep more."
        )

    def _destination(self) -> str:
        return f"MLflow at {self.tracking_uri}"

    def _later(self) -> str:
        return (
            f"later with MlflowSink(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r}, "
            f"spool_dir={str(self.spool_path.parent)!r}).close()"
        )

    def _create_run(self, experiment_name: str | None, run_name: str | None) -> str:
        try:
            experiment_id = self._experiment_id(experiment_name)
            run = self._client.create_run(experiment_id, run_name=run_name)
        except Exception as error:
            raise SinkError(
                f"no active MLflow run and none could be created at {self.tracking_uri} "
                f"({describe(error)}). Start the tracking server, call mlflow.start_run() "
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


def _parts(entry: Item) -> tuple[str, ...]:
    """The parts of a spooled item, delivered (and recorded) one by one, in this order."""
    return ("metrics", "artifacts") if entry["kind"] == "report" else (entry["kind"],)
