"""Clusterable initialisation (Filan et al. 2021, "Promoting clusterability").

Start training from a network that is already modular: assign every neuron (every channel, for a
convolution) to one of ``m`` modules at random, then scale each weight by ::

    up = 1 + (1 - d) (m - 1)     if the two neurons it joins are in the same module,
    d                            otherwise,

with ``0 <= d <= 1`` the down-weighting. A weight joins two neurons of the same module with
probability ``1 / m``, so its expected factor is ``up / m + d (m - 1) / m = 1``: the expected
magnitude of every weight, and so the scale that the model's own initialisation chose, is
unchanged, while the weight graph gets ``m`` dense modules joined by weaker edges.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph import EdgeBlock, WeightGraph, layer_weight, weight_graph
from cluster_tracking.graph.weights import unwrap_module


def clusterable_init_(
    model: nn.Module,
    modules: int = 10,
    down_weight: float = 0.6,
    seed: int | None = None,
    *,
    layers: Sequence[str] | None = None,
) -> nn.Module:
    """Scale a model's weights, in place, so that they form ``modules`` random modules.

    Call it after the model's own initialisation (the weights are scaled, not redrawn). Each node
    of the model's weight graph (:func:`~cluster_tracking.graph.weight_graph`: every input unit,
    hidden unit and output unit; every channel of a convolution) is assigned to one of ``m =
    modules`` modules uniformly at random (:func:`module_assignment`; the output units each to a
    module of their own when there are at most ``m`` of them). Every weight entry is then
    multiplied by ``up = 1 + (1 - d)(m - 1)`` if the two nodes it joins are in the same module
    and by ``d = down_weight`` otherwise, which keeps each weight's expected magnitude (see the
    module docstring):

    * Linear ``W[j, i]`` joins output node j and input node i;
    * conv ``W[b, a, ...]`` (all kernel positions) joins output channel b and input channel
      ``g * (C_in / groups) + a`` for b in group g;
    * a Linear reading a flattened ``[C, *spatial]`` map, ``W[j, i]`` joins output node j and
      channel ``i // S`` (S flattened positions per channel).

    Biases, BatchNorm parameters and layers the weight graph does not contain are left alone. A
    module called several times (shared weights) is scaled once, by its first call's nodes.

    Args:
        model: the network, already initialised (``DataParallel``/``torch.compile`` wrappers are
            unwrapped).
        modules: number of modules ``m`` (>= 1; 1 leaves the weights unchanged).
        down_weight: the factor ``d`` of weights between modules, in ``[0, 1]``; 1 leaves the
            weights unchanged, 0 disconnects the modules.
        seed: seed of the module assignment; the same seed gives the same scaling.
        layers: as for :func:`~cluster_tracking.graph.weight_graph`, for models that
            ``torch.fx`` cannot trace.

    Returns:
        The model (modified in place).

    Raises:
        ConfigError: ``modules`` or ``down_weight`` out of range.
        GraphError: the model cannot become a weight graph.
    """
    modules, down_weight = _check_modules(modules), _check_down_weight(down_weight)
    model = unwrap_module(model)
    graph = weight_graph(model, layers=layers)
    labels = module_assignment(graph, modules, seed=seed)
    up = 1.0 + (1.0 - down_weight) * (modules - 1)
    done: set[int] = set()
    with torch.no_grad():
        for block in graph.blocks:
            weight = layer_weight(model, block)
            if id(weight) in done:
                continue
            done.add(id(weight))
            same = _same_module(block, labels)  # [out, in] or [out, in / groups]
            factor = np.where(same, up, down_weight)
            factor = factor.reshape(factor.shape + (1,) * (weight.ndim - factor.ndim))
            weight.mul_(torch.as_tensor(factor, dtype=weight.dtype, device=weight.device))
    return model


def module_assignment(
    graph: WeightGraph | nn.Module, modules: int = 10, seed: int | None = None
) -> np.ndarray:
    """The random module of every node that :func:`clusterable_init_` uses, in node order.

    Each node gets a module drawn uniformly from ``0 .. modules - 1``; then, if the output units
    (nodes no weight reads from) number at most ``modules``, they get distinct modules, drawn at
    random without replacement. With the same graph topology, ``modules`` and ``seed``, the result
    is the same as in :func:`clusterable_init_`, so ``ncut(graph, module_assignment(...))``
    measures how well the initialised network splits along its planted modules.

    Args:
        graph: a :class:`~cluster_tracking.graph.WeightGraph`, or a model to build one from.
        modules: number of modules.
        seed: seed of the draw.

    Returns:
        Integer labels, shape ``[n_nodes]``.
    """
    modules = _check_modules(modules)
    if isinstance(graph, nn.Module):
        graph = weight_graph(graph)
    if not isinstance(graph, WeightGraph):
        raise GraphError(
            f"module_assignment takes a WeightGraph or an nn.Module, got {type(graph).__name__}."
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ConfigError(f"seed must be an integer or None, got {seed!r}.")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, modules, size=graph.n_nodes)
    read = np.zeros(graph.n_nodes, dtype=bool)
    for block in graph.blocks:
        read[block.src] = True
    outputs = np.flatnonzero(~read)
    if 0 < len(outputs) <= modules:
        labels[outputs] = rng.permutation(modules)[: len(outputs)]
    return labels.astype(np.int64)


def _same_module(block: EdgeBlock, labels: np.ndarray) -> np.ndarray:
    """Whether each weight entry (kernel positions aside) joins two nodes of one module."""
    dst_module = labels[block.dst][:, None]  # [out, 1]
    if block.kind == "linear":
        src_module = labels[block.src][None, :]  # W[j, i] joins dst[j] and src[i]
    elif block.kind == "flatten":
        spatial = block.weight.shape[1] // len(block.src)
        src_module = np.repeat(labels[block.src], spatial)[None, :]  # src[i // S]
    elif block.groups == 1:
        src_module = labels[block.src][None, :]  # W[b, a, ...] joins dst[b] and src[a]
    else:
        _, cols = block.group_pattern()  # W[b, a, ...] joins dst[b], src[g(b) * in/G + a]
        src_module = labels[block.src][cols]
    return dst_module == src_module


def _check_modules(modules: object) -> int:
    if isinstance(modules, bool) or not isinstance(modules, (int, np.integer)) or modules < 1:
        raise ConfigError(f"modules must be an integer >= 1, got {modules!r}; e.g. modules=10.")
    return int(modules)


def _check_down_weight(down_weight: object) -> float:
    if (
        isinstance(down_weight, bool)
        or not isinstance(down_weight, (int, float, np.floating, np.integer))
        or not 0.0 <= float(down_weight) <= 1.0
    ):
        raise ConfigError(
            f"down_weight must be a number in [0, 1] (the factor of weights between modules; "
            f"1 changes nothing), got {down_weight!r}."
        )
    return float(down_weight)
