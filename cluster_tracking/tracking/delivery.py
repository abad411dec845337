"""The platform-free half of a platform sink: spool first, then deliver, exactly once.

A sink that talks to a tracking platform (the MLflow and W&B sinks in
``cluster_tracking.integrations``) writes every item it is given to a local spool first (a
:class:`~cluster_tracking.tracking.sinks.LocalDirectorySink` folder holding the files, and its
:class:`~cluster_tracking.tracking.spool.Outbox`), and then sends it; a platform that is slow or
away delays nothing, and what it did not take stays spooled, named in one warning. This module
holds what both sinks do alike: the spool and its items, sending one part with a few quick
retries (:func:`send_with_retries`), a delivered item's files leaving the spool at once, and the
warnings of an outage and of what was left at ``close()``. Each sink adds only how its platform
is called. Nothing here imports a platform, or torch.
"""

from __future__ import annotations

import enum
import importlib
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from cluster_tracking.errors import SinkError, warn
from cluster_tracking.report import (
    ARTIFACT_ROOT,
    ClusterabilityReport,
    logged_metrics,
    step_artifact_dir,
)
from cluster_tracking.tracking.distributed import is_rank_zero
from cluster_tracking.tracking.sinks import LocalDirectorySink
from cluster_tracking.tracking.spool import Item, Outbox


def require_package(name: str, sink: str, install_hint: str) -> ModuleType:
    """Import the platform package ``name`` for ``sink`` (imported when the sink is created, so
    that cluster-tracking works without it).

    Raises:
        SinkError: the package is not installed; the message gives ``install_hint``.
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise SinkError(
            f"{sink} needs the {name} package, which is not installed: {install_hint}"
        ) from error


class Outcome(enum.Enum):
    """How sending one part of a spooled item ended (:func:`send_with_retries`)."""

    #: the platform took it.
    DELIVERED = "delivered"
    #: the platform refused it for good (retrying cannot help): it stays in the spool.
    REFUSED = "refused"
    #: the platform did not take it after every try: it stays spooled for the next attempt.
    FAILED = "failed"
    #: ``stop()`` said to send nothing more (``close()`` gave up): nothing was sent.
    STOPPED = "stopped"


def send_with_retries(
    send: Callable[[], None],
    *,
    retries: int,
    backoff: float,
    refused: Callable[[BaseException], bool],
    hopeless: Callable[[BaseException], bool] = lambda error: False,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[Outcome, BaseException | None]:
    """Call ``send()`` up to ``retries`` times, waiting ``backoff`` seconds before the 2nd try
    and twice as long before each further one.

    An error for which ``refused(error)`` is true ends it at once as :attr:`Outcome.REFUSED`,
    one for which ``hopeless(error)`` is true as :attr:`Outcome.FAILED` (retrying cannot help,
    e.g. a finished run); ``stop()`` is asked before every try.

    Returns:
        The outcome and the last error (``None`` when delivered or stopped).
    """
    error: BaseException | None = None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        if stop():
            return Outcome.STOPPED, None
        try:
            send()
        except Exception as failure:
            if hopeless(failure):
                return Outcome.FAILED, failure
            if refused(failure):
                return Outcome.REFUSED, failure
            error = failure
            continue
        return Outcome.DELIVERED, None
    return Outcome.FAILED, error


class SpooledSink:
    """The spool of a platform sink and its bookkeeping (see the module docstring).

    A subclass calls :meth:`_open_spool` once it knows its run, appends items with
    :meth:`_spool_report`, :meth:`_spool_summary` or :meth:`_append`, and sends their parts its
    own way. ``inert`` is true on the ranks of a distributed run other than 0: no run, no spool,
    no calls.
    """

    #: How the platform is named in messages (``"MLflow"``, ``"W&B"``).
    platform = ""

    def _init_delivery(self) -> None:
        """The state every platform sink has, before it knows its run."""
        self._lock = threading.RLock()  # the outbox and the spool's files
        self._closed = False
        self._offline_error: BaseException | None = None
        self.inert = not is_rank_zero()

    def _open_spool(
        self,
        folder: Path,
        *,
        temporary: bool,
        parts: Callable[[Item], Sequence[str]],
        identity: Mapping[str, str],
    ) -> None:
        """Use ``folder`` as the spool (created with its first item; a ``temporary`` one is
        removed by ``close()`` once everything is delivered), with an outbox of items whose
        parts are ``parts(item)``."""
        self.spool_path = folder
        self._temporary_spool = temporary
        self._spool: LocalDirectorySink | None = None
        self._outbox = Outbox(folder, parts=parts, identity=identity)

    @property
    def spool(self) -> LocalDirectorySink:
        """The local folder of what waits for the platform (created on first use)."""
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

    def _append(self, entry: Item) -> Item:
        return self._outbox.append(entry)

    def _spool_report(
        self,
        report: ClusterabilityReport,
        step: int,
        artifacts: Mapping[str, Path],
        **extra: Any,
    ) -> Item:
        """Copy a report's files into the spool and append its item (with ``_lock`` held):
        ``step``, the :func:`~cluster_tracking.report.logged_metrics`, the folder and file
        names, and the sink's ``extra`` fields."""
        self.spool.copy_artifacts(artifacts, self.spool_path / step_artifact_dir(step))
        entry: Item = {
            "kind": "report",
            "step": int(step),
            "metrics": logged_metrics(report),
            "folder": step_artifact_dir(step),
            "files": sorted(Path(name).name for name in artifacts),
        }
        return self._append({**entry, **extra})

    def _spool_summary(
        self,
        reports: Sequence[ClusterabilityReport],
        artifacts: Mapping[str, Path],
        **extra: Any,
    ) -> Item:
        """Copy the summary files into the spool and append their item (with ``_lock`` held)."""
        self.spool.log_summary(reports, artifacts)
        entry: Item = {
            "kind": "summary",
            "folder": ARTIFACT_ROOT,
            "files": sorted(Path(name).name for name in artifacts),
        }
        return self._append({**entry, **extra})

    def _prune(self) -> None:
        """Delivered items leave the spool at once: their outbox lines and their files
        (:meth:`_discard`). Call with ``_lock`` held."""
        for item in self._outbox.prune():
            self._discard(item)

    def _discard(self, item: Item) -> None:
        """Delete the spooled files of a delivered item."""
        if item["kind"] == "report":
            shutil.rmtree(self.spool_path / item["folder"], ignore_errors=True)
        elif item["kind"] == "summary":
            for name in item["files"]:
                (self.spool_path / item["folder"] / name).unlink(missing_ok=True)

    def _went_offline(self, error: BaseException | None, message: str) -> None:
        """Record that the platform does not take items; ``message`` is warned only when it
        was answering until now (one warning per outage)."""
        if self._offline_error is None:
            warn(message, stacklevel=4)
        self._offline_error = error

    def _destination(self) -> str:
        """Where items go, for messages (``MLflow at http://...``, ``the W&B run abc``)."""
        return self.platform

    def _warn_undelivered(self, left: int, reason: str, how: str) -> None:
        """The one warning of ``close()`` when ``left`` items stay in the spool: why, where
        they are, and ``how`` to deliver them (``"later with <code>"``)."""
        warn(
            f"{left} clusterability item(s) could not be delivered to {self._destination()} "
            f"({reason}); they are kept in {self.spool_path}. Deliver them {how}.",
            stacklevel=4,
        )

    def _remove_temporary_spool(self) -> None:
        """Everything was delivered: a spool under the system's temp dir goes."""
        if self._temporary_spool:
            shutil.rmtree(self.spool_path, ignore_errors=True)
