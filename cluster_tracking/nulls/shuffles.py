"""Shuffled weight tensors: the shuffle null models, one tensor at a time (Filan et al. 2021, §3).

Each weight tensor of a network is shuffled separately (:func:`shuffle_tensor`):

- ``layer``: permute the tensor's live entries (keeps the multiset of values);
- ``layer_nonzero``: permute only the non-zero entries, keeping the sparsity mask (the honest null
  for pruned networks);
- ``layer_nonzero_distribution``: keep the mask, draw new non-zero values from a Gaussian kernel
  density fitted to the tensor's non-zero values;
- ``layer_all_distribution``: permute the live entries, then draw every non-zero one from that
  density (the published code's ``layer`` then ``layer_nonzero_distribution``): exact zeros stay
  zero, in moved places;
- ``layer_all_distribution_dense`` (opt-in): draw every live entry, zeros included, from a density
  fitted to all of them.

Under ``preset="filan2021"`` the kernel density has the fixed bandwidth 0.01
(:func:`kde_bandwidth`), as published.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cluster_tracking.config import SHUFFLE_METHODS, check_preset
from cluster_tracking.errors import ConfigError

#: The kernel density bandwidth of the ``filan2021`` preset: the published code's
#: ``KernelDensity(kernel="gaussian", bandwidth=0.01)``, in the weights' own units.
FILAN2021_BANDWIDTH = 0.01


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


def _kde_resample(
    values: np.ndarray, size: int, rng: np.random.Generator, bandwidth: float
) -> np.ndarray:
    """Draw ``size`` values from a Gaussian kernel density of width ``bandwidth`` on ``values``:
    pick a data point at random, then add Gaussian noise of that width (what scikit-learn's
    ``KernelDensity(kernel="gaussian").sample`` does)."""
    centers = values[rng.integers(0, values.size, size=size)]
    return centers + rng.normal(0.0, 1.0, size=size) * bandwidth
