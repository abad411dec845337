"""Weights read from a safetensors file through a memory map, without torch.

The header's tensors (:func:`_read_header`, checked against the file), one tensor's float32
magnitudes read a row chunk at a time (:func:`_read_magnitudes`: bf16 and fp16 converted per
chunk), and what a Dask worker needs to map a graph's weight blocks itself
(:class:`MappedSource`: the file's path, a fingerprint of it, the tensor of each block), so that
only the path travels, never the weights (:func:`map_block_weights`, :func:`mapped_blocks`).
Every worker needs the same file at the same path; nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cluster_tracking.errors import GraphError, SourceError
from cluster_tracking.graph.types import EdgeBlock

#: Bytes of float32 output converted per row chunk (the memory map is opened per chunk, so the
#: file's pages mapped at once stay bounded too).
READ_CHUNK_BYTES = 64 * 2**20
#: Float dtypes read, with their numpy layout (bf16: the high half of a float32).
_FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


@dataclass(frozen=True)
class _Tensor:
    """A tensor the header declares: its dtype, shape and where its bytes lie in the file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _read_header(path: Path) -> dict[str, _Tensor]:
    """The tensors a safetensors file declares, checked against the file (sizes, offsets, dtypes)
    by the readers' own check, in natural name order."""
    from cluster_tracking.graph.safetensors_header import check_safetensors_header, natural_key
    from cluster_tracking.resources.limits import MemoryBudget

    if not path.is_file():
        what = "no such file" if not path.exists() else "not a regular file"
        raise SourceError(f"{path}: {what}; give the path of a .safetensors file.")
    # Nothing is allocated by the declared sizes here (weights are read in chunks), so the
    # header is checked for consistency with an unbounded budget; the measurement's own peak is
    # estimated below.
    check_safetensors_header(path, MemoryBudget(path, limit=1 << 62))
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length).decode("utf-8"))
    tensors = {
        str(key): _Tensor(
            str(key), entry["dtype"], tuple(entry["shape"]), 8 + length + entry["data_offsets"][0]
        )
        for key, entry in header.items()
        if key != "__metadata__"
    }
    if not tensors:
        raise SourceError(f"{path}: the safetensors file holds no tensors.")
    return {key: tensors[key] for key in sorted(tensors, key=natural_key)}


@dataclass(frozen=True)
class MappedSource:
    """Where a graph's weight blocks lie in a safetensors file: what a Dask worker needs to map
    them itself, so that only this travels to it, never the weights.

    Attributes:
        path: the file's absolute path; every worker needs the same file at this path.
        fingerprint: the file's size, and a hash of its header and of 64 pages of its data
            spread over the whole file: a worker refuses a file at ``path`` whose fingerprint
            differs (another file, or another version of it).
        tensors: the tensor each weight block is read from, in the graph's block order.
        scales: per block, the folded BatchNorm's per-output factor (float32), or ``None``.
    """

    path: str
    fingerprint: str
    tensors: tuple[_Tensor, ...]
    scales: tuple[np.ndarray | None, ...] = field(compare=False)

    @property
    def key(self) -> str:
        """Names this file's blocks in a worker's cache."""
        return f"{self.path}|{self.fingerprint}|{'|'.join(t.key for t in self.tensors)}"


