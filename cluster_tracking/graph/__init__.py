"""Weight graphs: a network's neurons as nodes, its weight magnitudes as edges.

Filan et al. (2021), section 2. One idea per module:

- :mod:`~cluster_tracking.graph.types`: the graph as data (:class:`WeightGraph`,
  :class:`EdgeBlock`), numpy and scipy only, so worker processes import no torch;
- :mod:`~cluster_tracking.graph.build`: the provisional graph the readers fill in
  (:mod:`~cluster_tracking.graph.features`: the values the tracers carry), and
  :mod:`~cluster_tracking.graph.numbering`: the public node numbering;
- :mod:`~cluster_tracking.graph.fx_trace`: following a model's data flow with ``torch.fx``;
- :mod:`~cluster_tracking.graph.export`: following it with ``torch.export`` and tensor shapes
  (transformers, channels-last blocks, reshapes that move the channel axis); its rules by concept
  in ``export_base``, ``export_elementwise``, ``export_movement`` and ``export_layers``, the unit
  maps in ``export_units``, and :mod:`~cluster_tracking.graph.example_inputs`;
- :mod:`~cluster_tracking.graph.chain`: chains of named layers and bare state_dicts;
- :mod:`~cluster_tracking.graph.weights`: reading weights (and reading them again at later steps);
- :mod:`~cluster_tracking.graph.edges`: the graph as edge pieces, its block-by-block linear
  algebra (products, degrees, within-cluster weights), numpy and scipy only;
- :mod:`~cluster_tracking.graph.lazy`: a chain of layers read from a safetensors file in bounded
  memory; :mod:`~cluster_tracking.graph.mapped` reads its weights through a memory map (what a Dask
  worker imports, no torch); :mod:`~cluster_tracking.graph.remote` and
  :mod:`~cluster_tracking.graph.remote_graph` keep its weight blocks on a Dask cluster;
- :mod:`~cluster_tracking.graph.model_folder`: a Hugging Face model folder's graph (residual
  stream, attention, MLPs) traced on the meta device and read in bounded memory;
- :mod:`~cluster_tracking.graph.api`: :func:`weight_graph`, which picks the route.

The torch-free types are imported here directly; the rest on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cluster_tracking.graph.types import (
    EdgeBlock,
    WeightGraph,
    WeightSource,
    assemble_adjacency,
)

if TYPE_CHECKING:
    from cluster_tracking.graph.api import weight_graph, weight_topology
    from cluster_tracking.graph.selection import select_layers
    from cluster_tracking.graph.weights import layer_weight, live_weights

__all__ = [
    "EdgeBlock",
    "WeightGraph",
    "WeightSource",
    "assemble_adjacency",
    "layer_weight",
    "live_weights",
    "select_layers",
    "weight_graph",
    "weight_topology",
]

_LAZY = {
    "weight_graph": "cluster_tracking.graph.api",
    "weight_topology": "cluster_tracking.graph.api",
    "layer_weight": "cluster_tracking.graph.weights",
    "live_weights": "cluster_tracking.graph.weights",
    "select_layers": "cluster_tracking.graph.selection",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cluster_tracking.graph' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
