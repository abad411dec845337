"""The header of a safetensors file, checked against the file before anything reads its tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the tensors' bytes. :func:`check_safetensors_header` checks what
the header declares against the file and a memory budget; both the audit's reader
(:mod:`cluster_tracking.audit.formats.safetensors`) and the bounded-memory graph
(:mod:`cluster_tracking.graph.lazy`) call it first. :func:`natural_key` orders the tensors, which
the file does not keep in declaration order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cluster_tracking.errors import SourceError
from cluster_tracking.resources.limits import MemoryBudget, format_size

#: Largest safetensors header (and other JSON configs of weight files) read, in bytes.
MAX_HEADER_BYTES = 100 * 2**20

# Bytes per element of each safetensors dtype.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def check_safetensors_header(path: Path, budget: MemoryBudget) -> None:
    """Check what a safetensors header declares against the file, before safetensors reads it.

    The header (8-byte little-endian length, then JSON) must fit in the file; each tensor's
    ``data_offsets`` must lie inside the data that follows and hold exactly ``prod(shape)``
    elements of its dtype; the tensors together are budgeted.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SourceError(f"{path}: not a safetensors file (shorter than its 8-byte header).")
        length = int.from_bytes(prefix, "little")
        if length > size - 8 or length > MAX_HEADER_BYTES:
            raise SourceError(
                f"{path}: the safetensors header declares {length} bytes, but the file holds "
                f"{size - 8} after its length; the file is truncated or not safetensors."
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SourceError(
            f"{path}: the safetensors header is not JSON ({first_line(error)})."
        ) from error
    if not isinstance(header, dict):
        raise SourceError(f"{path}: the safetensors header is not a JSON object.")
    data_size = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        bad = f"{path}: the safetensors entry {str(key)[:80]!r}"
        if not isinstance(entry, dict):
            raise SourceError(f"{bad} is not an object.")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise SourceError(f"{bad} has an unknown dtype {str(dtype)[:20]!r}.")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise SourceError(f"{bad} has a malformed shape.")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise SourceError(
                f"{bad} has data offsets {str(offsets)[:60]} outside the {data_size} bytes of "
                "data in the file; the file is truncated or corrupt."
            )
        numel = 1
        for n in shape:
            numel *= n
        needed = numel * _SAFETENSORS_ITEMSIZE[dtype]
        if needed != offsets[1] - offsets[0]:
            raise SourceError(
                f"{bad} declares shape {shape} ({format_size(needed)}) but its record holds "
                f"{offsets[1] - offsets[0]} bytes; the file is corrupt."
            )
        budget.take(needed, f"tensor {str(key)[:80]!r} of shape {shape}")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a dotted name: numbers compare as numbers (``layer2`` < ``layer10``)."""
    parts: list[tuple[int, int | str]] = []
    for component in name.split(".")[:-1]:
        for piece in re.split(r"(\d+)", component):
            if piece:
                parts.append((0, int(piece)) if piece.isdigit() else (1, piece))
        parts.append((-1, ""))  # end of a component: "layer1.x" before "layer10"
    return tuple(parts)


def first_line(error: object) -> str:
    """The first line of an error message; its first sentence when that line is long (the type
    named when the message alone says little), for the readers' one-line errors."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    if len(line) > 160 and ". " in line[:300]:
        line = line[: line.index(". ") + 1]
    if len(line) < 12 or isinstance(error, KeyError):
        line = f"{type(error).__name__}: {line}"
    return line[:300]
