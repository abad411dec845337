"""The weight graph of a chain of layers read from a safetensors file in bounded memory.

:func:`weight_graph` copies every weight into float64 and assembles a sparse adjacency: about 60
bytes per edge, too much for models of a billion parameters. :func:`safetensors_graph` reads
the chosen layers straight from the file instead, a row chunk at a time through a memory map
(bf16 and fp16 converted per chunk), and keeps one float32 copy of each weight's magnitudes
``|W|`` (4 bytes per edge; exact for bf16, fp16 and float32 files). The graph it returns has no
sparse adjacency (``WeightGraph.assembled`` is ``False``): degrees, the eigensolver's products
and the n-cut work block by block on these magnitudes (:mod:`cluster_tracking.spectral`).

Before it reads a weight it estimates the measurement's peak memory from the header's shapes
(:func:`~cluster_tracking.estimate.estimate_peak`) and refuses, in one line, what would not fit.

The chain rules are :func:`~cluster_tracking.graph.weight_graph`'s for a state_dict: the
``*.weight`` tensors in natural name order (a safetensors file keeps no other), or the layers
``layers=`` names, each reading the previous one's output; a whole file that is not one chain is
refused. Only magnitudes are kept, so the null models that draw new signed values
(``layer_nonzero_distribution``, ``layer_all_distribution``...) are refused on such a graph;
``layer`` and ``layer_nonzero`` shuffle magnitudes as they shuffle weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cluster_tracking.errors import GraphError, SourceError
from cluster_tracking.graph.build import _Builder
from cluster_tracking.graph.chain import _build_chain, _ChainEntry, _refuse_non_chain
from cluster_tracking.graph.selection import list_names, parse_layers, select_layers
from cluster_tracking.graph.types import Preset, WeightGraph
from cluster_tracking.graph.weights import fold_scale

__all__ = ["safetensors_extent", "safetensors_graph"]

#: Bytes of float32 output converted per row chunk (the memory map is opened per chunk, so the
#: file's pages mapped at once stay bounded too).
READ_CHUNK_BYTES = 64 * 2**20

#: Float dtypes read, with their numpy layout (bf16: the high half of a float32).
_FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}

StageCallback = Callable[[str, int, int], None]


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
    from cluster_tracking.limits import MemoryBudget
    from cluster_tracking.loading import _check_safetensors_header, _natural_key

    if not path.is_file():
        what = "no such file" if not path.exists() else "not a regular file"
        raise SourceError(f"{path}: {what}; give the path of a .safetensors file.")
    # Nothing is allocated by the declared sizes here (weights are read in chunks), so the
    # header is checked for consistency with an unbounded budget; the measurement's own peak is
    # estimated below.
    _check_safetensors_header(path, MemoryBudget(path, limit=1 << 62))
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
    return {key: tensors[key] for key in sorted(tensors, key=_natural_key)}


def _chain_plan(
    tensors: dict[str, _Tensor], layers: str | Sequence[str] | None, path: Path
) -> list[tuple[str, Literal["linear", "conv", "batchnorm"], _Tensor]]:
    """The layers of the chain, in order: ``(name, kind, tensor)`` (for a BatchNorm, its
    ``running_var``)."""
    found: dict[str, tuple[Literal["linear", "conv", "batchnorm"], str]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".running_var") or key == "running_var":
            found[key.removesuffix("running_var").removesuffix(".") or "batchnorm"] = (
                "batchnorm",
                key,
            )
        elif key.endswith(".weight") or key == "weight":
            prefix = key.removesuffix("weight").removesuffix(".") or "weight"
            if tensor.ndim == 2:
                found[prefix] = ("linear", key)
            elif 3 <= tensor.ndim <= 5:
                found[prefix] = ("conv", key)
    available = [name for name, (kind, _) in found.items() if kind != "batchnorm"]
    selection = layers if parse_layers(layers) is not None else None
    if selection is None:
        _refuse_non_chain(tensors, found, ordered_by_name=True)
        names = list(found)
    else:
        names = select_layers(selection, available, what=str(path))
        unknown = [name for name in names if name not in found]
        if not names or unknown:
            raise GraphError(
                f"layers= names {list_names(unknown or ['(nothing)'])}, not Linear/Conv weights "
                f"of {path}. Available layers: {list_names(available, limit=40)}."
            )
    return [(name, found[name][0], tensors[found[name][1]]) for name in names]


def safetensors_extent(
    path: str | os.PathLike[str], *, layers: str | Sequence[str] | None = None
) -> tuple[int, int]:
    """``(nodes, edges)`` of the chain graph :func:`safetensors_graph` would build, from the
    header alone (edges: stored weight entries)."""
    path = Path(path)
    plan = _chain_plan(_read_header(path), layers, path)
    return _extent(plan)


def _extent(plan: Sequence[tuple[str, str, _Tensor]]) -> tuple[int, int]:
    weights = [tensor for _, kind, tensor in plan if kind != "batchnorm"]
    if not weights:
        return 0, 0
    nodes = weights[0].shape[1] + sum(tensor.shape[0] for tensor in weights)
    edges = sum(int(np.prod(tensor.shape, dtype=np.int64)) for tensor in weights)
    return int(nodes), int(edges)


def safetensors_graph(
    path: str | os.PathLike[str],
    *,
    layers: str | Sequence[str] | None = None,
    preset: Preset = "default",
    k: int = 12,
    shuffles: int = 0,
    workers: int = 1,
    max_memory: int | None = None,
    stage: StageCallback | None = None,
) -> WeightGraph:
    """The weight graph of a chain of layers of a safetensors file, read in bounded memory.

    The same graph as ``weight_graph(state_dict, layers=layers)`` gives for the file's
    state_dict (same layers, nodes, order and edge weights), held as float32 magnitudes
    without a sparse adjacency: about 4 bytes per edge where the in-memory path needs about 60.
    bf16, fp16 and float32 weights are read exactly; float64 ones are rounded to float32
    (relative 6e-8). Pass it to :func:`~cluster_tracking.measure` or
    :func:`~cluster_tracking.spectral.spectral_partition` as any graph.

    Args:
        path: a ``.safetensors`` file.
        layers: the Linear/Conv layers (names or ``|``-separated glob patterns, e.g.
            ``"model.layers.*.mlp.up_proj|model.layers.*.mlp.down_proj"``), in data-flow order;
            ``None``: every ``*.weight`` in natural name order, when the file is one chain.
        preset: ``"default"`` or ``"filan2021"`` (see :func:`~cluster_tracking.graph.weight_graph`).
        k, shuffles, workers: what the measurement will do, for the memory estimate.
        max_memory: bytes the measurement may use (``None``: the limit in force,
            :func:`~cluster_tracking.limits.current_memory_limit`).
        stage: called as ``stage("reading", done, total)`` as the layers are read.

    Raises:
        SourceError: the file cannot be read, or its header does not match its contents.
        GraphError: the layers do not chain, a weight is not a float or holds NaN/Inf, or the
            estimated peak memory passes the limit (the message gives the estimate).
    """
    from cluster_tracking.estimate import check_fits, estimate_peak

    path = Path(path)
    tensors = _read_header(path)
    plan = _chain_plan(tensors, layers, path)
    nodes, edges = _extent(plan)
    estimate = estimate_peak(nodes, edges, k=k, shuffles=shuffles, workers=workers, bipartite=True)
    check_fits(estimate, str(path), max_memory)
    entries = []
    total = sum(1 for _, kind, _ in plan if kind != "batchnorm")
    done = 0
    for name, kind, tensor in plan:
        label = f"weight {tensor.key!r}"
        if kind == "batchnorm":
            prefix = tensor.key.removesuffix("running_var")
            running_var = _read_magnitudes(path, tensor, label, absolute=False)
            gamma_tensor = tensors.get(prefix + "weight")
            gamma = (
                np.ones_like(running_var)
                if gamma_tensor is None
                else _read_magnitudes(path, gamma_tensor, label, absolute=False)
            )
            scale = fold_scale(
                gamma.astype(np.float64), running_var.astype(np.float64), 1e-5, label
            )
            entries.append(_ChainEntry(name, f"BatchNorm {tensor.key!r}", "batchnorm", scale=scale))
            continue
        weight = _read_magnitudes(path, tensor, label, absolute=True)
        entries.append(_ChainEntry(name, label, kind, weight))
        done += 1
        if stage is not None:
            stage("reading", done, total)
    builder = _Builder("l1")
    _build_chain(builder, entries, strict=parse_layers(layers) is not None)
    for spec in builder.specs:
        spec.magnitude = True
    return builder.finish(preset, str(path), assemble=False)


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
