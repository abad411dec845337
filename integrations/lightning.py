"""Track clusterability in a Lightning ``Trainer``: ``ClusterabilityCallback``.

>>> import lightning as L
>>> from lightning.pytorch.loggers import MLFlowLogger
>>> from cluster_tracking.integrations.lightning import ClusterabilityCallback
>>> trainer = L.Trainer(
...     logger=MLFlowLogger(experiment_name="mnist", tracking_uri="sqlite:///mlflow.db"),
...     callbacks=[ClusterabilityCallback(every_n_epochs=1, k=12, shuffles=20)],
... )
>>> trainer.fit(model, train_loader)

The callback measures the model with a
:class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker`
and logs into the run the trainer's loggers already use, at ``trainer.global_step``:

* an ``MLFlowLogger``: its run (``logger.run_id``, at its tracking URI), through
  :class:`~cluster_tracking.integrations.mlflow.MlflowSink`;
* a ``WandbLogger``: its run (``logger.experiment``), through
  :class:`~cluster_tracking.integrations.wandb.WandbSink`; the ``clusterability/*`` metrics are
  plotted against their own step metric ``clusterability/step`` (the global step);
* no such logger: a :class:`~cluster_tracking.tracking.sinks.LocalDirectorySink` in
  ``<trainer.log_dir>/clusterability``.

No second run is ever created. The metrics are ``clusterability/ncut``, ``clusterability/z_score``,
... at the measured global steps; artifacts under ``clusterability/step-<step>/``, and at the end
``clusterability/summary.json``, ``trajectory.png`` and ``report.html``.

When it measures: every ``every_n_steps`` optimizer steps (``trainer.global_step``; step 0, the
initial weights, included), after every ``every_n_epochs``-th epoch, whenever the trainer saves a
checkpoint (``on_save_checkpoint``; the default schedule, so by default measurements follow
``ModelCheckpoint``, once per epoch), and once more at the end of ``fit`` (the final weights). A
step is measured at most once. Only global rank zero measures (``trainer.is_global_zero``).

At the end of ``fit`` (``on_fit_end``, which Lightning calls before the loggers' ``finalize``
ends the run) the tracker is closed: it waits for pending measurements and logs the summary. When
``fit`` raises, ``on_exception`` (also before ``finalize``) closes it, so what was measured and
the summary of it are logged.

Which layers. By default the whole ``LightningModule``, traced with ``torch.fx``. When that
fails, or to leave out parts of it, pass ``module="model"`` (an attribute path) or
``module=lambda pl_module: pl_module.backbone`` to measure the inner ``nn.Module``, and/or
``layers=`` to build the graph from a chain of named ``nn.Linear``/``nn.Conv`` modules, by name or
by pattern (:func:`select_layers`), e.g.
``layers="encoder.*.fc1|encoder.*.fc2"``. Names are relative to the measured module.

Errors. A ``layers=`` selection that names an unknown module, matches nothing, or does not chain,
and a ``module=`` that leads to no ``nn.Module``, are configuration errors: they raise
(:class:`~cluster_tracking.errors.GraphError`, :class:`~cluster_tracking.errors.ConfigError`)
from ``on_fit_start``, before the first training step. A model whose *whole* graph cannot be
built (the default, ``layers=None``) gives one
:class:`~cluster_tracking.errors.ClusterTrackingWarning` at the start of ``fit``;
training then runs without measurements. Every later failure (a measurement, a plot, a tracking
server) is a
warning too: the callback never stops training.

Lightning is imported when this module is imported (the callback subclasses
``lightning.pytorch.Callback``); without it, creating the callback raises an ``ImportError``
naming ``pip install 'cluster-tracking[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster_tracking.integrations._callback_core import (
    ModuleSelector,
    _CallbackCore,
    _CoreViews,
    _local_sink,
    select_layers,
)
from cluster_tracking.tracking.sinks import Sink

_IMPORT_ERROR: ImportError | None = None  # why the framework could not be imported
if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback as _LightningCallback
else:
    try:
        from lightning.pytorch import Callback as _LightningCallback
    except ImportError as error:  # the callback raises a clear error when created
        _LightningCallback = object
        _IMPORT_ERROR = error

__all__ = ["INSTALL_HINT", "ClusterabilityCallback", "select_layers"]

#: How to install what this module needs.
INSTALL_HINT = "pip install 'cluster-tracking[lightning]'"


class ClusterabilityCallback(_CoreViews, _LightningCallback):
    """A Lightning ``Callback`` that logs clusterability into the trainer's logger run.

    Args:
        every_n_steps: measure when ``trainer.global_step % every_n_steps == 0`` (at the start
            of training too, for step 0); ``None``: not on a step schedule.
        every_n_epochs: measure after every ``every_n_epochs``-th epoch, at the global step the
            epoch ended on; ``None``: not on an epoch schedule.
        on_checkpoint: measure whenever the trainer saves a checkpoint (``on_save_checkpoint``).
        at_end: measure the final weights at the end of ``fit``.
        module: the part of the ``LightningModule`` to measure: an attribute path (``"model"``,
            ``"model.backbone"``) or a function of the ``LightningModule`` returning an
            ``nn.Module``; ``None``: the ``LightningModule`` itself.
        layers: the layers the weight graph is built from, as a chain: ``None`` for the whole
            module (traced with ``torch.fx``), module names, or patterns (see
            :func:`select_layers`). Names are
            relative to the measured module.
        sinks: more sinks to log to, besides the loggers' runs.
        auto_sinks: log to the runs of the trainer's ``MLFlowLogger``/``WandbLogger`` (else to a
            local folder in ``trainer.log_dir``).
        close_timeout: seconds to wait for pending measurements at the end of ``fit``; ``None``:
            as long as they take.
        k: number of clusters (the paper uses 12).
        shuffles: null networks per measurement (0: none).
        shuffle: the null model (``layer``, ``layer_nonzero``, ...).
        seed: the tracker's seed (step ``s`` is measured with a seed derived from it and ``s``).
        n_jobs: parallel workers for the null networks (1: in the tracker's thread).
        **tracker_options: further :class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker`
            options: ``n_init``, ``norm``, ``preset``, ``on_backlog``, ``max_pending``,
            ``plots``...

    Attributes:
        tracker: the :class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker` of
            the current or last ``fit`` (``None`` before the first measurement and on other ranks).
        selected_layers: the layer names ``layers=`` resolved to at the start of ``fit``.

    Raises:
        ImportError: lightning is not installed.
        ConfigError: an option is out of range.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_checkpoint: bool = True,
        at_end: bool = True,
        module: ModuleSelector | None = None,
        layers: str | Sequence[str] | None = None,
        sinks: Sequence[Sink] = (),
        auto_sinks: bool = True,
        close_timeout: float | None = None,
        k: int = 12,
        shuffles: int = 20,
        shuffle: str = "layer",
        seed: int | None = 0,
        n_jobs: int | None = 1,
        **tracker_options: Any,
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError(
                f"ClusterabilityCallback needs lightning, which is not installed: {INSTALL_HINT}"
            ) from _IMPORT_ERROR
        super().__init__()
        self._core = _CallbackCore(
            type(self).__name__,
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            on_checkpoint=on_checkpoint,
            at_end=at_end,
            module=module,
            layers=layers,
            sinks=sinks,
            auto_sinks=auto_sinks,
            close_timeout=close_timeout,
            tracker_options={
                "k": k,
                "shuffles": shuffles,
                "shuffle": shuffle,
                "seed": seed,
                "n_jobs": n_jobs,
                **tracker_options,
            },
        )

    # -------------------------------------------------------------------------------- hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check ``module=`` and ``layers=`` (raises on a configuration error)."""
        self._core.begin(
            pl_module,
            rank_zero=trainer.is_global_zero,
            make_sinks=lambda: _logger_sinks(trainer),
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the initial weights when ``trainer.global_step`` is due (step 0)."""
        self._core.step(pl_module, trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Measure when ``trainer.global_step`` is due (``every_n_steps``)."""
        self._core.step(pl_module, trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure after every ``every_n_epochs``-th epoch, at ``trainer.global_step``."""
        # current_epoch is still the epoch that just ended here (counted from 0).
        self._core.epoch_end(pl_module, trainer.current_epoch, trainer.global_step)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Measure the checkpoint being saved (``on_checkpoint``)."""
        self._core.checkpoint(pl_module, trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the final weights, wait for pending measurements, log the summary."""
        self._core.end(pl_module, trainer.global_step)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Log what was measured and its summary before the loggers mark the run failed."""
        self._core.end(pl_module, trainer.global_step, measure=False)


def _logger_sinks(trainer: pl.Trainer) -> list[Sink]:
    """Sinks for the runs of the trainer's MLflow and W&B loggers (a local folder without one)."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    sinks: list[Sink] = []
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            from cluster_tracking.integrations.mlflow import MlflowSink

            client = logger.experiment  # creates the logger's run if it does not exist yet
            uri = getattr(client, "tracking_uri", None) or logger._tracking_uri
            sinks.append(MlflowSink(run_id=logger.run_id, tracking_uri=uri))
        elif isinstance(logger, WandbLogger):
            from cluster_tracking.integrations.wandb import WandbSink

            sinks.append(WandbSink(logger.experiment))
    if not sinks:
        sinks.append(_local_sink(Path(trainer.log_dir or trainer.default_root_dir)))
    return sinks
