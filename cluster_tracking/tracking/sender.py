"""A spooled sink whose own sender thread delivers in the background, a backlog in bulk.

:class:`BackgroundSender` never waits in the tracker's way: every call spools its item and wakes
the sender thread. A backlog goes out in bulk, not item by item: params first, in order; then
the metrics of every waiting report in one request while their files (and the summary's) are
uploaded ``upload_threads`` at a time. When the platform does not answer after a few quick
retries, items stay spooled and are sent when it answers (tried again every ``retry_interval``
seconds and at every new item). While it is slow or down, the spool stays bounded: the files of
all but the newest ``max_backlog`` waiting reports are thinned (their metrics are kept).

A subclass (the MLflow sink) says how one part is sent (:meth:`_send_params`,
:meth:`_send_metrics`, :meth:`_send_file`), what to check before a request (:meth:`_check`),
which errors are refusals for good (:meth:`_refused`), and how to warn (:meth:`_warn_refused`,
:meth:`_offline_message`, :meth:`_thinning_message`). Nothing here imports a platform.
"""

from __future__ import annotations

import abc
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cluster_tracking.errors import describe, warn
from cluster_tracking.tracking.delivery import Outcome, SpooledSink, send_with_retries
from cluster_tracking.tracking.spool import Item

_log = logging.getLogger(__name__)


