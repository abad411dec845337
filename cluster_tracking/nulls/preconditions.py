"""Where a null model applies: checks made before the partition, so that a null network that
cannot be made fails in one clear line before any time is spent."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.types import EdgeBlock, WeightGraph

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
