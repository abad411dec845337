"""Where a tracker keeps its reports: an unnamed temporary file, not memory.

Each report is kept as compressed JSON (about 2 KB for a 600-node MLP); memory holds only where
each one is, so the training process does not grow with the number of measurements. The file
goes with its store (and so with the tracker).
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
import zlib
from typing import Any

from cluster_tracking.report import ClusterabilityReport


class ReportStore:
    """The reports of one tracker, by step, in an unnamed temporary file (created with the
    first report). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._where: dict[int, tuple[int, int]] = {}  # step -> (offset, length)
        self._file: Any = None

    def keep(self, step: int, report: ClusterabilityReport) -> None:
        """Append ``report`` as the report of ``step``."""
        data = zlib.compress(report.to_json().encode("utf-8"))
        with self._lock:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="cluster-tracking-reports-")
                weakref.finalize(self, self._file.close)  # the file goes with the store
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(data)
            self._where[step] = (offset, len(data))

    def reports(self) -> list[ClusterabilityReport]:
        """Every report kept, by step."""
        with self._lock:
            packed = []
            for step in sorted(self._where):
                offset, length = self._where[step]
                self._file.seek(offset)
                packed.append(self._file.read(length))
        return [ClusterabilityReport.from_json(zlib.decompress(data).decode()) for data in packed]

    def __len__(self) -> int:
        return len(self._where)
