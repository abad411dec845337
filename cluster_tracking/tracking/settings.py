"""The tracker's settings, checked once where they enter (before training starts).

:class:`TrackerSettings` holds what a
:class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker` was given, validated with a
:class:`~cluster_tracking.errors.ConfigError` that names the value seen and the fix;
:meth:`TrackerSettings.params` is what the tracker logs once to every sink.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from cluster_tracking.config import MeasureConfig
from cluster_tracking.errors import ConfigError
from cluster_tracking.graph.selection import parse_layers
from cluster_tracking.tracking.sinks import Sink

OnBacklog = Literal["skip", "queue"]

#: ``max_pending`` when it is not given: 1 with ``on_backlog="skip"``, this with ``"queue"``.
DEFAULT_QUEUE_PENDING = 16

#: The methods a sink needs (see :class:`~cluster_tracking.tracking.sinks.Sink`).
SINK_METHODS = ("log_params", "log_report", "log_summary", "close")


@dataclass(frozen=True)
class TrackerSettings:
    """A tracker's validated settings (see ``ClusterabilityTracker`` for each one's meaning).

    ``measure_options`` are the keyword arguments passed on to
    :func:`~cluster_tracking.measure.measure` besides ``k``, ``shuffles``, ``shuffle`` and
    ``seed``; ``graph_options`` those passed to :func:`~cluster_tracking.graph.weight_graph`.
    """

    every_n_steps: int | None
    every_n_epochs: int | None
    k: int
    shuffles: int
    shuffle: str
    seed: int
    on_backlog: OnBacklog
    max_pending: int
    max_overhead: float | None
    worker: Literal["process", "thread"]
    n_jobs: int | None
    plots: bool
    measure_final: bool
    rank: int | None
    measure_options: dict[str, Any] = field(default_factory=dict)
    graph_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def check(cls, **arguments: Any) -> TrackerSettings:
        """Validate the tracker's keyword arguments (the names of its ``__init__``).

        Raises:
            ConfigError: a setting is out of range.
        """
        # checked in the order of the arguments: the first error met is the one raised
        every_n_steps = _check_interval(arguments["every_n_steps"], "every_n_steps")
        every_n_epochs = _check_interval(arguments["every_n_epochs"], "every_n_epochs")
        shuffle = _check_measurement(arguments)
        seed = arguments["seed"]
        if seed is None:
            seed = secrets.randbits(32)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer or None, got {seed!r}.")
        on_backlog, max_pending, max_overhead = _check_budget(arguments)
        worker = arguments["worker"]
        if worker not in ("process", "thread"):
            raise ConfigError(f"worker must be 'process' or 'thread', got {worker!r}.")
        measure_options, graph_options = _options(arguments)
        return cls(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            k=int(arguments["k"]),
            shuffles=int(arguments["shuffles"]),
            shuffle=shuffle,
            seed=int(seed),
            on_backlog=on_backlog,
            max_pending=max_pending,
            max_overhead=max_overhead,
            worker=worker,
            n_jobs=arguments["n_jobs"],
            plots=bool(arguments["plots"]),
            measure_final=bool(arguments["measure_final"]),
            rank=arguments["rank"],
            measure_options=measure_options,
            graph_options=graph_options,
        )

    def params(self, version: str) -> dict[str, Any]:
        """The settings logged once to every sink, under ``clusterability.*`` names (``None``
        values left out); ``version`` is cluster-tracking's."""
        options = self.measure_options
        params: dict[str, Any] = {
            "clusterability.k": self.k,
            "clusterability.shuffles": self.shuffles,
            "clusterability.method": self.shuffle,
            "clusterability.seed": self.seed,
            "clusterability.norm": options["norm"],
            "clusterability.preset": options["preset"],
            # the report's config["procedure"]: sinks warn when a run holds another one
            "clusterability.procedure": options["preset"],
            "clusterability.n_jobs": self.n_jobs,
            "clusterability.every_n_steps": self.every_n_steps,
            "clusterability.every_n_epochs": self.every_n_epochs,
            "clusterability.on_backlog": self.on_backlog,
            "clusterability.max_pending": self.max_pending,
            "clusterability.max_overhead": self.max_overhead,
            "clusterability.version": version,
        }
        if options["layers"] is not None:
            params["clusterability.layers"] = ",".join(options["layers"])
        if options.get("n_init") is not None:
            params["clusterability.n_init"] = options["n_init"]
        if options["init"] is not None:
            params["clusterability.init"] = options["init"]
        return {key: value for key, value in params.items() if value is not None}


