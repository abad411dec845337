"""Null models: networks with the same weights but none of the structure (Filan et al. 2021, §3).

An observed n-cut means little alone: a network's widths and weight distribution already set what
n-cut spectral clustering can reach. The paper compares it with the n-cuts of *shuffled* networks,
each weight tensor shuffled separately (:func:`shuffle_tensor`):

- ``layer``: permute the tensor's live entries (keeps the multiset of values);
- ``layer_nonzero``: permute only the non-zero entries, keeping the sparsity mask (the honest null
  for pruned networks);
- ``layer_nonzero_distribution``: keep the mask, draw new non-zero values from a Gaussian kernel
  density fitted to the tensor's non-zero values;
- ``layer_all_distribution``: permute the live entries, then draw every non-zero one from that
  density (the published code's ``layer`` then ``layer_nonzero_distribution``): exact zeros stay
  zero, in moved places;
- ``layer_all_distribution_dense`` (opt-in): draw every live entry, zeros included, from a density
  fitted to all of them;

and with ``random_init``: the same architecture freshly initialised by its modules' own
``reset_parameters()`` (or a named ``torch.nn.init`` scheme).

In every shuffle a dead (zero-degree) unit stays dead: only entries joining two live nodes move
(:func:`live_masks`), which is the published code's deletion of zero-degree nodes before
shuffling. Under ``preset="filan2021"`` a convolution is shuffled as its matrix of channel norms
and the kernel density has the fixed bandwidth 0.01 (:func:`kde_bandwidth`), as published.

The statistics (:func:`null_statistics`): ``z = (ncut - mean) / std`` with the population std, the
one-sided ``p = (r + 1) / (n + 1)`` with ``r`` the number of null n-cuts strictly below the observed
one (the published code calls this number the "percentile"), and the percentile rank.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.types import EdgeBlock, WeightGraph
from cluster_tracking.report import Baseline
from cluster_tracking.spectral.partition import block_ncuts, child_seed

if TYPE_CHECKING:
    import torch

SHUFFLE_METHODS = (
    "layer",
    "layer_nonzero",
    "layer_nonzero_distribution",
    "layer_all_distribution",
    "layer_all_distribution_dense",
)
NULL_METHODS = (*SHUFFLE_METHODS, "random_init")
PRESETS = ("default", "filan2021")

#: The kernel density bandwidth of the ``filan2021`` preset: the published code's
#: ``KernelDensity(kernel="gaussian", bandwidth=0.01)``, in the weights' own units.
FILAN2021_BANDWIDTH = 0.01

#: Named initialisations accepted by ``random_init`` (besides the modules' own
#: ``reset_parameters``), applied to every weight tensor of two or more dimensions: the name of
#: each one's function in ``torch.nn.init`` (torch is imported when a null network is made, so
#: that the shuffle nulls' worker processes start without it).
NAMED_INITS: dict[str, str] = {
    "xavier_uniform": "xavier_uniform_",
    "xavier_normal": "xavier_normal_",
    "kaiming_uniform": "kaiming_uniform_",
    "kaiming_normal": "kaiming_normal_",
    "orthogonal": "orthogonal_",
}

_TORCH_RNG_LOCK = threading.Lock()


def check_method(method: str) -> str:
    """Validate a null-model name."""
    if method not in NULL_METHODS:
        raise ConfigError(
            f"unknown null model {method!r}; choose one of {', '.join(NULL_METHODS)}."
        )
    return method


def check_preset(preset: str) -> str:
    """Validate a preset name."""
    if preset not in PRESETS:
        raise ConfigError(f"preset must be 'default' or 'filan2021', got {preset!r}.")
    return preset


def kde_bandwidth(values: np.ndarray, preset: str = "default") -> float:
    """Bandwidth of the Gaussian kernel density that the distribution nulls sample from.

    ``default``: Scott's rule, ``std(values) * n^(-1/5)`` with the population std (scipy's
    ``gaussian_kde`` default in 1-D uses the sample std, ``n / (n - 1)`` times the variance:
    the same width to within 1/(2n)). It scales with the weights, so the null of ``c * W`` is
    ``c`` times the null of ``W`` and the z-score, like the n-cut itself, does not depend on
    the weights' overall scale.
    ``filan2021``: the published code's fixed :data:`FILAN2021_BANDWIDTH` (0.01), whatever the
    scale of the values.
    """
    if check_preset(preset) == "filan2021":
        return FILAN2021_BANDWIDTH
    return float(np.std(values)) * values.size ** (-1.0 / 5.0)


def shuffle_tensor(
    weight: np.ndarray,
    method: str,
    rng: np.random.Generator,
    *,
    live: np.ndarray | None = None,
    preset: str = "default",
) -> np.ndarray:
    """One weight tensor shuffled by ``method`` (a new array; ``weight`` is left alone).

    ``live`` (bool, ``weight``'s shape) marks the entries that join two nodes of non-zero
    degree; the others (entries of dead units, all zero) are left as they are, so that no null
    network brings a dead unit back to life: the published code deletes zero-degree nodes
    before shuffling, and shuffling the entries among the live ones is the same null. ``None``:
    every entry is live. ``preset`` picks the kernel density's bandwidth (:func:`kde_bandwidth`).

    - ``layer``: the live entries permuted;
    - ``layer_nonzero``: the non-zero entries permuted, zeros kept in place;
    - ``layer_nonzero_distribution``: zeros kept in place, every non-zero entry drawn afresh
      from a Gaussian kernel density fitted to the non-zero values;
    - ``layer_all_distribution``: the live entries permuted (zeros move, their number is kept),
      then every non-zero entry drawn from the density of the non-zero values, as the published
      code does (``layer`` then ``layer_nonzero_distribution``): exact zeros stay exact zeros;
    - ``layer_all_distribution_dense``: every live entry, zeros included, drawn from a density
      fitted to all live values (a pruned network's null is then dense).
    """
    check_preset(preset)
    if method in ("layer_nonzero", "layer_nonzero_distribution"):
        mask = weight != 0
        values = weight[mask]
        if values.size < 2:
            raise ConfigError(
                f"the {method!r} null needs at least 2 non-zero weights per tensor, but a tensor "
                f"of shape {weight.shape} has {values.size}; use shuffle='layer' for such "
                "networks."
            )
        shuffled = weight.copy()
        if method == "layer_nonzero":
            shuffled[mask] = rng.permutation(values)
        else:
            shuffled[mask] = _kde_resample(values, values.size, rng, kde_bandwidth(values, preset))
        return shuffled
    if method not in SHUFFLE_METHODS:
        raise ConfigError(f"{method!r} is not a shuffle; choose one of {SHUFFLE_METHODS}.")
    if live is None or live.all():
        # every entry live: the same draws as the masked path below, without the masks
        flat = weight.ravel()
        if method == "layer_all_distribution_dense":
            drawn = _kde_resample(flat, flat.size, rng, kde_bandwidth(flat, preset))
            return drawn.reshape(weight.shape)
        shuffled = rng.permutation(flat).reshape(weight.shape)
        if method == "layer_all_distribution":
            _redraw_nonzero(shuffled, shuffled != 0, rng, preset)
        return shuffled
    values = weight[live]
    shuffled = weight.copy()
    if method == "layer_all_distribution_dense":
        if values.size:
            shuffled[live] = _kde_resample(values, values.size, rng, kde_bandwidth(values, preset))
        return shuffled
    shuffled[live] = rng.permutation(values)
    if method == "layer_all_distribution":
        _redraw_nonzero(shuffled, live & (shuffled != 0), rng, preset)
    return shuffled


def _redraw_nonzero(
    shuffled: np.ndarray, mask: np.ndarray, rng: np.random.Generator, preset: str
) -> None:
    """Draw the entries at ``mask`` afresh from the density of their values, in place."""
    values = shuffled[mask]
    if values.size:
        shuffled[mask] = _kde_resample(values, values.size, rng, kde_bandwidth(values, preset))


def shuffle_weights(
    weights: Sequence[np.ndarray],
    method: str,
    rng: np.random.Generator,
    *,
    live: Sequence[np.ndarray | None] | None = None,
    preset: str = "default",
) -> list[np.ndarray]:
    """Every tensor shuffled separately by ``method`` (see :func:`shuffle_tensor`); ``live``
    holds one mask (or ``None``) per tensor."""
    masks = [None] * len(weights) if live is None else list(live)
    return [
        shuffle_tensor(weight, method, rng, live=mask, preset=preset)
        for weight, mask in zip(weights, masks, strict=True)
    ]


def null_blocks(
    blocks: Sequence[EdgeBlock],
    n_nodes: int,
    method: str,
    rng: np.random.Generator,
    preset: str = "default",
    *,
    prepared: tuple[list[EdgeBlock], list[np.ndarray | None]] | None = None,
) -> list[EdgeBlock]:
    """The weight blocks of one shuffled null network.

    Zero-degree nodes stay zero-degree: only entries joining two live nodes are shuffled
    (:func:`live_masks`). Under ``preset="filan2021"`` a convolution is shuffled as its
    ``[out, in]`` matrix of channel norms (the published code shuffles the matrices that
    ``extract_cnn_weights_filters_as_units`` returns), so its null block is a ``linear`` block
    of those norms; under ``default`` its kernel entries are shuffled and the norms taken after.
    ``prepared``: what :func:`prepare_null_blocks` returned for these blocks (it is the same for
    every null network of a graph).
    """
    blocks, masks = prepared or prepare_null_blocks(blocks, n_nodes, preset)
    shuffled = shuffle_weights(
        [block.weight for block in blocks], method, rng, live=masks, preset=preset
    )
    return [replace(block, weight=weight) for block, weight in zip(blocks, shuffled, strict=True)]


def prepare_null_blocks(
    blocks: Sequence[EdgeBlock], n_nodes: int, preset: str = "default"
) -> tuple[list[EdgeBlock], list[np.ndarray | None]]:
    """The blocks a preset shuffles (under ``filan2021``, convolutions as channel-norm blocks)
    and their :func:`live_masks`."""
    if check_preset(preset) == "filan2021":
        blocks = [_as_channel_norm_block(block) for block in blocks]
    return list(blocks), live_masks(blocks, n_nodes)


def _as_channel_norm_block(block: EdgeBlock) -> EdgeBlock:
    """A convolution as the ``linear`` block of its ``[out, in]`` channel norms (a grouped one
    with zeros between groups, as the published code's ``depthwise_conv_to_conv`` makes it)."""
    if block.kind != "conv":
        return block
    return replace(block, kind="linear", weight=block.edge_weights(), groups=1, norm="l1")


def node_degrees(blocks: Sequence[EdgeBlock], n_nodes: int) -> np.ndarray:
    """Weighted degree of every node of the graph made of ``blocks`` (self-loops left out, as in
    the adjacency), shape ``[n_nodes]``."""
    degrees = np.zeros(n_nodes)
    for block in blocks:
        edges = block.edge_weights()  # [out, in]
        loops = block.dst[:, None] == block.src[None, :]
        if loops.any():
            edges = np.where(loops, 0.0, edges)
        degrees += np.bincount(block.dst, weights=edges.sum(axis=1), minlength=n_nodes)
        degrees += np.bincount(block.src, weights=edges.sum(axis=0), minlength=n_nodes)
    return degrees


def live_masks(blocks: Sequence[EdgeBlock], n_nodes: int) -> list[np.ndarray | None]:
    """For each block, the entries of its weight tensor that join two nodes of non-zero degree
    (bool, the tensor's shape), or ``None`` when all of them do.

    An entry of a dead (zero-degree) unit is zero; keeping these entries out of the shuffle is
    the published code's ``delete_isolated_ccs`` *before* shuffling: a dead input pixel stays
    dead in every null network.
    """
    active = node_degrees(blocks, n_nodes) > 0
    masks: list[np.ndarray | None] = []
    for block in blocks:
        out_live, in_live = active[block.dst], active[block.src]
        if out_live.all() and in_live.all():
            masks.append(None)
            continue
        weight = block.weight
        if block.kind == "linear":
            live = out_live[:, None] & in_live[None, :]
        elif block.kind == "flatten":
            per_channel = weight.shape[1] // len(block.src)
            live = out_live[:, None] & np.repeat(in_live, per_channel)[None, :]
        else:  # conv [out, in / groups, *kernel]: a slice is live when both its channels are
            if block.groups > 1:
                rows, cols = block._group_pattern()
                slices = out_live[rows] & in_live[cols]
            else:
                slices = out_live[:, None] & in_live[None, :]
            live = np.broadcast_to(
                slices.reshape(*slices.shape, *([1] * (weight.ndim - 2))), weight.shape
            )
        masks.append(np.ascontiguousarray(live))
    return masks


def shuffled_ncuts(
    indices: Sequence[int],
    blocks: Sequence[EdgeBlock],
    n_nodes: int,
    node_layer: np.ndarray,
    method: str,
    ks: Sequence[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str = "default",
) -> list[np.ndarray]:
    """n-cuts at every k of the shuffled null networks ``indices``: one ``[len(ks)]`` row each.

    Null network i shuffles the graph's weight blocks (:func:`null_blocks`) with the stream
    keyed ``(1, i)`` under ``root`` and is partitioned with the streams keyed ``(2, i, ...)``,
    so its numbers do not depend on which process computes it. Under ``default`` a shuffled
    network is partitioned straight from its weight blocks, without assembling a sparse
    adjacency (the same numbers as ``spectral_partitions(graph.with_weights(shuffled))`` gives,
    n-cut only); under ``filan2021`` by scikit-learn, as the observed network is. Needs no
    torch: worker processes that run it start fast.
    """
    rows = []
    prepared = prepare_null_blocks(blocks, n_nodes, preset)
    for index in indices:
        rng = np.random.default_rng(child_seed(root, 1, index))
        shuffled = null_blocks(blocks, n_nodes, method, rng, preset, prepared=prepared)
        ncuts = block_ncuts(
            shuffled,
            n_nodes,
            node_layer,
            ks,
            seed=child_seed(root, 2, index),
            n_init=n_init,
            preset=preset,
        )
        rows.append(np.array(ncuts))
    return rows


#: The shuffles that move values without drawing new ones: the same null on the magnitudes
#: ``|W|`` as on the signed weights, so they apply to graphs that keep magnitudes only.
MAGNITUDE_SHUFFLES = ("layer", "layer_nonzero")


def check_magnitude_blocks(blocks: Sequence[EdgeBlock], method: str) -> None:
    """Refuse a null model that needs signed weights on a graph that keeps magnitudes only
    (the bounded-memory reader's): a kernel density of ``|W|`` is not that of ``W``."""
    if method in MAGNITUDE_SHUFFLES or method == "random_init":
        return
    if any(block.magnitude for block in blocks):
        raise ConfigError(
            f"the {method!r} null draws new signed weights from their distribution, but this "
            "graph was read in bounded memory and keeps the magnitudes |W| only; use "
            f"shuffle={' or '.join(repr(m) for m in MAGNITUDE_SHUFFLES)} (the same null on "
            "magnitudes), or build the graph in memory with weight_graph."
        )


def check_null_backend(graph: WeightGraph, method: str, backend: str) -> None:
    """Refuse, before the partition, null networks of a graph whose weights stay on Dask
    workers (``safetensors_graph(..., scheduler=...)``) anywhere but on Dask."""
    if getattr(graph, "remote", None) is not None and (
        backend != "dask" or method not in MAGNITUDE_SHUFFLES
    ):
        raise ConfigError(
            "this graph's weights stay on Dask workers (safetensors_graph(..., scheduler=...)): "
            "measure its null networks there too, with backend='dask' and shuffle='layer' or "
            "'layer_nonzero'."
        )


def check_shuffle_preconditions(weights: Sequence[np.ndarray], method: str) -> None:
    """Fail early, with the tensor's position, where a shuffle cannot apply (a zero-size
    placeholder, a block whose weights stay on a Dask worker, is checked there)."""
    if method not in ("layer_nonzero", "layer_nonzero_distribution"):
        return
    for index, weight in enumerate(weights):
        if weight.size and np.count_nonzero(weight) < 2:
            raise ConfigError(
                f"the {method!r} null needs at least 2 non-zero weights per tensor, but weight "
                f"tensor #{index} (shape {weight.shape}) has {np.count_nonzero(weight)}; "
                "use shuffle='layer' for such networks."
            )


def _kde_resample(
    values: np.ndarray, size: int, rng: np.random.Generator, bandwidth: float
) -> np.ndarray:
    """Draw ``size`` values from a Gaussian kernel density of width ``bandwidth`` on ``values``:
    pick a data point at random, then add Gaussian noise of that width (what scikit-learn's
    ``KernelDensity(kernel="gaussian").sample`` does)."""
    centers = values[rng.integers(0, values.size, size=size)]
    return centers + rng.normal(0.0, 1.0, size=size) * bandwidth


def reinitialised_copy(
    model: torch.nn.Module, seed: int, init: str | None = None
) -> torch.nn.Module:
    """A copy of ``model`` with fresh parameters: its modules' ``reset_parameters()`` (default) or a
    named ``torch.nn.init`` scheme (see :data:`NAMED_INITS`), from torch seed ``seed``.

    BatchNorm running statistics are reset too, so a fresh network is what it would be at init.
    """
    if init is not None and init not in NAMED_INITS:
        raise ConfigError(
            f"unknown init {init!r} for random_init; choose one of {', '.join(NAMED_INITS)} "
            "or leave it unset to use each module's own reset_parameters()."
        )
    import torch

    fresh = copy.deepcopy(model)
    with _TORCH_RNG_LOCK, torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in fresh.modules():
            reset_stats: Any = getattr(module, "reset_running_stats", None)
            if callable(reset_stats):
                reset_stats()
            if init is None:
                reset: Any = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            else:
                for name, parameter in module.named_parameters(recurse=False):
                    if name == "weight" and parameter.dim() >= 2:
                        initialise: Callable[[torch.Tensor], Any] = getattr(
                            torch.nn.init, NAMED_INITS[init]
                        )
                        initialise(parameter)
    return fresh


def null_statistics(ncut: float, null_ncuts: Sequence[float] | np.ndarray, method: str) -> Baseline:
    """Compare an observed n-cut with null n-cuts (see :class:`~cluster_tracking.report.Baseline`).

    ``z = (ncut - mean) / std`` (population std; ``None`` with ``degenerate=True`` when the null has
    zero spread), one-sided ``p = (r + 1) / (n + 1)`` with ``r = #{null < ncut}``, percentile rank
    ``100 * (#{null < ncut} + #{null == ncut} / 2) / n``.
    """
    nulls = np.asarray(null_ncuts, dtype=np.float64)
    n = int(nulls.size)
    if n < 2:
        raise ConfigError(f"a null model needs at least 2 networks, got {n}.")
    mean = float(nulls.mean())
    std = float(nulls.std())
    below = int(np.count_nonzero(nulls < ncut))
    ties = int(np.count_nonzero(nulls == ncut))
    # A spread at the level of floating-point noise is no spread.
    degenerate = std <= 1e-12 * max(1.0, abs(mean))
    z_score = None if degenerate else (ncut - mean) / std
    return Baseline(
        method=method,
        n=n,
        mean=mean,
        std=std,
        z_score=z_score,
        p_value=(below + 1) / (n + 1),
        percentile=100.0 * (below + 0.5 * ties) / n,
        diff=ncut - mean,
        rel_diff=(ncut - mean) / mean if mean != 0 and math.isfinite(mean) else None,
        degenerate=degenerate,
        ncuts=[float(value) for value in nulls],
    )


def mapped_null_ncuts(
    graph: WeightGraph,
    *,
    method: str,
    n: int,
    ks: Sequence[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str,
    scheduler: Any,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """n-cuts of ``n`` shuffled null networks of a graph read from a safetensors file, each a
    Dask task that maps the weights from the same path on its worker: ``[n, len(ks)]``.

    Only the file's path and fingerprint, the blocks' topology (node indices) and each task's
    null indices and seeds travel; no weights go through the scheduler. A worker keeps the
    blocks it mapped for its next tasks and frees them when the call ends. The numbers are the
    local path's (:func:`shuffled_ncuts` on the same float32 blocks with the same streams).
    ``scheduler``: an address or a ``distributed.Client`` (``None``: the remote graph's own,
    else the current client).

    Raises:
        ConfigError: no Dask, no scheduler, or a graph that does not know its file.
        GraphError: a worker's memory limit is below the estimated peak of a task.
    """
    from cluster_tracking.graph.mapped import forget_mapped
    from cluster_tracking.parallel.dask import dask_client, running_workers
    from cluster_tracking.resources.estimate import check_workers_fit, estimate_null_task

    source = getattr(graph, "source", None)
    if source is None:
        raise ConfigError(
            "this graph does not come from a safetensors file (safetensors_graph), so Dask "
            "workers cannot map its weights from a shared path."
        )
    remote = getattr(graph, "remote", None)
    if scheduler is None and remote is not None:
        scheduler = remote.client
    if scheduler is None:
        try:
            from distributed import get_client

            scheduler = get_client()
        except (ImportError, ValueError) as error:
            raise ConfigError(
                "null networks on Dask need a scheduler: pass scheduler='tcp://HOST:PORT' (or "
                "run inside a dask.distributed Client)."
            ) from error
    client, owned = dask_client(scheduler)
    try:
        workers = running_workers(client)
        edges = sum(int(np.prod(tensor.shape, dtype=np.int64)) for tensor in source.tensors)
        held = remote.held if remote is not None and not remote.closed else {}
        check_workers_fit(
            {
                worker: (
                    estimate_null_task(
                        graph.n_nodes, edges, k=max(ks), threads=int(info.get("nthreads") or 1)
                    )
                    + held.get(worker, 0),  # the blocks it keeps for the observed graph
                    int(info.get("memory_limit") or 0),
                )
                for worker, info in workers.items()
            },
            source.path,
            task="null networks (the whole graph, a shuffled copy and the solver per thread)",
        )
        skeleton = [replace(block, weight=_NO_WEIGHT) for block in graph.blocks]
        [shared] = client.scatter(
            [(source, skeleton, graph.n_nodes, graph.node_layer)], broadcast=True
        )
        size = max(1, min(2, math.ceil(n / (4 * len(workers)))))
        chunks = [list(range(start, min(n, start + size))) for start in range(0, n, size)]
        futures = [
            client.submit(
                _mapped_null_task, shared, chunk, method, list(ks), root, n_init, preset, pure=False
            )
            for chunk in chunks
        ]
        position = {future.key: i for i, future in enumerate(futures)}
        rows: dict[int, list[np.ndarray]] = {}
        try:
            from distributed import as_completed

            done = 0
            with client.as_current():  # (as_completed asks for the current client)
                for future in as_completed(futures):
                    rows[position[future.key]] = future.result()
                    done += len(chunks[position[future.key]])
                    if progress is not None:
                        progress(done, n)
        finally:
            client.cancel(futures)
            # the workers free the blocks they mapped (a worker that is gone has nothing to free)
            client.run(forget_mapped, source.key, on_error="ignore")
        return np.stack([row for i in range(len(chunks)) for row in rows[i]])
    finally:
        if owned:
            client.close()


_NO_WEIGHT = np.empty(0, dtype=np.float32)


def _mapped_null_task(
    shared: tuple[Any, list[EdgeBlock], int, np.ndarray],
    indices: list[int],
    method: str,
    ks: list[int],
    root: np.random.SeedSequence,
    n_init: int | None,
    preset: str,
) -> list[np.ndarray]:
    """On a Dask worker: :func:`shuffled_ncuts` of the null networks ``indices`` on the blocks
    mapped from the file (:func:`~cluster_tracking.graph.mapped.mapped_blocks`)."""
    from threadpoolctl import threadpool_limits

    from cluster_tracking.graph.mapped import mapped_blocks

    source, skeleton, n_nodes, node_layer = shared
    blocks = mapped_blocks(source, skeleton)
    with threadpool_limits(1):
        return shuffled_ncuts(
            indices, blocks, n_nodes, node_layer, method, ks, root, n_init, preset
        )
