"""The graph read from a safetensors file (:class:`SafetensorsGraph`): a weight graph that
knows where its weights lie, and how a chain of layers read from the file becomes one. The
reader (:mod:`cluster_tracking.graph.lazy`) and the Dask path
(:mod:`cluster_tracking.graph.remote_graph`) both build their graphs here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster_tracking.errors import GraphError
from cluster_tracking.graph.mapped import MappedSource
from cluster_tracking.graph.selection import parse_layers
from cluster_tracking.graph.types import Preset, WeightGraph

if TYPE_CHECKING:
    from cluster_tracking.graph.remote import RemoteBlocks

#: ``stage(name, done, total)``: progress of a long read (``"reading"``, ...).
StageCallback = Callable[[str, int, int], None]


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
    remote: RemoteBlocks | None = field(default=None, compare=False, repr=False)

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


def _finish_chain(entries: list[Any], layers: Any, preset: Preset, path: Path) -> WeightGraph:
    from cluster_tracking.graph.build import _Builder
    from cluster_tracking.graph.chain import _build_chain

    builder = _Builder("l1")
    _build_chain(builder, entries, strict=parse_layers(layers) is not None)
    for spec in builder.specs:
        spec.magnitude = True
    return builder.finish(preset, str(path), assemble=False)


def _as_safetensors_graph(
    graph: WeightGraph, source: MappedSource | None, remote: RemoteBlocks | None
) -> SafetensorsGraph:
    values = {f.name: getattr(graph, f.name) for f in fields(WeightGraph)}
    return SafetensorsGraph(**values, source=source, remote=remote)
