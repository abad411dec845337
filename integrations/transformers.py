"""Track clusterability in a Hugging Face ``Trainer``: ``ClusterabilityTrainerCallback``.

>>> from transformers import Trainer, TrainingArguments
>>> from cluster_tracking.integrations.transformers import ClusterabilityTrainerCallback
>>> trainer = Trainer(
...     model=model,
...     args=TrainingArguments(output_dir="out", report_to=["mlflow"], save_steps=500),
...     train_dataset=dataset,
...     callbacks=[
...         ClusterabilityTrainerCallback(
...             layers="*.intermediate.dense|*[0-9].output.dense",  # BERT's MLP blocks
...             k=12, shuffles=20,
...         )
...     ],
... )
>>> trainer.train()

The callback measures the model with a
:class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker`
and logs into the run the ``Trainer`` already reports to, at ``state.global_step``:

* ``report_to`` holds ``"mlflow"``: the MLflow run that Hugging Face's ``MLflowCallback`` started
  (``mlflow.active_run()`` once it started; its tracking URI), through
  :class:`~cluster_tracking.integrations.mlflow.MlflowSink` with that explicit run id;
* ``report_to`` holds ``"wandb"``: ``wandb.run``, through
  :class:`~cluster_tracking.integrations.wandb.WandbSink`;
* neither: a :class:`~cluster_tracking.tracking.sinks.LocalDirectorySink` in
  ``<output_dir>/clusterability``.

No second run is ever created. The metrics are ``clusterability/ncut``, ``clusterability/z_score``,
... at the measured global steps; artifacts under ``clusterability/step-<step>/``, and at the end
of training ``clusterability/summary.json``, ``trajectory.png`` and ``report.html``.

When it measures: every ``every_n_steps`` optimizer steps (step 0, the initial weights, included),
after every ``every_n_epochs``-th epoch, whenever the ``Trainer`` saves a checkpoint
(``on_save``; the default schedule, so measurements follow ``save_steps``/``save_strategy``), and
once more at the end of training (the final weights). A step is measured at most once. Only the
world process zero measures (``state.is_world_process_zero``).

At the end of training (``on_train_end``) the tracker is closed: it waits for pending
measurements and logs the summary. Hugging Face's ``MLflowCallback`` runs its ``on_train_end``
first (callbacks passed to ``Trainer`` come after the built-in ones) and may end the MLflow run
there; the summary still reaches that run, because the sink logs through ``MlflowClient`` with the
run's id, which MLflow accepts for a finished run. Training that raises skips ``on_train_end``:
what was measured so far is logged, the summary is not.

Which layers. By default the whole model, traced with ``torch.fx``. Transformers cannot be traced
(attention, dynamic control flow), so pass ``layers=``: a chain of ``nn.Linear`` modules, by name
or by pattern (see :func:`select_layers`), e.g. the MLP blocks of every BERT layer,
``"*.intermediate.dense|*[0-9].output.dense"`` (``intermediate.dense`` maps hidden -> 4 x hidden,
``output.dense`` back, so consecutive blocks chain through the residual stream; the
``[0-9]`` keeps out ``attention.output.dense``). ``print([n for n, m in model.named_modules()
if isinstance(m, torch.nn.Linear)])`` lists the candidates. GPT-2's MLP uses transformers' own
``Conv1D`` (weights stored transposed), which the weight graph does not read: measure a model
whose MLP is built from ``nn.Linear`` (BERT, RoBERTa, Llama, OPT, ...).

Errors. A ``layers=`` selection that names an unknown module, matches nothing, or does not chain
is a configuration error: it raises :class:`~cluster_tracking.errors.GraphError` from
``on_train_begin``, before the first training step, with the available layer names. A model whose
*whole* graph cannot be built (the default, ``layers=None``) gives one
:class:`~cluster_tracking.errors.ClusterTrackingWarning` at the start of training;
training then runs without measurements. Every later failure (a measurement, a plot, a tracking
server) is a
warning too: the callback never stops training.

Transformers is imported when this module is imported (the callback subclasses
``transformers.TrainerCallback``); without it, creating the callback raises an ``ImportError``
naming ``pip install 'cluster-tracking[transformers]'``. :func:`select_layers` needs only torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cluster_tracking.errors import warn
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
    from transformers import TrainerCallback as _TrainerCallback
    from transformers import TrainerControl, TrainerState, TrainingArguments
else:
    try:
        from transformers import TrainerCallback as _TrainerCallback
    except ImportError as error:  # the callback raises a clear error when created
        _TrainerCallback = object
        _IMPORT_ERROR = error

__all__ = ["INSTALL_HINT", "ClusterabilityTrainerCallback", "select_layers"]

#: How to install what this module needs.
INSTALL_HINT = "pip install 'cluster-tracking[transformers]'"


class ClusterabilityTrainerCallback(_CoreViews, _TrainerCallback):
    """A ``transformers.TrainerCallback`` that logs clusterability into the ``Trainer``'s run.

    Args:
        every_n_steps: measure when ``state.global_step % every_n_steps == 0`` (at the start of
            training too, for step 0); ``None``: not on a step schedule.
        every_n_epochs: measure after every ``every_n_epochs``-th epoch; ``None``: not on an
            epoch schedule.
        on_checkpoint: measure whenever the ``Trainer`` saves a checkpoint (``on_save``).
        at_end: measure the final weights at the end of training.
        layers: the layers the weight graph is built from, as a chain: ``None`` for the whole
            model (traced with ``torch.fx``, which fails on transformers), module names, or
            patterns (see :func:`select_layers`), e.g.
            ``"*.intermediate.dense|*[0-9].output.dense"``. Names are relative to the measured
            module.
        module: the part of the model to measure: an attribute path (``"bert"``) or a function of
            the model returning an ``nn.Module``; ``None``: the model itself.
        sinks: more sinks to log to, besides the run's own.
        auto_sinks: log to the run that ``report_to`` names (MLflow, W&B; else a local folder).
        close_timeout: seconds to wait for pending measurements at the end of training;
            ``None``: as long as they take.
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
            the current or last training run (``None`` before the first measurement and on
            other processes).
        selected_layers: the layer names ``layers=`` resolved to at the start of training.

    Raises:
        ImportError: transformers is not installed.
        ConfigError: an option is out of range.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_checkpoint: bool = True,
        at_end: bool = True,
        layers: str | Sequence[str] | None = None,
        module: ModuleSelector | None = None,
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
                f"ClusterabilityTrainerCallback needs transformers, which is not installed: "
                f"{INSTALL_HINT}"
            ) from _IMPORT_ERROR
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

    # ------------------------------------------------------------------------------- events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Check the layer selection (raises on a configuration error) and measure step 0."""
        model = kwargs.get("model")
        if model is None:
            warn(f"{type(self).__name__}: the Trainer passed no model; nothing is measured.")
            return
        self._core.begin(
            model,
            rank_zero=bool(state.is_world_process_zero),
            make_sinks=lambda: _run_sinks(args),
        )
        self._core.step(model, state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Measure when ``state.global_step`` is due (``every_n_steps``)."""
        model = kwargs.get("model")
        if model is not None:
            self._core.step(model, state.global_step)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Measure after every ``every_n_epochs``-th epoch, at ``state.global_step``."""
        model = kwargs.get("model")
        if model is not None and state.epoch is not None:
            # state.epoch is e + 1 at the end of epoch e (a fraction when max_steps cut it short).
            epoch = max(0, math.ceil(round(float(state.epoch), 6)) - 1)
            self._core.epoch_end(model, epoch, state.global_step)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Measure the checkpoint the Trainer just saved (``on_checkpoint``)."""
        model = kwargs.get("model")
        if model is not None:
            self._core.checkpoint(model, state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Measure the final weights, wait for pending measurements, log the summary."""
        self._core.end(kwargs.get("model"), state.global_step)


def _run_sinks(args: TrainingArguments) -> list[Sink]:
    """Sinks for the runs that ``args.report_to`` names and that are open now."""
    report_to = args.report_to or []
    if isinstance(report_to, str):
        report_to = [report_to]
    sinks: list[Sink] = []
    if "mlflow" in report_to:
        import mlflow

        from cluster_tracking.integrations.mlflow import MlflowSink

        run = mlflow.active_run()
        if run is None:
            warn(
                "ClusterabilityTrainerCallback: report_to has 'mlflow' but no MLflow run is "
                "active; keep ClusterabilityTrainerCallback after MLflowCallback (pass it in "
                "Trainer(callbacks=[...]) as usual). Clusterability is not logged to MLflow."
            )
        else:
            sinks.append(MlflowSink(run_id=run.info.run_id, tracking_uri=mlflow.get_tracking_uri()))
    if "wandb" in report_to:
        import wandb

        from cluster_tracking.integrations.wandb import WandbSink

        if wandb.run is None:
            warn(
                "ClusterabilityTrainerCallback: report_to has 'wandb' but there is no W&B run; "
                "clusterability is not logged to W&B."
            )
        else:
            sinks.append(WandbSink(wandb.run))
    if not sinks:
        sinks.append(_local_sink(args.output_dir or "."))
    return sinks
