"""``cluster-tracking demo``: clusterability tracked through a real training run, in under a minute.

Trains a small MLP (64-128-128-10) on scikit-learn's bundled handwritten digits (``load_digits``,
no download), measures its clusterability with a
:class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker` before training and after every
epoch, and logs everything to MLflow (:mod:`cluster_tracking.cli.demo_mlflow`): by default the
local SQLite store ``sqlite:///mlflow.db`` in the working directory (or ``MLFLOW_TRACKING_URI``),
plus a plain copy in ``./cluster-tracking-demo/<run id>/``. The run's experiment is tagged for
MLflow's model-training view, and the trained model is logged (so ``cluster-tracking compare
--experiment cluster-tracking-demo`` ranks the demo's runs). :mod:`cluster_tracking.cli.demo_output`
prints the result: the measured steps, the run's URL and the ``mlflow ui`` command that serves it.

torch and mlflow are imported only when the demo runs, so the CLI checks the tracking URI first
and a dead server is one line within seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster_tracking.cli.demo_mlflow import (
    EXPERIMENT_NAME,
    MLFLOW_UI_URL,
    import_mlflow,
    is_server,
    log_demo_params,
    log_model,
    open_experiment,
)
from cluster_tracking.errors import ConfigError
from cluster_tracking.report import Baseline, ClusterabilityReport

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cluster_tracking.tracking.tracker import ClusterabilityTracker

#: Where the demo logs when neither ``--tracking-uri`` nor ``MLFLOW_TRACKING_URI`` says otherwise.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass
class DemoRow:
    """One measured step of the demo: clusterability and the model's test accuracy."""

    step: int
    epoch: int | None
    ncut: float
    z_score: float | None
    p_value: float | None
    test_accuracy: float
    baseline: Baseline | None = None


@dataclass
class DemoResult:
    """What the demo did: where it logged and what it measured."""

    run_id: str
    tracking_uri: str
    experiment: str
    out_dir: Path
    rows: list[DemoRow] = field(default_factory=list)
    seconds: float = 0.0
    experiment_id: str = ""
    model_uri: str | None = None
    skipped_steps: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def report_html(self) -> Path:
        """The local copy of the run's self-contained HTML report (in the run's own folder)."""
        return self.out_dir / "clusterability" / "report.html"

    @property
    def run_url(self) -> str:
        """The run's page in the MLflow UI: on the tracking server, or for a local store on
        ``mlflow ui``'s default address (:func:`dashboard_command` starts it)."""
        base = self.tracking_uri.rstrip("/") if is_server(self.tracking_uri) else MLFLOW_UI_URL
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI the demo logs to: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
    :data:`DEFAULT_TRACKING_URI`."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def digits_mlp(seed: int = 0) -> nn.Sequential:
    """The demo's model: an MLP 64-128-128-10 (8x8 digit images in, 10 classes out)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float tensors in [0, 1]: ``x_train, y_train, x_test, y_test``."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def run_demo(
    *,
    epochs: int = 8,
    shuffles: int = 20,
    k: int = 12,
    seed: int = 0,
    tracking_uri: str | None = None,
    out_dir: str | os.PathLike[str] = "cluster-tracking-demo",
    batch_size: int = 32,
    learning_rate: float = 3e-3,
) -> DemoResult:
    """Train the digits MLP with the tracker and log to MLflow.

    Args:
        epochs: training epochs; clusterability is measured before training and after each one.
        shuffles: null networks per measurement.
        k: number of clusters.
        seed: seed of the data split, the initialisation, the batches and the tracker.
        tracking_uri: MLflow tracking URI; ``None``: ``MLFLOW_TRACKING_URI`` or
            :data:`DEFAULT_TRACKING_URI`.
        out_dir: folder of the local copies: this run's go to ``out_dir/<run id>/`` (a
            :class:`~cluster_tracking.tracking.sinks.LocalDirectorySink`), so runs never mix.
        batch_size, learning_rate: of the Adam training loop.

    Returns:
        The run id, where it logged, and one :class:`DemoRow` per measured step.

    Raises:
        ConfigError: a setting is out of range.
        SinkError: mlflow is not installed or the tracking store cannot be used.
        PlatformError: the tracking server does not answer within seconds, or MLflow would
            refuse the store (a file store without ``MLFLOW_ALLOW_FILE_STORE=true``).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}.")
    from cluster_tracking.integrations.tracking_uri import check_tracking_uri

    started = time.perf_counter()
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri, existing=False)  # a malformed, silent or refused store: in seconds
    from cluster_tracking.tracking.tracker import ClusterabilityTracker

    mlflow = import_mlflow()
    ClusterabilityTracker(k=k, shuffles=shuffles, seed=seed)  # checks the settings, starts nothing
    training = _DigitsTraining(seed, batch_size, learning_rate)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = open_experiment(mlflow, uri)
        notes: list[str] = []
        with mlflow.start_run(run_name="digits-mlp") as run:
            run_dir = Path(out_dir) / run.info.run_id
            log_demo_params(
                mlflow, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate
            )
            tracker = _tracker(run_dir, run.info.run_id, k=k, shuffles=shuffles, seed=seed)
            with tracker:
                training.run(epochs, tracker, mlflow)
            model_uri = log_model(mlflow, training.model, training.x_test[:2].numpy(), notes)
        return DemoResult(
            run_id=run.info.run_id,
            tracking_uri=uri,
            experiment=EXPERIMENT_NAME,
            out_dir=run_dir,
            rows=[training.row(report) for report in tracker.reports],
            seconds=time.perf_counter() - started,
            experiment_id=experiment.experiment_id,
            model_uri=model_uri,
            skipped_steps=tracker.skipped_steps,
            notes=notes,
        )
    finally:
        mlflow.set_tracking_uri(previous_uri)


