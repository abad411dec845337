"""``torch.export`` archives (``.pt2``, MLflow 3's default PyTorch format), read without
``torch.export.load``: a zip of raw tensor bytes described by JSON, nothing unpickled but through
``weights_only``."""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cluster_tracking.errors import ClusterTrackingError, LimitError, SourceError
from cluster_tracking.graph.safetensors_header import MAX_HEADER_BYTES, first_line
from cluster_tracking.resources.limits import MemoryBudget, format_size

_PT2_DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}


def read_pt2(path: Path) -> dict[str, Any]:
    """The weights of a ``torch.export`` archive, without ``torch.export.load``.

    The archive's ``<model>/data/weights/<model>_weights_config.json`` lists each weight (its
    state_dict name, record, dtype, sizes, strides, storage offset); the records are raw tensor
    bytes (``use_pickle: false``) or ``torch.save`` payloads, read with ``weights_only=True``.
    What a config declares is checked against its record's real length and budgeted
    (:class:`~cluster_tracking.resources.limits.MemoryBudget`) before the record is read.
    """
    budget = MemoryBudget(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            configs = sorted(n for n in names if re.search(r"data/weights/[^/]+_config\.json$", n))
            if not configs:
                raise SourceError(f"{path}: a torch.export archive without weights.")
            byteorder = [n for n in names if n.endswith("/byteorder")]
            if byteorder and _read_member(archive, byteorder[0], path, 64).strip() not in (
                b"",
                b"little",
            ):
                raise SourceError(f"{path}: a big-endian torch.export archive; re-export it here.")
            state: dict[str, Any] = {}
            for config_name in configs:
                folder = config_name.rsplit("/", 1)[0]
                config = json.loads(_read_member(archive, config_name, path, MAX_HEADER_BYTES))
                entries = config["config"] if isinstance(config, Mapping) else None
                if not isinstance(entries, Mapping):
                    raise SourceError(f"{path}: {config_name} has no 'config' object.")
                for fqn, entry in entries.items():
                    if not isinstance(entry, Mapping):
                        raise SourceError(f"{path}: the entry of {str(fqn)[:80]!r} is malformed.")
                    state[str(fqn)] = _pt2_tensor(
                        archive, f"{folder}/{entry['path_name']}", entry, path, budget
                    )
    except ClusterTrackingError:
        raise
    except MemoryError as error:
        raise LimitError(f"{path}: ran out of memory reading the torch.export archive.") from error
    except Exception as error:  # a damaged archive or config raises many kinds
        raise SourceError(
            f"{path}: a torch.export archive this version cannot read ({first_line(error)})."
        ) from error
    if not state:
        raise SourceError(f"{path}: the torch.export archive holds no weights.")
    return _group_by_module(state)


def _read_member(archive: zipfile.ZipFile, name: str, path: Path, limit: int) -> bytes:
    """A small archive member (a config), refused when it declares more than ``limit`` bytes."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise SourceError(
            f"{path}: {name} declares {format_size(info.file_size)}, more than a config holds."
        )
    return archive.read(info)


def _group_by_module(state: dict[str, Any]) -> dict[str, Any]:
    """The entries of each module together, modules in order of first appearance.

    A ``torch.export`` archive lists all parameters before all buffers; a state_dict read as a
    chain needs a BatchNorm's ``running_var`` next to its weight, before the next layer.
    """
    order: dict[str, list[str]] = {}
    for key in state:
        order.setdefault(key.rpartition(".")[0], []).append(key)
    return {key: state[key] for keys in order.values() for key in keys}


def _pt2_tensor(
    archive: zipfile.ZipFile,
    name: str,
    entry: Mapping[str, Any],
    path: Path,
    budget: MemoryBudget,
) -> torch.Tensor:
    """One weight of a ``.pt2`` archive: its declared layout checked against its record."""
    info = archive.getinfo(name)
    record_size = info.file_size
    if entry.get("use_pickle", True):
        budget.take(2 * record_size, f"record {name!r} of {format_size(record_size)}, unpickled")
        value = torch.load(io.BytesIO(archive.read(info)), map_location="cpu", weights_only=True)
        if not isinstance(value, torch.Tensor):
            raise SourceError(f"{path}: weight {entry.get('path_name')!r} is not a tensor.")
        return value
    meta = entry["tensor_meta"]
    dtype = _PT2_DTYPES.get(int(meta["dtype"]))
    if dtype is None:
        raise SourceError(f"{path}: weight dtype code {meta['dtype']} is not supported.")
    sizes = [int(size["as_int"]) for size in meta["sizes"]]
    strides = [int(stride["as_int"]) for stride in meta["strides"]]
    offset = int((meta.get("storage_offset") or {}).get("as_int", 0))
    if len(sizes) != len(strides) or min([*sizes, *strides, offset, 0]) < 0 or len(sizes) > 8:
        raise SourceError(
            f"{path}: weight record {name!r} declares an impossible layout (sizes {sizes}, "
            f"strides {strides}, offset {offset})."
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Elements the view reaches: offset + sum((size - 1) * stride) + 1 (none for an empty one).
    elements = (
        0
        if 0 in sizes
        else offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) + 1
    )
    numel = math.prod(sizes)
    if elements * itemsize > record_size:
        raise SourceError(
            f"{path}: weight record {name!r} holds {record_size} bytes, shorter than the "
            f"{format_size(elements * itemsize)} its declared shape {sizes} needs; the archive is "
            "truncated or corrupt."
        )
    if not numel:
        return torch.empty(sizes, dtype=dtype)
    # One copy: the bytes the view reaches are inflated straight into the tensor's storage, in
    # chunks (a whole-member read would hold a second copy); only a view that skips elements
    # (strides with gaps) is compacted, by a second copy of its own size.
    reach = elements - offset
    held = reach + (numel if numel < reach else 0)
    budget.take(held * itemsize, f"record {name!r} of shape {sizes}, inflated")
    storage = torch.empty(reach, dtype=dtype)
    target = memoryview(storage.view(torch.uint8).numpy())  # type: ignore[arg-type]
    with archive.open(info) as member:
        _skip(member, offset * itemsize, path, name)
        filled = 0
        while filled < len(target):
            count = member.readinto(target[filled : filled + _CHUNK])  # type: ignore[attr-defined]
            if not count:
                raise SourceError(f"{path}: weight record {name!r} ends early.")
            filled += count
    tensor = torch.as_strided(storage, sizes, strides, 0)
    return tensor.clone() if numel < reach else tensor


#: Bytes inflated at a time from an archive member.
_CHUNK = 1 << 20


def _skip(member: Any, nbytes: int, path: Path, name: str) -> None:
    """Inflate and drop the first ``nbytes`` of an archive member, a chunk at a time."""
    while nbytes > 0:
        count = len(member.read(min(nbytes, _CHUNK)))
        if not count:
            raise SourceError(f"{path}: weight record {name!r} ends early.")
        nbytes -= count
