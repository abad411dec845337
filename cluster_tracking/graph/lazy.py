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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cluster_tracking.errors import GraphError, SourceError
from cluster_tracking.graph.mapped import (
    MappedSource,
    _fingerprint,
    _read_header,
    _read_magnitudes,
    _Tensor,
)
from cluster_tracking.graph.mapped_graph import (
    SafetensorsGraph,
    StageCallback,
    _as_safetensors_graph,
    _finish_chain,
)
from cluster_tracking.graph.selection import list_names, parse_layers, select_layers
from cluster_tracking.graph.types import Preset, WeightGraph

# (The chain builder and the weight readers import torch: they are imported where a graph is
# built, so that Dask workers, which only map weight blocks, start without it.)

__all__ = ["safetensors_extent", "safetensors_graph"]


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
    file it came from (``graph.source``): with ``measure(..., backend="dask")`` each null network is
    a Dask task that maps the weights from the same path on its worker.

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
        GraphError: the layers do not chain, or a weight is not a float or holds NaN/Inf.
        ConfigError: the estimated peak memory passes the limit (the message gives the
            estimate and the options).
    """
    from cluster_tracking.resources.estimate import check_fits, estimate_peak

    path = Path(path).absolute()
    if path.is_dir():
        raise SourceError(
            f"{path} is a folder; safetensors_graph reads one .safetensors file. For a Hugging "
            "Face model folder (config.json and safetensors weights) use "
            "cluster_tracking.graph.model_folder.model_folder_graph(folder)."
        )
    tensors = _read_header(path)
    plan = _chain_plan(tensors, layers, path)
    nodes, edges = _extent(plan)
    if scheduler is not None:
        from cluster_tracking.graph.remote_graph import _remote_graph

        return _remote_graph(path, plan, layers, preset, k, max_memory, stage, scheduler)
    estimate = estimate_peak(nodes, edges, k=k, shuffles=shuffles, workers=workers, bipartite=True)
    check_fits(estimate, str(path), max_memory)
    entries, recipes = _read_chain(path, tensors, plan, stage)
    graph = _finish_chain(entries, layers, preset, path)
    return _as_safetensors_graph(graph, _mapped_source(path, graph, recipes), None)


#: Per layer of the chain read here: the tensor its weights come from and the per-output factor
#: of the BatchNorm folded into it, if any.
_Recipes = dict[str, tuple[_Tensor, np.ndarray | None]]


def _read_chain(
    path: Path,
    tensors: dict[str, _Tensor],
    plan: list[tuple[str, Literal["linear", "conv", "batchnorm"], _Tensor]],
    stage: StageCallback | None,
) -> tuple[list[Any], _Recipes]:
    """The chain builder's entries of ``plan``, each weight read as float32 magnitudes and each
    BatchNorm as its folding factor, and how each layer was read (see :data:`_Recipes`)."""
    from cluster_tracking.graph.chain import _ChainEntry
    from cluster_tracking.graph.weights import fold_scale

    entries = []
    recipes: _Recipes = {}
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
    return entries, recipes


def _mapped_source(path: Path, graph: WeightGraph, recipes: _Recipes) -> MappedSource | None:
    """Where the graph's blocks lie in the file, for Dask workers to map them (``None`` when a
    block was not read from one tensor)."""
    if not all(block.name in recipes for block in graph.blocks):
        return None
    chosen = [recipes[block.name] for block in graph.blocks]
    return MappedSource(
        str(path),
        _fingerprint(path),
        tuple(tensor for tensor, _ in chosen),
        tuple(
            None if scale is None or block.batchnorm is None else scale
            for (_, scale), block in zip(chosen, graph.blocks, strict=True)
        ),
    )
