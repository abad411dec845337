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
``outbox.jsonl`` and ``delivered.json``), and the sink's own sender thread delivers what is spooled
in the background. A backlog goes out in bulk, not item by item: the metrics of every waiting
measurement in one ``log_batch`` request, their artifacts uploaded ``upload_threads`` at a time.
A slow server is not a dead one: requests carry MLflow's own timeout
(``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s by default), and the server's ``/health`` is probed
(``probe_timeout``) only after a request failed, until it answers again; before that, a TCP
connect (no request) tells a server that is not there from a slow one in milliseconds. When the
server does not answer after a few quick retries (0.5 s, 1 s), items stay spooled and are sent
when it answers (tried again every ``retry_interval`` seconds and at every new item).
``delivered.json`` records what the server acknowledged, so nothing is sent twice; after a
failure whose outcome is unknown, the run's metric history is checked before metrics are sent
again. (A request already under way when the server goes down is
retried by MLflow's own client first, for minutes by default: lower
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` to fall back to the spool sooner.)

Bounded: a delivered item leaves the spool at once (its files and its outbox line), so with a
reachable server the spool holds only what is in flight. While the server is slow or down, the
metrics of every step are kept; the plots and ``report.json`` of all but the newest
``max_backlog`` waiting steps are thinned (deleted, and recorded as ``thinned`` in
``delivered.json``), with one warning.

MLflow is imported when the sink is created, so ``cluster_tracking`` itself works without it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from cluster_tracking.errors import describe, warn
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.tracking.sinks import (
    ARTIFACT_ROOT,
    LocalDirectorySink,
    SinkError,
    logged_metrics,
    step_artifact_dir,
)
from cluster_tracking.tracking.spool import DEFAULT_SPOOL_ROOT, Item, Outbox

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "INSTALL_HINT", "MlflowSink"]

#: How to install what this module needs.
INSTALL_HINT = "pip install 'cluster-tracking[mlflow]'"

#: The run param (W&B: config key) naming the procedure of the logged numbers.
PROCEDURE_PARAM = "clusterability.procedure"

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

#: Seconds :meth:`MlflowSink.close` spends delivering by default before it leaves the rest in
#: the spool.
DEFAULT_CLOSE_TIMEOUT = 10.0


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
        close_timeout: the most seconds :meth:`close` spends delivering (default 10; ``None``:
            as long as it takes). What is not delivered by then stays in the spool, named in one
            warning with the code that delivers it later; a request still under way is left to
            finish in the background, and nothing more is sent by this sink.

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
        probe_timeout: float = 10.0,
        max_backlog: int = 8,
        upload_threads: int = 8,
        retry_interval: float = 5.0,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        mlflow = _import_mlflow()
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
        self._abandoned = False  # close() gave up: send nothing more
        self.tracking_uri: str = tracking_uri or mlflow.get_tracking_uri()
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._sync_supported = "synchronous" in inspect.signature(self._client.log_batch).parameters
        self._lock = threading.RLock()  # the outbox and the spool's files
        self._send_lock = threading.Lock()  # one delivery pass at a time
        self._wake = threading.Event()
        self._sender: threading.Thread | None = None
        self._stopping = False
        self._in_flight: set[int] = set()  # seqs whose files are being uploaded
        self._suspect = False  # a request failed: probe /health before the next one
        self._warned_thinning = False
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
                self._connectable()
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
            self.spool.copy_artifacts(artifacts, self.spool_path / step_artifact_dir(step))
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
            self._thin()
        self._kick()

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
        self._kick()

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is spooled; finish the run if this sink created it. Idempotent.

        Args:
            timeout: seconds to spend delivering; at most ``close_timeout`` either way
                (``None``: ``close_timeout``). Whatever is not delivered by then stays in
                :attr:`spool`, and one warning says where and how to deliver it.
        """
        if self.inert:
            return
        bounds = [bound for bound in (timeout, self.close_timeout) if bound is not None]
        timeout = min(bounds) if bounds else None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopping = True
        self._wake.set()
        if self._sender is not None:
            self._sender.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        delivered = not self._sender_alive() and self._drain_within(deadline)
        if not delivered:
            self._abandoned = True  # a request under way may finish; nothing more is sent
        left = self.pending
        if not delivered or left:
            reason = (
                describe(self._offline_error)
                if self._offline_error is not None
                else f"close() ran out of its {timeout} s"
            )
            warn(
                f"{left} clusterability item(s) could not be delivered to MLflow at "
                f"{self.tracking_uri} ({reason}); they are kept in "
                f"{self.spool_path}. Deliver them later with MlflowSink(run_id="
                f"{self.run_id!r}, tracking_uri={self.tracking_uri!r}, spool_dir="
                f"{str(self.spool_path.parent)!r}).close()."
            )
            return
        if self._owns_run:
            try:
                self._client.set_terminated(self.run_id, "FINISHED")
            except Exception as error:
                warn(f"could not finish the MLflow run {self.run_id}: {describe(error)}.")
        if self._temporary_spool:
            shutil.rmtree(self.spool_path, ignore_errors=True)

    # ---------------------------------------------------------------------------- delivery

    @property
    def spool(self) -> LocalDirectorySink:
        """The local folder of what waits for the server (created on first use)."""
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

    def flush(self, timeout: float | None = None) -> bool:
        """Try to deliver everything spooled now, in this thread; True when nothing is left."""
        if self.inert:
            return True
        return self._drain(None if timeout is None else time.monotonic() + timeout)

    def _append(self, entry: Item) -> None:
        self._outbox.append(entry)

    def _kick(self) -> None:
        """Wake the sender thread (started with the first item)."""
        if self._closed:
            return
        if self._sender is None:
            self._sender = threading.Thread(
                target=self._send_loop, name="cluster-tracking-mlflow", daemon=True
            )
            self._sender.start()
        self._wake.set()

    def _sender_alive(self) -> bool:
        return self._sender is not None and self._sender.is_alive()

    def _send_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(self.retry_interval if self._offline_error is not None else None)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._drain()
            except Exception as error:  # never let the sender die silently
                warn(f"the MLflow sender failed: {describe(error)}; items stay spooled.")

    def _thin(self) -> None:
        """Keep the spool bounded while the server is slow or down (with ``_lock`` held): the
        files of all but the newest ``max_backlog`` waiting reports go; their metrics stay."""
        waiting = [
            item
            for item in self._outbox.items
            if item["kind"] == "report"
            and f"{item['seq']}:artifacts" in self._outbox.undelivered(item)
            and item["seq"] not in self._in_flight
        ]
        excess = waiting[: max(0, len(waiting) - self.max_backlog)]
        for item in excess:
            self._outbox.mark(thinned=f"{item['seq']}:artifacts")
            shutil.rmtree(self.spool_path / item["folder"], ignore_errors=True)
        if excess and not self._warned_thinning:
            self._warned_thinning = True
            warn(
                f"MLflow at {self.tracking_uri} is slower than the measurements: to keep the "
                f"spool bounded, the plots and report.json of steps waiting beyond the newest "
                f"{self.max_backlog} are dropped (first: step {excess[0]['step']}); every step's "
                "metrics are kept and delivered. Raise max_backlog= to keep more."
            )

    def _drain_within(self, deadline: float | None) -> bool:
        """:meth:`_drain` in a thread of its own, waited for until ``deadline`` at most: a
        request to a hung server blocks for MLflow's request timeout, which the deadline
        checks between requests cannot cut short. False when it ran out."""
        result: list[bool] = []
        drainer = threading.Thread(
            target=lambda: result.append(self._drain(deadline)),
            name="cluster-tracking-mlflow-close",
            daemon=True,
        )
        drainer.start()
        drainer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return bool(result and result[0])

    def _drain(self, deadline: float | None = None) -> bool:
        """Deliver everything spooled: params, then the metrics of every waiting report in one
        request, their artifacts a few at a time, then the summary. False when something is
        left (the server failed, or ``deadline`` passed)."""
        with self._send_lock:
            ok = self._deliver_all(deadline)
            with self._lock:
                for item in self._outbox.prune():  # delivered: its files leave the spool
                    if item["kind"] == "report":
                        shutil.rmtree(self.spool_path / item["folder"], ignore_errors=True)
                    elif item["kind"] == "summary":
                        for name in item["files"]:
                            (self.spool_path / item["folder"] / name).unlink(missing_ok=True)
                left = self._outbox.pending
        if ok and not left and self._offline_error is not None:
            _log.info("MLflow at %s answers again; spooled items delivered.", self.tracking_uri)
            self._offline_error = None
        return ok and not left

    def _deliver_all(self, deadline: float | None) -> bool:
        def late() -> bool:
            return deadline is not None and time.monotonic() > deadline

        with self._lock:
            waiting = [(item, self._outbox.undelivered(item)) for item in self._outbox.items]
        waiting = [(item, keys) for item, keys in waiting if keys]
        for item, keys in waiting:  # params first, in order
            if item["kind"] == "params":
                if late() or not self._attempt(keys, lambda i=item: self._send_params(i)):
                    return False
        reports = [(item, keys) for item, keys in waiting if item["kind"] == "report"]
        metric_keys = {key: item for item, keys in reports for key in keys if "metrics" in key}
        # every file of every waiting report, and of the summary, a few at a time, while the
        # metrics of every waiting report go in one request
        files = {key: item for item, keys in reports for key in keys if "artifacts" in key}
        files.update(
            {key: item for item, keys in waiting if item["kind"] == "summary" for key in keys}
        )
        if late() or not (metric_keys or files):
            return not late()
        return self._upload(files, metric_keys)

    def _attempt(self, keys: list[str], send: Any) -> bool:
        """Run ``send()`` for ``keys`` with retries; record them done. False when the server
        stayed unreachable (the keys stay undelivered)."""
        error: BaseException | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            if self._abandoned:
                return False
            try:
                if self._suspect:
                    self._probe()  # HTTP /health, only after a failure
                else:
                    self._connectable()  # a TCP handshake: no request, so a slow server is fine
                send()
            except Exception as failure:
                if _is_permanent(failure):
                    with self._lock:
                        for key in keys:
                            self._outbox.mark(dropped=key)
                    warn(
                        f"MLflow refused clusterability item(s) {', '.join(keys)}: "
                        f"{describe(failure)}. They are kept in {self.spool_path}."
                    )
                    return True
                self._suspect = True
                error = failure
                continue
            self._suspect = False
            with self._lock:
                self._outbox.mark(done=keys)
            return True
        if self._offline_error is None:
            warn(
                f"MLflow at {self.tracking_uri} is unreachable or failing ({describe(error)}); "
                f"clusterability reports are spooled to {self.spool_path} and will be delivered "
                "when it answers again. Training goes on."
            )
        self._offline_error = error
        return False

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

    def _upload(self, keys: Mapping[str, Item], metric_keys: Mapping[str, Item]) -> bool:
        """Send the metrics of ``metric_keys`` in one request and upload the files of ``keys``
        (artifact parts), ``upload_threads`` requests at a time; a part is done when all its
        files are. False when something stayed undelivered."""
        with self._lock:  # from here on, _thin() leaves these alone
            keys = {key: item for key, item in keys.items() if key not in self._outbox.thinned}
            self._in_flight = {item["seq"] for item in keys.values()}
        tasks = [(key, entry, name) for key, entry in keys.items() for name in entry["files"]]
        jobs: list[Callable[[], bool]] = [
            functools.partial(self._attempt, [], functools.partial(self._send_file, *task[1:]))
            for task in tasks
        ]
        if metric_keys:
            jobs.append(
                lambda: self._attempt(list(metric_keys), lambda: self._send_metrics(metric_keys))
            )
        try:
            outcomes = _in_daemon_threads(jobs, self.upload_threads)
            results = outcomes[: len(tasks)]
            metrics_ok = all(outcomes[len(tasks) :])
        finally:
            with self._lock:
                self._in_flight = set()
        failed = {key for (key, _, _), ok in zip(tasks, results, strict=True) if not ok}
        with self._lock:
            self._outbox.mark(done=[key for key in keys if key not in failed])
        return metrics_ok and not failed

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

    def _connectable(self) -> None:
        """Fail fast when nothing listens at an HTTP tracking URI (MLflow's own client would
        retry a refused connection for minutes); a server that accepts is given its time."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        parsed = urllib.parse.urlsplit(self.tracking_uri)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection(
                (parsed.hostname or "localhost", port), self.probe_timeout
            ).close()
        except OSError as error:
            raise _Unreachable(f"cannot connect to {parsed.netloc}: {error}") from error

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


def _in_daemon_threads(jobs: Sequence[Callable[[], bool]], threads: int) -> list[bool]:
    """Run ``jobs`` ``threads`` at a time; their results in order. Daemon threads, not a
    ``ThreadPoolExecutor``, whose threads the interpreter joins at exit: a request stuck on a
    dead server (MLflow retries for minutes) held a training script's exit for minutes after
    ``close()`` had returned."""
    results = [False] * len(jobs)
    order = iter(range(len(jobs)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                index = next(order, None)
            if index is None:
                return
            results[index] = jobs[index]()

    workers = [
        threading.Thread(target=work, name="cluster-tracking-mlflow-upload", daemon=True)
        for _ in range(max(1, min(threads, len(jobs))))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results
