"""Arrays shared with worker processes through files they map into memory.

Pickling a large array with every task copies it each time; written once to an ``.npy`` file
(on ``/dev/shm``, memory, where it has room), it is mapped read-only by each worker, which keeps
the mapping for the tasks of the same call (:func:`mapped_arrays`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np


class SharedArrays:
    """``arrays`` written once to ``.npy`` files (:attr:`paths`) for worker processes to map;
    :meth:`close` deletes them.

    On ``/dev/shm`` (memory) where it has room, else in the temporary directory.
    """

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        nbytes = sum(array.nbytes for array in arrays)
        self.folder = tempfile.mkdtemp(prefix="cluster-tracking-", dir=_shared_memory_dir(nbytes))
        self.paths: list[str] = []
        for index, array in enumerate(arrays):
            path = os.path.join(self.folder, f"weight-{index}.npy")
            np.save(path, array)
            self.paths.append(path)

    def close(self) -> None:
        """Delete the files (a worker's mapping stays valid until it drops it)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _shared_memory_dir(nbytes: int) -> str | None:
    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
            return shm
    except OSError:
        pass
    return None


#: In a worker process: the arrays of the call it serves, mapped from their files.
_MAPPED: dict[tuple[str, ...], list[np.ndarray]] = {}


def mapped_arrays(paths: Sequence[str]) -> list[np.ndarray]:
    """In a worker process: the arrays that :class:`SharedArrays` wrote to ``paths``, mapped
    read-only; kept for the next task of the same call, dropped when a call with other files
    comes (one call's arrays at a time)."""
    key = tuple(paths)
    if key not in _MAPPED:
        _MAPPED.clear()
        _MAPPED[key] = [np.load(path, mmap_mode="r") for path in paths]
    return _MAPPED[key]