class BackgroundSender(SpooledSink, abc.ABC):
    """The sender thread and the bulk delivery of a spooled sink (see the module docstring)."""

    retries: int
    backoff: float
    max_backlog: int
    upload_threads: int
    retry_interval: float

    def _init_sender(self) -> None:
        self._send_lock = threading.Lock()  # one delivery pass at a time
        self._wake = threading.Event()
        self._sender: threading.Thread | None = None
        #: CPU seconds of the sender thread so far (a tracker counts it in its budget)
        self.cpu_seconds = 0.0
        self._stopping = False
        self._abandoned = False  # close() gave up: send nothing more
        self._in_flight: set[int] = set()  # seqs whose files are being uploaded
        self._warned_thinning = False
        self._suspect = False  # a request failed: check harder before the next one
        self._answered = time.monotonic()  # when the platform last took a part

    # ------------------------------------------------------------------ the platform's part

    def _check(self, suspect: bool) -> None:
        """Before each request: fail fast when the platform is not there; ``suspect`` after a
        request failed, until one succeeds again."""

    def _refused(self, error: BaseException) -> bool:
        """Whether ``error`` refuses an item for good (retrying cannot fix it)."""
        return False

    @abc.abstractmethod
    def _send_params(self, entry: Item) -> None:
        """Send the params of a spooled ``params`` item."""

    @abc.abstractmethod
    def _send_metrics(self, keys: Mapping[str, Item]) -> None:
        """Send the metrics of every waiting report (``"<seq>:metrics"`` key -> item)."""

    @abc.abstractmethod
    def _send_file(self, entry: Item, name: str) -> None:
        """Upload one spooled file ``name`` of ``entry`` under its folder."""

    @abc.abstractmethod
    def _warn_refused(self, keys: list[str], error: BaseException) -> None:
        """Warn that the platform refused the parts ``keys`` for good (kept in the spool)."""

    @abc.abstractmethod
    def _offline_message(self, error: BaseException | None) -> str:
        """The warning when the platform stops answering: items stay spooled."""

    @abc.abstractmethod
    def _thinning_message(self, first_step: int) -> str:
        """The warning when the files of waiting reports are thinned, from ``first_step``."""

    @abc.abstractmethod
    def _later(self) -> str:
        """How to deliver what ``close()`` left in the spool: ``"later with <code>"``."""

    # ---------------------------------------------------------------------- the sender thread

    def _kick(self) -> None:
        """Wake the sender thread (started with the first item)."""
        if self._closed:
            return
        if self._sender is None:
            self._sender = threading.Thread(
                target=self._send_loop, name=f"cluster-tracking-{self._thread_name}", daemon=True
            )
            self._sender.start()
        self._wake.set()

    @property
    def _thread_name(self) -> str:
        return self.platform.lower().replace("&", "")

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
                warn(f"the {self.platform} sender failed: {describe(error)}; items stay spooled.")
            self.cpu_seconds = time.thread_time()

    def _stop_sender(self, deadline: float | None, idle: float | None) -> bool:
        """Stop the sender thread and deliver what is left in a thread of its own, until
        ``deadline`` at most, and while the platform takes a part at least every ``idle``
        seconds; False when something is left (then nothing more is sent)."""
        self._stopping = True
        self._wake.set()
        self._answered = time.monotonic()
        delivered = False
        if self._sender is None or self._wait_for(self._sender, deadline, idle):
            delivered = self._drain_within(deadline, idle)
        if not delivered:
            self._abandoned = True  # a request under way may finish; nothing more is sent
        return delivered

    def _wait_for(
        self, thread: threading.Thread, deadline: float | None, idle: float | None
    ) -> bool:
        """Join ``thread`` until ``deadline``, or until the platform took nothing for ``idle``
        seconds: a slow platform that keeps answering is waited for, a hung one is not. True
        when the thread ended."""
        while thread.is_alive():
            limits = [limit for limit in (deadline,) if limit is not None]
            if idle is not None:
                limits.append(self._answered + idle)
            now = time.monotonic()
            if limits and now >= min(limits):
                return False
            thread.join(min([*(limit - now for limit in limits), 0.25]))
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Try to deliver everything spooled now, in this thread; True when nothing is left."""
        if self.inert:
            return True
        return self._drain(None if timeout is None else time.monotonic() + timeout)

    def _finish_delivery(self, timeout: float | None, close_timeout: float | None) -> bool:
        """``close()``'s delivery, within ``timeout`` seconds (``None``: no bound) and while the
        platform takes a part at least every ``close_timeout`` seconds (``None``: no bound), so
        a slow platform that keeps answering gets everything and a hung one holds ``close()``
        for ``close_timeout`` seconds: True when everything was delivered; else what is left
        stays in the spool, named in one warning with the code that delivers it later
        (:meth:`_later`). False also when the sink was closed before."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        delivered = self._stop_sender(deadline, close_timeout)
        left = self.pending
        if delivered and not left:
            return True
        if self._offline_error is not None:
            reason = describe(self._offline_error)
        elif deadline is not None and time.monotonic() >= deadline:
            reason = f"close() ran out of its {timeout} s"
        else:
            reason = f"it took nothing for {close_timeout} s"
        self._warn_undelivered(left, reason, self._later())
        return False

    def _thin(self) -> None:
        """Keep the spool bounded while the platform is slow or down (with ``_lock`` held): the
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
            self._discard(item)
        if excess and not self._warned_thinning:
            self._warned_thinning = True
            warn(self._thinning_message(excess[0]["step"]), stacklevel=4)

    # ------------------------------------------------------------------------------ delivery

    def _drain_within(self, deadline: float | None, idle: float | None = None) -> bool:
        """:meth:`_drain` in a thread of its own, waited for until ``deadline`` at most, and
        while the platform takes a part at least every ``idle`` seconds (:meth:`_wait_for`): a
        request to a hung server blocks for the client's request timeout, which the deadline
        checks between requests cannot cut short. False when it ran out."""
        result: list[bool] = []
        drainer = threading.Thread(
            target=lambda: result.append(self._drain(deadline)),
            name=f"cluster-tracking-{self._thread_name}-close",
            daemon=True,
        )
        drainer.start()
        self._wait_for(drainer, deadline, idle)
        return bool(result and result[0])

    def _drain(self, deadline: float | None = None) -> bool:
        """Deliver everything spooled: params, then the metrics of every waiting report in one
        request, their artifacts a few at a time, then the summary. False when something is
        left (the platform failed, or ``deadline`` passed)."""
        with self._send_lock:
            ok = self._deliver_all(deadline)
            with self._lock:
                self._prune()  # delivered: its files leave the spool
                left = self._outbox.pending
        if ok and not left and self._offline_error is not None:
            _log.info("%s answers again; spooled items delivered.", self._destination())
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
                if late() or not self._attempt(keys, functools.partial(self._send_params, item)):
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

    def _attempt(self, keys: list[str], send: Callable[[], None]) -> bool:
        """Run ``send()`` for ``keys`` with retries; record them done. False when the platform
        stayed unreachable (the keys stay undelivered)."""

        def checked() -> None:
            try:
                self._check(self._suspect)
                send()
            except Exception as error:
                if not self._refused(error):
                    self._suspect = True
                raise
            self._suspect = False

        outcome, error = send_with_retries(
            checked,
            retries=self.retries,
            backoff=self.backoff,
            refused=self._refused,
            stop=lambda: self._abandoned,
        )
        if outcome is Outcome.STOPPED:
            return False
        if outcome is Outcome.REFUSED:
            assert error is not None
            with self._lock:
                for key in keys:
                    self._outbox.mark(dropped=key)
            self._warn_refused(keys, error)
            return True
        if outcome is Outcome.FAILED:
            self._went_offline(error, self._offline_message(error))
            return False
        self._answered = time.monotonic()  # progress: close() waits on while it comes
        with self._lock:
            self._outbox.mark(done=keys)
        return True

    def _upload(self, keys: Mapping[str, Item], metric_keys: Mapping[str, Item]) -> bool:
        """Send the metrics of ``metric_keys`` in one request and upload the files of ``keys``
        (artifact parts), ``upload_threads`` requests at a time; a part is done when all its
        files are. False when something stayed undelivered."""
        with self._lock:  # from here on, _thin() leaves these alone
            keys = {key: item for key, item in keys.items() if key not in self._outbox.thinned}
            self._in_flight = {item["seq"] for item in keys.values()}
        tasks = [(key, entry, name) for key, entry in keys.items() for name in entry["files"]]
        # the metrics first: on a slow server they must not wait behind every file
        jobs: list[Callable[[], bool]] = []
        if metric_keys:
            jobs.append(
                lambda: self._attempt(list(metric_keys), lambda: self._send_metrics(metric_keys))
            )
        jobs += [
            functools.partial(self._attempt, [], functools.partial(self._send_file, *task[1:]))
            for task in tasks
        ]
        try:
            outcomes = in_daemon_threads(jobs, self.upload_threads, f"{self._thread_name}-upload")
            metrics_ok = all(outcomes[: len(jobs) - len(tasks)])
            results = outcomes[len(jobs) - len(tasks) :]
        finally:
            with self._lock:
                self._in_flight = set()
        failed = {key for (key, _, _), ok in zip(tasks, results, strict=True) if not ok}
        with self._lock:
            self._outbox.mark(done=[key for key in keys if key not in failed])
        return metrics_ok and not failed


def in_daemon_threads(jobs: Sequence[Callable[[], Any]], threads: int, name: str) -> list[Any]:
    """Run ``jobs`` ``threads`` at a time; their results in order. Daemon threads (named
    ``cluster-tracking-<name>``), not a ``ThreadPoolExecutor``, whose threads the interpreter
    joins at exit: a request stuck on a dead server (MLflow retries for minutes) held a training
    script's exit for minutes after ``close()`` had returned."""
    results: list[Any] = [False] * len(jobs)
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
        threading.Thread(target=work, name=f"cluster-tracking-{name}", daemon=True)
        for _ in range(max(1, min(threads, len(jobs))))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results
