"""The framework-free part of the Lightning and Hugging Face callbacks.

Both callbacks turn their framework's events (steps, epochs, checkpoint saves, the end of training)
into :class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker` calls, pick the sinks for
the run the framework already logs to, and resolve which layers make the graph
(:func:`select_layers`). That
shared logic lives here so that neither adapter imports the other's framework.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cluster_tracking.errors import ClusterTrackingError, ConfigError, GraphError, describe, warn
from cluster_tracking.graph import selection as graph_selection
from cluster_tracking.graph import weight_graph
from cluster_tracking.graph.chain import is_weight_layer
from cluster_tracking.graph.selection import list_names
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.tracking.sinks import LocalDirectorySink, Sink
from cluster_tracking.tracking.tracker import ClusterabilityTracker

#: What ``module=`` may be: an attribute path of the model (``"bert"``, ``"model.backbone"``) or a
#: function returning the ``nn.Module`` to measure.
ModuleSelector = str | Callable[[Any], nn.Module]

_log = logging.getLogger(__name__)


def select_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """The qualified module names a layer selection stands for, ready for ``layers=`` of
    :func:`~cluster_tracking.graph.weight_graph` (the chain the weight graph is built from).

    A *pattern* (any entry holding ``*``, ``?`` or ``[...]``; shell-style, as :mod:`fnmatch`,
    where ``*`` also crosses dots) selects every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` module whose
    qualified name it matches, in the order the modules are declared (``model.named_modules()``,
    which for transformers is the data-flow order). A plain name is kept as it is (the weight
    graph checks it and lists the available names when it is wrong).

    Args:
        model: the module the names are relative to.
        layers: a string of one or more entries separated by ``|``, e.g.
            ``"*.intermediate.dense|*[0-9].output.dense"``; the selected names come in declaration
            order. Or a list of entries, e.g. ``["fc1", "blocks.*.mlp.fc2"]``; each entry's names
            take its place in the list. A name selected twice is kept once.

    Returns:
        The selected names, in chain order.

    Raises:
        ConfigError: the selection is empty (``""``, ``[]``) or not a string or list of strings.
        GraphError: a pattern matches no ``nn.Linear``/``nn.Conv`` module (the message lists
            them, and names modules of other types that the pattern did match).
    """
    if isinstance(layers, (str, Sequence)):
        for entry in [layers] if isinstance(layers, str) else layers:
            if not isinstance(entry, str):
                break
        else:
            candidates = _layer_names(model)
            try:
                return graph_selection.select_layers(layers, candidates)
            except GraphError as error:
                raise GraphError(_no_match_message(model, layers, candidates)) from error
    raise ConfigError(
        f"layers must be a string like '*.intermediate.dense|*[0-9].output.dense' or a list "
        f"of layer names, got {layers!r}."
    )


def _no_match_message(model: nn.Module, layers: str | Sequence[str], candidates: list[str]) -> str:
    """The error for a pattern that matches no Linear/Conv module: which modules it did match."""
    entries = graph_selection.parse_layers(layers) or []
    for entry in entries:
        if not graph_selection.is_pattern(entry):
            continue
        if any(fnmatch.fnmatchcase(name, entry) for name in candidates):
            continue
        others = [
            f"{name} ({type(module).__name__})"
            for name, module in model.named_modules()
            if name and fnmatch.fnmatchcase(name, entry) and _has_weight(module)
        ]
        hint = (
            f" It matches {list_names(others)}, which the weight graph cannot read (it reads "
            "nn.Linear and nn.Conv1d/2d/3d modules only)."
            if others
            else ""
        )
        return (
            f"layers pattern {entry!r} matches no nn.Linear/nn.Conv module of "
            f"{type(model).__name__}.{hint} Linear/Conv modules: {list_names(candidates)}."
        )
    return f"layers={layers!r} selects no layer; Linear/Conv modules: {list_names(candidates)}."


def _layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_weight_layer(module)]


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter)


class _CallbackCore:
    """What the Lightning and Hugging Face callbacks share, free of either framework: the options,
    the checks at the start of training, the schedule, and the tracker's life (created at the
    first due measurement, with the sinks the framework's run gives, closed at the end).

    ``root`` is what the framework hands its callbacks (the ``LightningModule``, the
    ``PreTrainedModel``); ``module=`` picks the ``nn.Module`` to measure inside it.
    """

    def __init__(
        self,
        owner: str,
        *,
        every_n_steps: int | None,
        every_n_epochs: int | None,
        on_checkpoint: bool,
        at_end: bool,
        module: ModuleSelector | None,
        layers: str | Sequence[str] | None,
        sinks: Sequence[Sink],
        auto_sinks: bool,
        close_timeout: float | None,
        tracker_options: dict[str, Any],
    ) -> None:
        self.owner = owner
        if "rank" in tracker_options:
            raise ConfigError(
                f"{owner}: rank is set by the callback (the trainer's global rank zero measures); "
                "leave it out of the tracker options."
            )
        if module is not None and not (isinstance(module, str) or callable(module)):
            raise ConfigError(
                f"{owner}: module must be an attribute path like 'model' or a function of the "
                f"trained module returning an nn.Module, got {module!r}."
            )
        if layers is not None:
            if isinstance(layers, str):
                entries = layers.split("|")
            elif isinstance(layers, Sequence):
                entries = list(layers)
            else:
                entries = [layers]
            if not entries or any(not isinstance(e, str) or not e.strip() for e in entries):
                raise ConfigError(
                    f"{owner}: layers={layers!r} selects no layer; pass names or patterns of "
                    "Linear/Conv modules, e.g. layers='*.intermediate.dense|*[0-9].output.dense', "
                    "or None for the whole model."
                )
        if close_timeout is not None and not close_timeout >= 0:
            raise ConfigError(
                f"{owner}: close_timeout must be >= 0 or None, got {close_timeout!r}."
            )
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.on_checkpoint = bool(on_checkpoint)
        self.at_end = bool(at_end)
        self.module = module
        self.layers = layers
        self.extra_sinks = list(sinks)
        self.auto_sinks = bool(auto_sinks)
        self.close_timeout = close_timeout
        self.tracker_options = dict(tracker_options)
        # Check every option now, before any training (a throwaway tracker starts no thread).
        try:
            ClusterabilityTracker(self.extra_sinks, **self._tracker_arguments([]))
        except TypeError as error:
            raise ConfigError(
                f"{owner}: {error}; tracker options are those of ClusterabilityTracker "
                "(k, shuffles, shuffle, seed, n_jobs, n_init, norm, preset, init, backend, "
                "on_backlog, max_pending, plots)."
            ) from error
        except ClusterTrackingError as error:
            raise type(error)(f"{owner}: {error}") from error

        self.tracker: ClusterabilityTracker | None = None
        self.selected_layers: list[str] | None = None
        self._active = False  # between begin() and end(), on rank zero, with a usable graph
        self._make_sinks: Callable[[], list[Sink]] | None = None
        self._tracker_failed = False
        self._warned_hook = False

    def _tracker_arguments(self, layers: list[str] | None) -> dict[str, Any]:
        if self.layers is None:
            layers = None
        return {
            "every_n_steps": self.every_n_steps,
            "every_n_epochs": self.every_n_epochs,
            "layers": layers,
            **self.tracker_options,
        }

    # ------------------------------------------------------------------------------ life cycle

    def begin(self, root: Any, *, rank_zero: bool, make_sinks: Callable[[], list[Sink]]) -> None:
        """Start of training: pick the module and the layers, check that they make a graph.

        Configuration errors raise here, before the first training step, on every rank (so that
        all ranks stop alike). A whole model (``layers=None``) whose graph cannot be built gives
        one warning instead, and the run goes on unmeasured.

        Raises:
            ConfigError: ``module=`` does not lead to an ``nn.Module``.
            GraphError: ``layers=`` names an unknown module, matches nothing, or does not chain.
        """
        self.end(None, None, measure=False)  # a tracker left open by an earlier run
        self.tracker = None
        self.selected_layers = None
        self._tracker_failed = False
        self._warned_hook = False
        self._make_sinks = make_sinks
        module = self.resolve_module(root)
        try:
            if self.layers is not None:
                try:
                    self.selected_layers = select_layers(module, self.layers)
                    weight_graph(module, layers=self.selected_layers)
                except ClusterTrackingError as error:
                    raise type(error)(
                        f"{self.owner}(layers={self.layers!r}) makes no weight graph of "
                        f"{type(module).__name__}: {error}"
                    ) from error
            elif rank_zero:
                weight_graph(module)  # traced once here, so a failure is told once, up front
        except ClusterTrackingError as error:
            if self.layers is not None:
                raise
            self._disable(module, error)
            return
        except Exception as error:  # not a configuration error: never stop training for it
            self._disable(module, error)
            return
        self._active = rank_zero

    def _disable(self, module: nn.Module, error: BaseException) -> None:
        self._active = False
        warn(
            f"{self.owner}: the weight graph of {type(module).__name__} cannot be built "
            f"({describe(error)}). Clusterability is not "
            "measured in this run; training goes on. Pass layers= naming a chain of its "
            "Linear/Conv modules, or patterns such as '*.intermediate.dense|*[0-9].output.dense' "
            "(the MLP blocks of a BERT-like model), or module= to measure a part of it. "
            f"Linear/Conv modules: {list_names(_layer_names(module))}."
        )

    def resolve_module(self, root: Any) -> nn.Module:
        """The ``nn.Module`` to measure inside ``root``, as ``module=`` says."""
        target: Any = root
        if isinstance(self.module, str):
            for part in self.module.split("."):
                if not hasattr(target, part):
                    raise ConfigError(
                        f"{self.owner}(module={self.module!r}): {type(target).__name__} has no "
                        f"attribute {part!r}."
                    )
                target = getattr(target, part)
        elif self.module is not None:
            target = self.module(root)
        if not isinstance(target, nn.Module):
            raise ConfigError(
                f"{self.owner}(module={self.module!r}) gives a {type(target).__name__}, not a "
                "torch.nn.Module to measure."
            )
        return target

    def step(self, root: Any, step: int) -> None:
        """A training step ended (or training starts) at global step ``step``."""
        if self._active and self.every_n_steps is not None and step % self.every_n_steps == 0:
            self._request("step", root, step)

    def epoch_end(self, root: Any, epoch: int, step: int) -> None:
        """Epoch ``epoch`` (counted from 0) ended at global step ``step``."""
        every = self.every_n_epochs
        if self._active and every is not None and (epoch + 1) % every == 0:
            self._request("epoch", root, step, epoch)

    def checkpoint(self, root: Any, step: int) -> None:
        """The framework saved a checkpoint at global step ``step``."""
        if self._active and self.on_checkpoint:
            self._request("checkpoint", root, step)

    def _request(self, kind: str, root: Any, step: int, epoch: int = 0) -> None:
        """Hand the module to the tracker (which snapshots it if the step is new). Never raises."""
        try:
            tracker = self._ensure_tracker()
            if tracker is None:
                return
            module = self.resolve_module(root)
            if kind == "step":
                tracker.step(module, step)
            elif kind == "epoch":
                tracker.epoch_end(module, epoch, step=step)
            else:
                tracker.checkpoint(module, step)
        except Exception as error:
            if not self._warned_hook:
                self._warned_hook = True
                warn(
                    f"{self.owner}: clusterability at step {step} failed: {describe(error)}. "
                    "Training goes on."
                )

    def end(self, root: Any, step: int | None, *, measure: bool = True) -> None:
        """End of training: measure the final weights (``at_end``), then close the tracker, which
        waits for pending measurements (``close_timeout`` seconds at most, in all) and logs the
        summary. Never raises."""
        if not self._active:
            return
        deadline = None if self.close_timeout is None else time.monotonic() + self.close_timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            if measure and self.at_end and root is not None and step is not None:
                tracker = self._ensure_tracker()
                # Training is over: waiting here lets the final step through the backlog.
                if tracker is not None and tracker.flush(remaining()):
                    tracker.checkpoint(self.resolve_module(root), step)
            if self.tracker is not None:
                self.tracker.close(remaining())
        except Exception as error:
            warn(f"{self.owner}: closing the clusterability tracker failed: {describe(error)}.")
        finally:
            self._active = False

    @property
    def reports(self) -> list[ClusterabilityReport]:
        """The current (or last) tracker's reports, by step; none before the first."""
        return self.tracker.reports if self.tracker is not None else []

    def _ensure_tracker(self) -> ClusterabilityTracker | None:
        """The tracker, created at the first due measurement with the run's sinks (by then the
        framework's own logging callbacks have opened their run)."""
        if self.tracker is not None:
            return self.tracker
        if self._tracker_failed:
            return None
        sinks: list[Sink] = []
        if self.auto_sinks and self._make_sinks is not None:
            try:
                sinks = self._make_sinks()
            except Exception as error:
                warn(
                    f"{self.owner}: could not connect to the training run's tracking platform "
                    f"({describe(error)}); clusterability goes to the other sinks only."
                )
        sinks = [*sinks, *self.extra_sinks]
        try:
            self.tracker = ClusterabilityTracker(
                sinks, rank=0, **self._tracker_arguments(self.selected_layers)
            )
        except Exception as error:  # checked in __init__; a hook never stops training
            self._tracker_failed = True
            warn(f"{self.owner}: could not start the clusterability tracker: {describe(error)}.")
            return None
        _log.info("%s: measuring clusterability into %s", self.owner, sinks)
        return self.tracker


class _CoreViews:
    """The read-only views both callbacks give of their :class:`_CallbackCore`."""

    _core: _CallbackCore

    @property
    def tracker(self) -> ClusterabilityTracker | None:
        """The tracker of the current or last training run (created at its first measurement)."""
        return self._core.tracker

    @property
    def selected_layers(self) -> list[str] | None:
        """The names ``layers=`` resolved to when training started (``None``: whole module)."""
        return self._core.selected_layers

    @property
    def reports(self) -> list[ClusterabilityReport]:
        """The reports measured so far in this process, by step."""
        return self._core.reports


def _local_sink(folder: str | Path) -> LocalDirectorySink:
    """The fallback sink: its artifacts in ``<folder>/clusterability/`` (the sink adds that
    folder itself), ``params.json`` and ``reports.jsonl`` beside it in ``<folder>``."""
    return LocalDirectorySink(Path(folder))
