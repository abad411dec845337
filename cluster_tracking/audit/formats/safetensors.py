"""safetensors files: the header checked against the file, then the tensors in name order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster_tracking.errors import SourceError
from cluster_tracking.graph.safetensors_header import (
    check_safetensors_header,
    first_line,
    natural_key,
)
from cluster_tracking.resources.limits import MemoryBudget


def looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def read_safetensors(path: Path, budget: MemoryBudget | None = None) -> dict[str, Any]:
    """The tensors of a safetensors file, its header checked and budgeted first, in natural
    order of their names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    check_safetensors_header(path, budget or MemoryBudget(path))
    try:
        tensors = load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as error:
        raise SourceError(
            f"{path}: not a readable safetensors file ({first_line(error)})."
        ) from error
    if not tensors:
        raise SourceError(f"{path}: the safetensors file holds no tensors.")
    # A safetensors file does not keep the tensors' order: put the layers back in natural order
    # of their names ("2.weight" before "10.weight"), the declaration order of most models.
    from cluster_tracking.graph.chain import NameOrderedStateDict

    return NameOrderedStateDict((key, tensors[key]) for key in sorted(tensors, key=natural_key))
