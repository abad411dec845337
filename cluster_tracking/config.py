"""The settings of a measurement, validated once where they enter: :class:`MeasureConfig`.

Every option of :func:`~cluster_tracking.measure.measure` that can be checked without the model
is checked here, with the message that says what was wrong and what to pass instead; the stages
below (the partition, the null models, their dispatch to workers) read a valid
:class:`MeasureConfig` and check nothing again. The names of the null models and presets live here
too, so that every layer of the package (and the CLI's choices) shares one list.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from cluster_tracking.errors import ConfigError

#: The shuffle null models (Filan et al. 2021, §3; see :mod:`cluster_tracking.nulls`).
SHUFFLE_METHODS = (
    "layer",
    "layer_nonzero",
    "layer_nonzero_distribution",
    "layer_all_distribution",
    "layer_all_distribution_dense",
)
#: Every null model: the shuffles and the re-initialised network.
NULL_METHODS = (*SHUFFLE_METHODS, "random_init")
#: The procedures: this package's (``default``) and the published one (``filan2021``).
PRESETS = ("default", "filan2021")
#: Dask workers assumed for ``backend="dask"`` when ``n_jobs`` does not say.
DASK_DEFAULT_JOBS = 8


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


def check_shuffles(shuffles: int) -> int:
    """Validate a number of null networks: 0 (no null model) or at least 2."""
    if isinstance(shuffles, bool) or not isinstance(shuffles, (int, np.integer)):
        raise ConfigError(f"shuffles must be an integer, got {shuffles!r}.")
    if shuffles == 1 or shuffles < 0:
        raise ConfigError(
            f"shuffles={shuffles}: a null model needs at least 2 networks to have a spread "
            "(the paper uses 50-100); pass shuffles=0 to skip it."
        )
    return int(shuffles)


def resolve_seed(seed: int | None) -> int:
    """A valid seed: ``seed`` itself, or a fresh random one for ``None``."""
    if seed is None:
        return secrets.randbits(32)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer or None, got {seed!r}.")
    return int(seed)


def check_k(k: int | Sequence[int] | str) -> int | tuple[int, ...] | Literal["auto"]:
    """Validate the form of ``k``: an integer, a list of distinct integers, or ``"auto"``.

    The range of each k (at least 2, below the number of nodes) depends on the graph and is
    checked by the partition.
    """
    if isinstance(k, str):
        if k != "auto":
            raise ConfigError(f"k must be an integer, a list of integers or 'auto', got {k!r}.")
        return "auto"
    if isinstance(k, (list, tuple)):
        if not k:
            raise ConfigError("k is an empty list; give at least one number of clusters.")
        if len(set(k)) != len(k):
            raise ConfigError(f"k lists a value twice: {list(k)}.")
        return tuple(int(value) for value in k)
    return k  # type: ignore[return-value]  # an integer's range is checked by the partition


@dataclass(frozen=True)
class MeasureConfig:
    """The validated settings of one :func:`~cluster_tracking.measure.measure` call.

    Built from ``measure``'s keyword arguments (same names: ``shuffle`` is the null model,
    ``n_jobs`` the workers); construction raises :class:`~cluster_tracking.errors.ConfigError`
    for a bad value and resolves ``seed=None`` to a fresh random seed, so that a config always
    says which seed its numbers came from.

    Attributes:
        k: number of clusters, a tuple of them (a sweep: one report each), or ``"auto"``.
        shuffles: number of null networks (0: no null model, else at least 2).
        shuffle: the null model, one of :data:`NULL_METHODS`.
        seed: seed of every random draw.
        n_init: k-means restarts per partition (``None``: the preset's own).
        n_jobs: processes (or threads) measuring the null networks, this one included
            (-1 = all cores; ``None`` = 1, sequential).
        backend: joblib backend for the null networks: ``loky`` (this package's own worker
            processes kept alive between calls for the shuffles, fed through pipes, while this
            process works too; joblib's loky for ``random_init``), ``threading`` (no new
            processes; the GIL limits the gain), ``multiprocessing`` or ``dask``.
        scheduler: address of a Dask scheduler, with ``backend="dask"`` (e.g.
            ``"tcp://127.0.0.1:8786"``); without it the current Dask client is used.
        norm: kernel-slice norm for convolutions (``l1`` or ``l2``).
        preset: the procedure, one of :data:`PRESETS`. ``default``: this package's clustering
            (the restart of lowest n-cut kept) and null models. ``filan2021``: the published
            procedure of Filan et al. (2021), so that numbers and z-scores can be set beside the
            paper's: scikit-learn's ``SpectralClustering`` (ARPACK, k-means to convergence,
            lowest inertia), the paper's null models (convolutions shuffled as channel-norm
            matrices, kernel density bandwidth 0.01) and graph (conv-to-conv edges, induced
            "L1" norm).
        layers: names (or ``|``-separated glob patterns) of the Linear/Conv modules that make
            the graph; ``None``: every one the graph extraction follows.
        init: for ``random_init``: a named ``torch.nn.init`` scheme instead of
            ``reset_parameters()``.
        example_inputs, include_embeddings: as for :func:`~cluster_tracking.graph.weight_graph`.
    """

    k: int | Sequence[int] | Literal["auto"] = 12  # a list becomes a tuple
    shuffles: int = 50
    shuffle: str = "layer"
    seed: int | None = None
    n_init: int | None = None
    n_jobs: int | None = -1
    backend: str | None = None
    scheduler: str | None = None
    norm: Literal["l1", "l2"] = "l1"
    preset: Literal["default", "filan2021"] = "default"
    layers: str | Sequence[str] | None = None  # a list becomes a tuple
    init: str | None = None
    example_inputs: Any = field(default=None, compare=False)
    include_embeddings: bool = False

    def __post_init__(self) -> None:
        check_method(self.shuffle)
        check_preset(self.preset)
        shuffles = check_shuffles(self.shuffles)
        seed = resolve_seed(self.seed)
        k = check_k(self.k)
        layers = self.layers
        if layers is not None and not isinstance(layers, str):
            layers = tuple(layers) or None
        if shuffles and self.scheduler is not None and self.backend != "dask":
            raise ConfigError("scheduler is only used with backend='dask'.")
        for name, value in (("shuffles", shuffles), ("seed", seed), ("k", k), ("layers", layers)):
            object.__setattr__(self, name, value)

    @property
    def method(self) -> str:
        """The null model (``shuffle``), by the name the report's config and baseline use."""
        return self.shuffle

    @property
    def resolved_backend(self) -> str:
        """The joblib backend the null networks use (``loky`` when none was named)."""
        return self.backend or "loky"

    @property
    def sweep(self) -> bool:
        """Whether ``k`` is a list of k (``measure`` then returns one report per k)."""
        return isinstance(self.k, tuple)

    @property
    def jobs(self) -> int:
        """The number of workers measuring the null networks, this process included: ``n_jobs``
        resolved against the cores (-1: all of them), or the Dask default."""
        n_jobs = self.n_jobs
        if self.backend == "dask":
            return n_jobs if n_jobs and n_jobs > 0 else DASK_DEFAULT_JOBS
        cores = os.cpu_count() or 1
        if n_jobs is None or n_jobs == 0:
            return 1
        if n_jobs < 0:
            return max(1, cores + 1 + n_jobs)
        return int(n_jobs)

    @property
    def uses_worker_processes(self) -> bool:
        """Whether the shuffle nulls run on this process and this package's worker processes
        (:mod:`cluster_tracking.nulls.local_workers`)."""
        return self.shuffle != "random_init" and self.resolved_backend == "loky" and self.jobs > 1

    def graph_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~cluster_tracking.graph.weight_graph` (and of each
        re-initialised null network's graph)."""
        options: dict[str, Any] = {
            "norm": self.norm,
            "preset": self.preset,
            "layers": self.layers_list(),
        }
        if self.example_inputs is not None:
            options["example_inputs"] = self.example_inputs
        if self.include_embeddings:
            options["include_embeddings"] = True
        return options

    def layers_list(self) -> str | list[str] | None:
        """``layers`` as the report's config records it (a list, or one pattern string)."""
        if self.layers is None or isinstance(self.layers, str):
            return self.layers
        return list(self.layers)