def _tracker(
    run_dir: Path, run_id: str, *, k: int, shuffles: int, seed: int
) -> ClusterabilityTracker:
    """The demo's tracker: every epoch measured (queued, even on a slow machine), logged to the
    active MLflow run and copied to ``run_dir``."""
    # The demo is MLflow's: imported here, so the core package never needs it.
    from cluster_tracking.integrations.mlflow import MlflowSink
    from cluster_tracking.tracking.sinks import LocalDirectorySink
    from cluster_tracking.tracking.tracker import ClusterabilityTracker

    return ClusterabilityTracker(
        [MlflowSink(), LocalDirectorySink(run_dir, run_id=run_id)],
        every_n_epochs=1,
        k=k,
        shuffles=shuffles,
        seed=seed,
        on_backlog="queue",  # the demo wants every epoch, even on a slow machine
    )


class _DigitsTraining:
    """The digits MLP, its data and its Adam optimiser, and what training measured: the test
    accuracy and the epoch of every step."""

    def __init__(self, seed: int, batch_size: int, learning_rate: float) -> None:
        import torch

        self.x_train, self.y_train, self.x_test, self.y_test = load_digits_split(seed)
        self.model = digits_mlp(seed)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.accuracies: dict[int, float] = {}
        self.epoch_of: dict[int, int | None] = {0: None}

    def test_accuracy(self) -> float:
        """The share of the test images the model classifies right."""
        import torch

        with torch.no_grad():
            return float((self.model(self.x_test).argmax(dim=1) == self.y_test).float().mean())

    def run(self, epochs: int, tracker: ClusterabilityTracker, mlflow: Any) -> None:
        """Measure the untrained network (step 0), then train ``epochs`` epochs, logging the
        test accuracy and training loss and handing the model to ``tracker`` after each."""
        import torch
        from torch import nn

        self.accuracies[0] = self.test_accuracy()
        mlflow.log_metric("test_accuracy", self.accuracies[0], step=0)
        tracker.checkpoint(self.model, 0)  # the untrained network, for reference
        step = 0
        for epoch in range(epochs):
            self.model.train()
            order = torch.randperm(len(self.y_train), generator=self.generator)
            for batch in order.split(self.batch_size):
                loss = nn.functional.cross_entropy(
                    self.model(self.x_train[batch]), self.y_train[batch]
                )
                self.optimiser.zero_grad()
                loss.backward()
                self.optimiser.step()
                step += 1
            self.model.eval()
            self.accuracies[step] = self.test_accuracy()
            self.epoch_of[step] = epoch
            mlflow.log_metric("test_accuracy", self.accuracies[step], step=step)
            mlflow.log_metric("train_loss", loss.item(), step=step)
            tracker.epoch_end(self.model, epoch, step=step)

    def row(self, report: ClusterabilityReport) -> DemoRow:
        """The demo's table row of a measured step."""
        step = int(report.step or 0)
        baseline = report.baseline
        return DemoRow(
            step=step,
            epoch=self.epoch_of.get(step),
            ncut=report.ncut,
            z_score=baseline.z_score if baseline else None,
            p_value=baseline.p_value if baseline else None,
            test_accuracy=self.accuracies.get(step, float("nan")),
            baseline=baseline,
        )