def _fingerprint(path: Path) -> str:
    """The file's size, and a hash of its header and of 64 pages spread over its data (see
    :class:`MappedSource`)."""
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        digest.update(handle.read(min(length, 1 << 26)))
        start = 8 + length
        span = max(0, size - start)
        for index in range(64):
            handle.seek(start + span * index // 64)
            digest.update(handle.read(4096))
    return f"{size}:{digest.hexdigest()}"


#: In a Dask worker: the weight blocks it mapped, by :attr:`MappedSource.key` (one file at a
#: time; freed when the measurement is done).
_MAPPED: dict[str, list[np.ndarray]] = {}


_MAPPED_LOCK = threading.Lock()


def map_block_weights(source: MappedSource, indices: Sequence[int]) -> list[np.ndarray]:
    """On a Dask worker: the weights of blocks ``indices`` (float32 ``|W|``, BatchNorm folded)
    read from ``source.path`` as :func:`safetensors_graph` reads them, after checking that the
    file there is the one measured. Imports no torch."""
    path = Path(source.path)
    if not path.is_file():
        raise SourceError(
            f"{path}: no such file on this Dask worker ({_host()}); every worker needs the "
            "model at the same path as the process that measures it (a shared file system, or "
            "a copy at the same path)."
        )
    found = _fingerprint(path)
    if found != source.fingerprint:
        raise SourceError(
            f"{path} on this Dask worker ({_host()}) is not the file being measured (size and "
            f"sampled contents differ: {found} here, {source.fingerprint} there); give every "
            "worker the same file at the same path."
        )
    weights = []
    for index in indices:
        tensor = source.tensors[index]
        weight = _read_magnitudes(path, tensor, f"weight {tensor.key!r}", absolute=True)
        scale = source.scales[index]
        if scale is not None:  # as the chain builder folds it: float32 factor, per output
            factor = scale.astype(weight.dtype, copy=False)
            weight = weight * factor.reshape((-1,) + (1,) * (weight.ndim - 1))
        weights.append(weight)
    return weights


def mapped_blocks(source: MappedSource, skeleton: Sequence[EdgeBlock]) -> list[EdgeBlock]:
    """On a Dask worker: every block of the graph with its weights mapped from the file (kept
    for the worker's next tasks on the same file, until :func:`forget_mapped`)."""
    with _MAPPED_LOCK:
        if source.key not in _MAPPED:
            _MAPPED.clear()  # one file's blocks at a time
            _MAPPED[source.key] = map_block_weights(source, range(len(skeleton)))
        weights = _MAPPED[source.key]
    return [replace(block, weight=weight) for block, weight in zip(skeleton, weights, strict=True)]


def forget_mapped(key: str | None = None) -> None:
    """On a Dask worker: drop the blocks :func:`mapped_blocks` kept (``key``: only that file's)."""
    with _MAPPED_LOCK:
        if key is None:
            _MAPPED.clear()
        else:
            _MAPPED.pop(key, None)


def _host() -> str:
    import socket

    return socket.gethostname()


def _read_magnitudes(path: Path, tensor: _Tensor, label: str, *, absolute: bool) -> np.ndarray:
    """One tensor as float32 (its magnitudes ``|W|`` with ``absolute``), read from a memory map
    of the file in row chunks of :data:`READ_CHUNK_BYTES` of output."""
    layout = _FLOAT_DTYPES.get(tensor.dtype)
    if layout is None:
        what = "a mask" if tensor.dtype == "BOOL" else "quantized weights without their scales"
        raise GraphError(
            f"{label} holds {tensor.dtype} values ({what}); their magnitudes are not weights. "
            "Measure the float weights (apply the mask, or dequantize with the scales first)."
        )
    shape = tensor.shape
    out = np.empty(shape, dtype=np.float32)
    if out.size == 0:
        raise GraphError(f"{label} has shape {list(shape)}: a layer with no neurons.")
    flat_out = out.reshape(shape[0], -1)
    row = flat_out.shape[1]
    itemsize = np.dtype(layout).itemsize
    step = max(1, READ_CHUNK_BYTES // (4 * row))
    for first in range(0, shape[0], step):
        rows = min(step, shape[0] - first)
        mapped = np.memmap(
            path,
            dtype=layout,
            mode="r",
            offset=tensor.start + first * row * itemsize,
            shape=(rows, row),
        )
        target = flat_out[first : first + rows]
        if tensor.dtype == "BF16":  # bf16 is the high 16 bits of a float32
            target.view(np.uint32)[:] = mapped.astype(np.uint32) << 16
        else:
            target[:] = mapped
        del mapped
        if not np.isfinite(target).all():
            bad = int(target.size - np.isfinite(target).sum())
            raise GraphError(
                f"{label} has {bad} NaN/Inf weight value(s) in rows {first}-{first + rows - 1}; "
                "a weight graph needs finite weights. The training run has probably diverged: "
                "measure an earlier checkpoint."
            )
        if absolute:
            np.abs(target, out=target)
    return out