def step_seed(seed: int, step: int) -> int:
    """The seed of the measurement at ``step`` of a tracker seeded with ``seed``: a 32-bit
    integer drawn from ``numpy.random.SeedSequence([seed, step])``, so it depends on nothing
    else."""
    return int(np.random.SeedSequence([seed, int(step)]).generate_state(1)[0])


def check_sinks(sinks: Sequence[Sink]) -> list[Sink]:
    """``sinks`` as a list, each checked for the methods a tracker calls.

    Raises:
        ConfigError: a sink lacks one of :data:`SINK_METHODS`.
    """
    checked = list(sinks)
    for sink in checked:
        missing = [name for name in SINK_METHODS if not callable(getattr(sink, name, None))]
        if missing:
            raise ConfigError(
                f"sink {sink!r} lacks {', '.join(missing)}; a sink needs log_params, "
                "log_report, log_summary and close (see cluster_tracking.tracking.sinks.Sink)."
            )
    return checked


def _check_measurement(arguments: dict[str, Any]) -> str:
    """Check what one measurement computes (k, the null model, the graph); the shuffle method."""
    k, shuffles = arguments["k"], arguments["shuffles"]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k must be an integer >= 2 (the paper uses 12), got {k!r}.")
    norm, preset, layers = arguments["norm"], arguments["preset"], arguments["layers"]
    if norm not in ("l1", "l2"):
        raise ConfigError(f"norm must be 'l1' or 'l2', got {norm!r}.")
    # shuffles, the null model and the preset: measure()'s own checks, with its messages
    shuffle = MeasureConfig(
        k=int(k), shuffles=shuffles, shuffle=arguments["shuffle"], preset=preset
    ).shuffle
    if layers:
        parse_layers(layers)  # a ConfigError now, not at the first due step
    if shuffle == "random_init" and layers is None:
        raise ConfigError(
            "shuffle='random_init' traces every re-initialised copy of the model with "
            "torch.fx, which cannot run in the background while training calls the model; "
            "pass layers=[...] (the graph is then built without tracing), or use a shuffle "
            "null during training and measure(model, shuffle='random_init') on checkpoints."
        )
    return shuffle


def _check_budget(arguments: dict[str, Any]) -> tuple[OnBacklog, int, float | None]:
    """Check the backlog policy and the time budget: on_backlog, max_pending, max_overhead."""
    on_backlog, max_pending = arguments["on_backlog"], arguments["max_pending"]
    max_overhead = arguments["max_overhead"]
    if on_backlog not in ("skip", "queue"):
        raise ConfigError(f"on_backlog must be 'skip' or 'queue', got {on_backlog!r}.")
    if max_pending is None:
        max_pending = 1 if on_backlog == "skip" else DEFAULT_QUEUE_PENDING
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise ConfigError(f"max_pending must be an integer >= 1, got {max_pending!r}.")
    if max_overhead is not None and (
        isinstance(max_overhead, bool)
        or not isinstance(max_overhead, (int, float))
        or not 0 < max_overhead <= 1
    ):
        raise ConfigError(
            f"max_overhead must be a fraction in (0, 1] (0.1: measuring may take a tenth "
            f"of the machine) or None for no limit, got {max_overhead!r}."
        )
    return on_backlog, max_pending, None if max_overhead is None else float(max_overhead)


def _options(arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword arguments for ``measure()`` and for ``weight_graph()``."""
    layers = arguments["layers"]
    measure_options: dict[str, Any] = {
        "n_jobs": arguments["n_jobs"],
        "norm": arguments["norm"],
        "preset": arguments["preset"],
        "layers": layers if isinstance(layers, str) or layers is None else list(layers),
        "init": arguments["init"],
        "backend": arguments["backend"],
    }
    if arguments["n_init"] is not None:
        measure_options["n_init"] = arguments["n_init"]
    graph_options: dict[str, Any] = {
        "norm": arguments["norm"],
        "preset": arguments["preset"],
        "layers": measure_options["layers"],
    }
    if arguments["example_inputs"] is not None:
        graph_options["example_inputs"] = arguments["example_inputs"]
    if arguments["include_embeddings"]:
        graph_options["include_embeddings"] = True
    return measure_options, graph_options


def _check_interval(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer or None, got {value!r}.")
    return int(value)
