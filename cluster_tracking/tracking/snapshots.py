"""Snapshots: the weights of one due step, copied to the CPU in the training thread.

Taking a snapshot is the only work the tracker does in the training thread. A model whose graph
needs ``torch.fx`` tracing (no ``layers=``) is traced here, once: tracing patches
``torch.nn.Module.__call__`` for the whole process while it runs, so tracing in the background
would break the training thread's forward passes. At later due steps, while the model's
parameter shapes are unchanged, only its weights are copied
(:func:`~cluster_tracking.graph.live_weights`) and the graph is rebuilt in the background from
the traced topology. With ``layers=`` the same, except that the first graph is built from the
named layers, without tracing. The graph is never built in a thread of this process while
training runs: assembling it holds the GIL, which the training thread needs at every torch call
(a loop ran 1.8x slower). A state_dict, and a model measured with the ``random_init`` null (which
needs a copy of the module to re-initialise), are copied to the CPU here and turned into a graph
in the background.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import ConfigError, GraphError, describe, warn
from cluster_tracking.graph import WeightGraph, live_weights, weight_topology


@dataclass(eq=False)  # compared by identity (a waiting snapshot is replaced by identity)
class Snapshot:
    """The weights of one due step, on the CPU, waiting for the worker: one of

    * ``graph``: the weight graph itself, built in the training thread at the first due step;
    * ``graph`` and ``weights``: at later due steps, that graph's topology and the weights read
      again from the model, to combine in the background;
    * ``module`` and ``state``: the tracker's CPU copy of the model's structure and the weights
      to load into it (``state`` is ``None`` when the copy was just made and holds them);
    * ``state`` alone: a state_dict, measured as a chain of layers.
    """

    step: int
    graph: WeightGraph | None = None
    module: nn.Module | None = None
    state: dict[str, Any] | None = None
    graph_seconds: float = 0.0
    weights: list[np.ndarray] | None = None
    explicit: bool = False  # a checkpoint(): never replaced by a newer due step
    plots: bool = True  # draw this step's plots (the tracker thins them while behind)

    def release(self) -> None:
        """Drop the copied weights (once measured), so that memory does not wait for GC."""
        self.state = self.graph = self.module = self.weights = None


class Snapshotter:
    """Takes the snapshots of one tracker and keeps what later snapshots reuse: the traced
    topology (no adjacency) and the parameter shapes it was traced with, or the CPU copy of the
    model's structure (``random_init``), and a model the graph cannot follow (not traced again
    while its parameters stay the same).

    Args:
        shuffle: the tracker's null model (``random_init`` needs a copy of the module).
        graph_options: keyword arguments of :func:`~cluster_tracking.graph.weight_topology`.
    """

    def __init__(self, shuffle: str, graph_options: Mapping[str, Any]) -> None:
        self.shuffle = shuffle
        self.graph_options = dict(graph_options)
        self._template: nn.Module | None = None
        self._template_signature: dict[str, Any] | None = None
        self._structure_copy_failed = False
        self._topology: WeightGraph | None = None
        self._traced_signature: tuple[Any, ...] | None = None
        self._untraceable: tuple[tuple[Any, ...], str] | None = None

    def take(self, model: nn.Module | Mapping[str, Any], step: int) -> Snapshot:
        """Copy the weights of ``model`` (a module, or a state_dict) at ``step`` to the CPU.

        Raises:
            GraphError: the model's graph cannot be followed (said again at once, untraced,
                while its parameters stay the same).
            ConfigError: ``model`` is neither a module nor a state_dict.
        """
        with torch.no_grad():
            if isinstance(model, Mapping):
                return Snapshot(step, state={key: cpu_copy(v) for key, v in model.items()})
            if not isinstance(model, nn.Module):
                raise ConfigError(
                    f"expected a torch.nn.Module or a state_dict, got {type(model).__name__}."
                )
            module = unwrap(model)
            if self.shuffle != "random_init":
                return self._traced(module, step)
            return self._copied(module, step)

    def clear(self) -> None:
        """Forget the topology and the structure copy (the tracker is closed)."""
        self._template = None
        self._topology = None

    def _traced(self, module: nn.Module, step: int) -> Snapshot:
        """The topology traced once (again when the shapes change) and the weights of now."""
        started = time.perf_counter()
        shapes = (id(module), *((n, p.shape) for n, p in module.named_parameters()))
        if self._topology is not None and shapes == self._traced_signature:
            try:
                weights = live_weights(module, self._topology)
            except GraphError:
                pass  # the model changed under its graph: trace it again
            else:
                return Snapshot(
                    step,
                    graph=self._topology,
                    weights=weights,
                    graph_seconds=time.perf_counter() - started,
                )
        if self._untraceable is not None and self._untraceable[0] == shapes:
            raise GraphError(self._untraceable[1])
        # the adjacency is assembled in the background, as at later steps
        try:
            self._topology = weight_topology(module, **self.graph_options)
        except GraphError as error:
            self._untraceable = (shapes, str(error))
            raise
        self._traced_signature = shapes
        return Snapshot(
            step,
            graph=self._topology,
            weights=[block.weight for block in self._topology.blocks],
            graph_seconds=time.perf_counter() - started,
        )

    def _copied(self, module: nn.Module, step: int) -> Snapshot:
        """A CPU copy of the module's structure (made once per shape) and its weights of now."""
        state = module.state_dict()
        signature = {
            name: (tuple(value.shape), value.dtype)
            for name, value in state.items()
            if isinstance(value, torch.Tensor)
        }
        if self._template is not None and signature == self._template_signature:
            copied = {key: cpu_copy(value) for key, value in state.items()}
            return Snapshot(step, module=self._template, state=copied)
        if not self._structure_copy_failed:
            try:
                template = structure_copy(module)
            except Exception as error:
                self._structure_copy_failed = True
                warn(
                    f"cannot copy the structure of {type(module).__name__} "
                    f"({describe(error)}); clusterability is measured from its state_dict "
                    "instead.",
                    stacklevel=4,  # attributed as before the split: the request
                )
            else:
                # New structure (first due step, or the shapes changed): the copy already
                # holds this step's weights; later steps load theirs into it.
                self._template, self._template_signature = template, signature
                return Snapshot(step, module=template)
        return Snapshot(step, state={key: cpu_copy(v) for key, v in state.items()})


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel/DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def cpu_copy(value: Any) -> Any:
    """A detached CPU copy of a tensor (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


def structure_copy(module: nn.Module) -> nn.Module:
    """A CPU deep copy of ``module`` without copying its tensors on their device first.

    The memo of :func:`copy.deepcopy` is pre-filled with CPU copies of every parameter and buffer,
    so a model on a GPU is never duplicated on the GPU; the original is not touched.
    """
    memo: dict[int, Any] = {}
    for parameter in module.parameters():
        memo[id(parameter)] = nn.Parameter(cpu_copy(parameter), requires_grad=False)
    for buffer in module.buffers():
        memo[id(buffer)] = cpu_copy(buffer)
    return copy.deepcopy(module, memo)
