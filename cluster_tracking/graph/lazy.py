"""The weight graph of a chain of layers read from a safetensors file in bounded memory.

:func:`weight_graph` copies every weight into float64 and assembles a sparse adjacency: about 60
bytes per edge, too much for models of a billion parameters. :func:`safetensors_graph` reads
the chosen layers straight from the file instead, a row chunk at a time through a memory map
(bf16 and fp16 converted per chunk), and keeps one float32 copy of each weight's magnitudes
``|W|`` (4 bytes per edge; exact for bf16, fp16 and float32 files). The graph it returns has no
sparse adjacency (``WeightGraph.assembled`` is ``False``): degrees, the eigensolver's products
and the n-cut work block by block on these magnitudes (:mod:`cluster_tracking.spectral.partition`).

Before it reads a weight it estimates the measurement's peak memory from the header's shapes
(:func:`~cluster_tracking.resources.estimate.estimate_peak`) and refuses, in one line, what would
not fit.

The chain rules are :func:`~cluster_tracking.graph.weight_graph`'s for a state_dict: the
``*.weight`` tensors in natural name order (a safetensors file keeps no other), or the layers
``layers=`` names, each reading the previous one's output; a whole file that is not one chain is
refused. Only magnitudes are kept, so the null models that draw new signed values
(``layer_nonzero_distribution``, ``layer_all_distribution``...) are refused on such a graph;
``layer`` and ``layer_nonzero`` shuffle magnitudes as they shuffle weights.

Beyond one machine, on Dask, only the file's path travels (:class:`MappedSource`: the path, a
fingerprint of the file, the tensor of each block): a worker maps the blocks itself
(:func:`map_block_weights`), for the null networks (each task maps the whole graph,
:func:`mapped_blocks`) or, with ``safetensors_graph(..., scheduler=...)``, to keep a share of
the layers whose products the eigensolver asks of it (:class:`SafetensorsGraph` ``.remote``).
Every worker needs the same file at the same path; what a worker maps imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cluster_tracking.errors import ConfigError, GraphError, SourceError
from cluster_tracking.graph.selection import list_names, parse_layers, select_layers
from cluster_tracking.graph.types import EdgeBlock, Preset, WeightGraph

if TYPE_CHECKING:
    from cluster_tracking.spectral.partition import _RemoteBlocks

# (The chain builder and the weight readers import torch: they are imported where a graph is
# built, so that Dask workers, which only map weight blocks, start without it.)

__all__ = ["MappedSource", "SafetensorsGraph", "safetensors_extent", "safetensors_graph"]

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
        from cluster_tracking.graph.chain import _refuse_non_chain

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


@dataclass(frozen=True)
class SafetensorsGraph(WeightGraph):
    """A :class:`~cluster_tracking.graph.WeightGraph` read from a safetensors file, which knows
    where its weights lie (:class:`MappedSource`), so that Dask workers map them from the same
    path instead of receiving them.

    ``remote``: the graph's weight blocks were mapped by the workers of a Dask cluster and stay
    there (``safetensors_graph(..., scheduler=...)``); this process holds its nodes and layers
    only, and the eigensolver's products, the degrees and the n-cut are computed by the workers,
    block by block. Its ``blocks`` then hold no weights (zero-size placeholders): anything that
    would need them here refuses.
    """

    source: MappedSource | None = field(default=None, compare=False, repr=False)
    remote: _RemoteBlocks | None = field(default=None, compare=False, repr=False)

    @property
    def degrees(self) -> np.ndarray:
        """Weighted degree of every node (summed on the workers for a remote graph)."""
        if self.remote is not None:
            return self.remote.node_degrees()
        return super().degrees

    def assemble(self) -> WeightGraph:
        """This graph with its sparse adjacency (see :meth:`WeightGraph.assemble`); refused for
        a graph whose weights stay on Dask workers."""
        self._refuse_remote("assembling its sparse adjacency")
        return super().assemble()

    def with_weights(self, weights: Sequence[np.ndarray]) -> WeightGraph:
        """A plain in-memory graph of the same topology with new weights (no longer the file's,
        so it does not claim the file as its source)."""
        self._refuse_remote("replacing its weights")
        plain = super().with_weights(weights)
        return WeightGraph(**{f.name: getattr(plain, f.name) for f in fields(WeightGraph)})

    def release(self) -> None:
        """Free the weight blocks the Dask workers hold for a remote graph (also done when the
        graph is garbage-collected)."""
        if self.remote is not None:
            self.remote.close()

    def _refuse_remote(self, what: str) -> None:
        if self.remote is not None:
            raise GraphError(
                f"{what} needs the weights in this process, but this graph's weights stay on "
                "the Dask workers (safetensors_graph(..., scheduler=...)); read it here "
                "without scheduler= where it fits."
            )


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
    scheduler: Any = None,
) -> SafetensorsGraph:
    """The weight graph of a chain of layers of a safetensors file, read in bounded memory.

    The same graph as ``weight_graph(state_dict, layers=layers)`` gives for the file's
    state_dict (same layers, nodes, order and edge weights), held as float32 magnitudes
    without a sparse adjacency: about 4 bytes per edge where the in-memory path needs about 60.
    bf16, fp16 and float32 weights are read exactly; float64 ones are rounded to float32
    (relative 6e-8). Pass it to :func:`~cluster_tracking.measure` or
    :func:`~cluster_tracking.spectral.partition.spectral_partition` as any graph. It records the
    file it
    came from (``graph.source``): with ``measure(..., backend="dask")`` each null network is a
    Dask task that maps the weights from the same path on its worker.

    With ``scheduler`` (a Dask scheduler's address, or a ``distributed.Client``), the weights
    are not read here at all: each worker of the cluster maps a share of the layers from the
    same path (every worker needs the same file at the same path) and keeps it, and the
    eigensolver's products, the degrees and the n-cut run there block by block, with the same
    numbers as the local path for the same seed. For models whose graph does not fit this
    machine's memory; the peak is checked against this machine's limit (the solver's vectors)
    and each worker's ``memory_limit`` (its blocks) before anything is read.

    Args:
        path: a ``.safetensors`` file.
        layers: the Linear/Conv layers (names or ``|``-separated glob patterns, e.g.
            ``"model.layers.*.mlp.up_proj|model.layers.*.mlp.down_proj"``), in data-flow order;
            ``None``: every ``*.weight`` in natural name order, when the file is one chain.
        preset: ``"default"`` or ``"filan2021"`` (see :func:`~cluster_tracking.graph.weight_graph`).
        k, shuffles, workers: what the measurement will do, for the memory estimate (``workers``:
            null networks measured at once on this machine; 0 when they run on a Dask cluster).
        max_memory: bytes the measurement may use here (``None``: the limit in force,
            :func:`~cluster_tracking.resources.limits.current_memory_limit`).
        stage: called as ``stage("reading", done, total)`` as the layers are read.
        scheduler: a Dask scheduler to keep the weights on (see above); ``None``: read here.

    Raises:
        SourceError: the file cannot be read, or its header does not match its contents (or a
            worker's file at the same path is not this one).
        GraphError: the layers do not chain, a weight is not a float or holds NaN/Inf, or the
            estimated peak memory passes the limit (the message gives the estimate).
    """
    from cluster_tracking.resources.estimate import check_fits, estimate_peak

    path = Path(path).absolute()
    tensors = _read_header(path)
    plan = _chain_plan(tensors, layers, path)
    nodes, edges = _extent(plan)
    if scheduler is not None:
        return _remote_graph(path, plan, layers, preset, k, max_memory, stage, scheduler)
    estimate = estimate_peak(nodes, edges, k=k, shuffles=shuffles, workers=workers, bipartite=True)
    check_fits(estimate, str(path), max_memory)
    from cluster_tracking.graph.chain import _ChainEntry
    from cluster_tracking.graph.weights import fold_scale

    entries = []
    recipes: dict[str, tuple[_Tensor, np.ndarray | None]] = {}
    total = sum(1 for _, kind, _ in plan if kind != "batchnorm")
    done = 0
    last = None
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
            if last is not None and recipes[last][1] is None:
                recipes[last] = (recipes[last][0], scale)
            continue
        weight = _read_magnitudes(path, tensor, label, absolute=True)
        entries.append(_ChainEntry(name, label, kind, weight))
        recipes[name] = (tensor, None)
        last = name
        done += 1
        if stage is not None:
            stage("reading", done, total)
    graph = _finish_chain(entries, layers, preset, path)
    source = None
    if all(block.name in recipes for block in graph.blocks):
        chosen = [recipes[block.name] for block in graph.blocks]
        source = MappedSource(
            str(path),
            _fingerprint(path),
            tuple(tensor for tensor, _ in chosen),
            tuple(
                None if scale is None or block.batchnorm is None else scale
                for (_, scale), block in zip(chosen, graph.blocks, strict=True)
            ),
        )
    return _as_safetensors_graph(graph, source, None)


def _finish_chain(entries: list[Any], layers: Any, preset: Preset, path: Path) -> WeightGraph:
    from cluster_tracking.graph.build import _Builder
    from cluster_tracking.graph.chain import _build_chain

    builder = _Builder("l1")
    _build_chain(builder, entries, strict=parse_layers(layers) is not None)
    for spec in builder.specs:
        spec.magnitude = True
    return builder.finish(preset, str(path), assemble=False)


def _as_safetensors_graph(
    graph: WeightGraph, source: MappedSource | None, remote: _RemoteBlocks | None
) -> SafetensorsGraph:
    values = {f.name: getattr(graph, f.name) for f in fields(WeightGraph)}
    return SafetensorsGraph(**values, source=source, remote=remote)


def _remote_graph(
    path: Path,
    plan: list[tuple[str, Literal["linear", "conv", "batchnorm"], _Tensor]],
    layers: str | Sequence[str] | None,
    preset: Preset,
    k: int,
    max_memory: int | None,
    stage: StageCallback | None,
    scheduler: Any,
) -> SafetensorsGraph:
    """The graph of ``plan`` with its weight blocks mapped and kept by the workers of a Dask
    cluster (see :func:`safetensors_graph`)."""
    from cluster_tracking.graph.chain import _ChainEntry
    from cluster_tracking.resources.estimate import (
        check_fits,
        check_workers_fit,
        estimate_peak,
        estimate_worker_blocks,
    )
    from cluster_tracking.spectral.partition import _dask_client, _RemoteBlocks, _running_workers

    if preset == "filan2021":
        raise ConfigError(
            "preset='filan2021' runs scikit-learn's SpectralClustering, which needs the whole "
            "adjacency in one process; keeping the weights on Dask workers (scheduler=) works "
            "with preset='default' only."
        )
    batchnorms = [tensor.key for _, kind, tensor in plan if kind == "batchnorm"]
    if batchnorms:
        raise ConfigError(
            f"the chain folds BatchNorm layers ({list_names(batchnorms)}); keeping the weights "
            "on Dask workers (scheduler=) reads plain Linear/Conv chains: read this one here "
            "(without scheduler=)."
        )
    # The chain's topology from the header's shapes alone: zero-stride placeholders (no
    # memory), replaced below by zero-size ones so nothing here can compute on them.
    entries = [
        _ChainEntry(
            name, f"weight {tensor.key!r}", kind, np.broadcast_to(np.float32(1), tensor.shape)
        )
        for name, kind, tensor in plan
    ]
    chain = _finish_chain(entries, layers, preset, path)
    by_name = {name: tensor for name, _, tensor in plan}
    source = MappedSource(
        str(path),
        _fingerprint(path),
        tuple(by_name[block.name] for block in chain.blocks),
        tuple(None for _ in chain.blocks),
    )
    skeleton = tuple(
        replace(block, weight=_placeholder(block.weight.ndim)) for block in chain.blocks
    )
    nodes = chain.n_nodes
    block_entries = [int(np.prod(t.shape, dtype=np.int64)) for t in source.tensors]
    client, owned = _dask_client(scheduler)
    try:
        estimate = estimate_peak(nodes, 0, k=k, bipartite=True)
        what = f"{path} (this process; the weights on the Dask workers)"
        check_fits(estimate, what, max_memory, dask=False)
        workers = _running_workers(client)
        assignment = _assign_blocks(block_entries, sorted(workers))
        check_workers_fit(
            {
                worker: (
                    estimate_worker_blocks(sum(block_entries[i] for i in indices)),
                    int(workers[worker].get("memory_limit") or 0),
                )
                for worker, indices in assignment.items()
            },
            str(path),
        )
        remote = _RemoteBlocks(
            client,
            owned,
            source,
            skeleton,
            chain.n_nodes,
            chain.node_layer,
            assignment,
            stage,
        )
    except BaseException:
        if owned:
            client.close()
        raise
    graph = replace(chain, blocks=skeleton)
    result = _as_safetensors_graph(graph, source, remote)
    # the workers free the blocks when the graph goes (not at exit: the client may be gone)
    weakref.finalize(result, remote.close).atexit = False
    return result


def _placeholder(ndim: int) -> np.ndarray:
    """A zero-size weight: a block whose weights stay on a Dask worker."""
    return np.empty((0,) * ndim, dtype=np.float32)


def _assign_blocks(block_entries: Sequence[int], workers: Sequence[str]) -> dict[str, list[int]]:
    """Consecutive runs of blocks to workers, about the same number of entries each."""
    count = min(len(workers), len(block_entries))
    total = sum(block_entries)
    assignment: dict[str, list[int]] = {worker: [] for worker in workers[:count]}
    filled = 0
    for index, entries in enumerate(block_entries):
        # the worker whose share the middle of this block falls in
        position = min(count - 1, int((filled + entries / 2) * count / max(total, 1)))
        assignment[workers[position]].append(index)
        filled += entries
    return {worker: indices for worker, indices in assignment.items() if indices}


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
