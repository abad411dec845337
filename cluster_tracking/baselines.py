"""Null models: networks with the same weights but none of the structure (Filan et al. 2021, §3).

An observed n-cut means little alone: a network's widths and weight distribution already set what
n-cut spectral clustering can reach. The paper compares it with the n-cuts of *shuffled* networks,
each weight tensor shuffled separately:

- ``layer``: permute all entries of the tensor (keeps the multiset of values);
- ``layer_nonzero``: permute only the non-zero entries, keeping the sparsity mask (the honest null
  for pruned networks);
- ``layer_nonzero_distribution``: keep the mask, draw new non-zero values from a Gaussian kernel
  density fitted to the tensor's non-zero values;
- ``layer_all_distribution``: draw every entry from a Gaussian kernel density fitted to all values;

and with ``random_init``: the same architecture freshly initialised by its modules' own
``reset_parameters()`` (or a named ``torch.nn.init`` scheme).

The statistics (:func:`null_statistics`): ``z = (ncut - mean) / std`` with the population std, the
one-sided ``p = (r + 1) / (n + 1)`` with ``r`` the number of null n-cuts strictly below the observed
one, and the percentile rank.
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
from cluster_tracking.graph.types import EdgeBlock
from cluster_tracking.report import Baseline
from cluster_tracking.spectral import block_ncuts, child_seed

if TYPE_CHECKING:
    import torch

SHUFFLE_METHODS = (
    "layer",
    "layer_nonzero",
    "layer_nonzero_distribution",
    "layer_all_distribution",
)
NULL_METHODS = (*SHUFFLE_METHODS, "random_init")

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


def shuffle_tensor(weight: np.ndarray, method: str, rng: np.random.Generator) -> np.ndarray:
    """One weight tensor shuffled by ``method`` (a new array; ``weight`` is left alone)."""
    if method == "layer":
        return rng.permutation(weight.ravel()).reshape(weight.shape)
    if method == "layer_all_distribution":
        return _kde_resample(weight.ravel(), weight.size, rng).reshape(weight.shape)
    mask = weight != 0
    values = weight[mask]
    if values.size < 2:
        raise ConfigError(
            f"the {method!r} null needs at least 2 non-zero weights per tensor, but a tensor of "
            f"shape {weight.shape} has {values.size}; use shuffle='layer' for such networks."
        )
    shuffled = np.zeros_like(weight)
    if method == "layer_nonzero":
        shuffled[mask] = rng.permutation(values)
    elif method == "layer_nonzero_distribution":
        shuffled[mask] = _kde_resample(values, values.size, rng)
    else:
        raise ConfigError(f"{method!r} is not a shuffle; choose one of {SHUFFLE_METHODS}.")
    return shuffled


def shuffle_weights(
    weights: Sequence[np.ndarray], method: str, rng: np.random.Generator
) -> list[np.ndarray]:
    """Every tensor shuffled separately by ``method`` (see the module docstring)."""
    return [shuffle_tensor(weight, method, rng) for weight in weights]


def shuffled_ncuts(
    indices: Sequence[int],
    blocks: Sequence[EdgeBlock],
    n_nodes: int,
    node_layer: np.ndarray,
    method: str,
    ks: Sequence[int],
    root: np.random.SeedSequence,
    n_init: int,
) -> list[np.ndarray]:
    """n-cuts at every k of the shuffled null networks ``indices``: one ``[len(ks)]`` row each.

    Null network i shuffles the graph's weight blocks with the stream keyed ``(1, i)`` under
    ``root`` and is partitioned with the streams keyed ``(2, i, ...)``, so its numbers do not
    depend on which process computes it. A shuffled network keeps the graph's topology, so it is
    partitioned straight from its weight blocks, without assembling a sparse adjacency (the same
    numbers as ``spectral_partitions(graph.with_weights(shuffled))`` gives, n-cut only). Needs no
    torch: worker processes that run it start fast.
    """
    rows = []
    weights = [block.weight for block in blocks]
    for index in indices:
        rng = np.random.default_rng(child_seed(root, 1, index))
        shuffled = shuffle_weights(weights, method, rng)
        null_blocks = [
            replace(block, weight=weight) for block, weight in zip(blocks, shuffled, strict=True)
        ]
        ncuts = block_ncuts(
            null_blocks, n_nodes, node_layer, ks, seed=child_seed(root, 2, index), n_init=n_init
        )
        rows.append(np.array(ncuts))
    return rows


def check_shuffle_preconditions(weights: Sequence[np.ndarray], method: str) -> None:
    """Fail early, with the tensor's position, where a shuffle cannot apply."""
    if method not in ("layer_nonzero", "layer_nonzero_distribution"):
        return
    for index, weight in enumerate(weights):
        if np.count_nonzero(weight) < 2:
            raise ConfigError(
                f"the {method!r} null needs at least 2 non-zero weights per tensor, but weight "
                f"tensor #{index} (shape {weight.shape}) has {np.count_nonzero(weight)}; "
                "use shuffle='layer' for such networks."
            )


def _kde_resample(values: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``size`` values from a Gaussian kernel density fitted to ``values``.

    Bandwidth by Scott's rule, ``std * n^(-1/5)`` (scipy's ``gaussian_kde`` default in 1-D):
    pick a data point at random, then add Gaussian noise of that width.
    """
    bandwidth = float(np.std(values)) * values.size ** (-1.0 / 5.0)
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
