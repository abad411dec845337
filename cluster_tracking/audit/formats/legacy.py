"""``torch.save``'s legacy (pre-1.6) format: the storages it declares, budgeted before loading.

``torch.load`` allocates each storage of a legacy file at its declared size while unpickling, so
what the file declares is checked against the bytes it holds and budgeted first
(:func:`check_legacy_torch_file`), reading its pickles with inert stand-ins.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from cluster_tracking.audit.formats.stand_ins import StandIn
from cluster_tracking.errors import SourceError
from cluster_tracking.graph.safetensors_header import first_line
from cluster_tracking.resources.limits import MemoryBudget, format_size

#: ``torch.save``'s legacy (pre-1.6) format: the first pickle of the file holds this number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

#: Bytes per element of the storage classes a legacy file names (``torch.FloatStorage``...).
_LEGACY_ITEMSIZE = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "QInt8Storage": 1,
    "QUInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
}


class _LegacyStandIn(StandIn):
    """A stand-in that also takes the items and elements a pickle adds to it (an
    ``OrderedDict`` rebuilt by the scan below gets ``SETITEMS``/``APPENDS``)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        """Items are ignored: only the storages matter to the scan."""

    def append(self, value: Any) -> None:
        """Elements are ignored, as items are."""

    def extend(self, values: Any) -> None:
        """Elements are ignored, as items are."""


class _LegacyScan(pickle.Unpickler):
    """Reads a legacy file's main pickle for the storages it declares, and nothing else: every
    global it names becomes an inert stand-in (nothing is imported or run), and every persistent
    id ``("storage", type, key, location, numel, view)`` is recorded as ``key -> (type, numel)``.
    """

    def __init__(self, handle: Any) -> None:
        super().__init__(handle)
        self.storages: dict[str, tuple[str, int]] = {}
        self.classes: dict[str, type[StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self.classes:
            short = re.sub(r"\W", "_", name) or "StandIn"
            self.classes[qualified] = type(short, (_LegacyStandIn,), {"qualified_name": qualified})
        return self.classes[qualified]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage"):
            storage_type, key, numel = pid[1], str(pid[2]), pid[4]
            if not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"storage {key!r} declares {numel!r} elements")
            name = getattr(storage_type, "qualified_name", "?").rsplit(".", 1)[-1]
            self.storages.setdefault(key, (name, numel))
        return None


def check_legacy_torch_file(path: Path, size: int, budget: MemoryBudget) -> None:
    """Check the storages a legacy ``torch.save`` file declares against the bytes it holds, and
    budget them, before ``torch.load`` allocates them (it allocates each storage at its declared
    size while unpickling, then fills it from the file).

    The file is four pickles (magic number, protocol, system info, the object, whose persistent
    ids name each storage's type, key and element count), the list of storage keys, then per
    key an 8-byte element count and the storage's bytes. The pickles are read without running
    anything (:class:`_LegacyScan`); a file that is not in this format (a bare pickle, the older
    tar format) is left to ``torch.load``, which refuses a bare pickle and reads a tar's
    storages from its own members (at most as large as the file).

    Raises:
        SourceError: a storage that the file does not hold (truncated or corrupt).
        LimitError: the storages and the unpickled objects pass the memory limit.
    """
    with open(path, "rb") as handle:
        try:
            magic = _LegacyScan(handle).load()
        except Exception:
            magic = None
        if magic != _LEGACY_MAGIC:
            budget.take(2 * size, f"a {format_size(size)} file, read and unpickled")
            return
        try:
            _LegacyScan(handle).load()  # protocol version
            _LegacyScan(handle).load()  # system info
            scan = _LegacyScan(handle)
            scan.load()
            keys = _LegacyScan(handle).load()
        except Exception as error:
            raise SourceError(
                f"{path}: not a readable PyTorch checkpoint ({first_line(error)}); the file may "
                "be truncated or corrupt."
            ) from error
        pickled = handle.tell()
        if not isinstance(keys, list):
            raise SourceError(f"{path}: a legacy PyTorch checkpoint without its storage list.")
        needed = 0
        offset = pickled
        for key in keys:
            kind, numel = scan.storages.get(str(key), ("?", -1))
            itemsize = _LEGACY_ITEMSIZE.get(kind)
            if numel < 0 or itemsize is None:
                raise SourceError(
                    f"{path}: storage {str(key)[:40]!r} is listed but not declared with a known "
                    f"type ({kind}); the file is corrupt."
                )
            handle.seek(offset)
            stored = handle.read(8)
            held = int.from_bytes(stored, "little", signed=True) if len(stored) == 8 else -1
            nbytes = numel * itemsize
            if offset + 8 + nbytes > size:
                raise SourceError(
                    f"{path}: storage {str(key)[:40]!r} declares {numel} elements "
                    f"({format_size(nbytes)}) but the file holds only "
                    f"{format_size(max(size - offset - 8, 0))} from there; the file is truncated "
                    "or corrupt."
                )
            if held != numel:
                raise SourceError(
                    f"{path}: storage {str(key)[:40]!r} declares {numel} elements but its record "
                    f"in the file says {held}; the file is corrupt."
                )
            needed += nbytes
            offset += 8 + nbytes
    budget.take(
        needed + 2 * pickled,
        f"{len(keys)} storages of {format_size(needed)} and a {format_size(pickled)} pickle",
    )
