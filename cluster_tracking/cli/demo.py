"""``cluster-tracking demo``: clusterability tracked through a real training run, in under a minute.

Trains a small MLP (64-128-128-10) on scikit-learn's bundled handwritten digits (``load_digits``,
no download), measures its clusterability with a
:class:`~cluster_tracking.tracking.tracker.ClusterabilityTracker` before training and after every
epoch, and
logs everything to MLflow: by default the local SQLite store ``sqlite:///mlflow.db`` in the working
directory (or ``MLFLOW_TRACKING_URI``), plus a plain copy in ``./cluster-tracking-demo/<run id>/``.
The run's experiment is tagged for MLflow's model-training view, the trained model is logged (so
``cluster-tracking compare --experiment cluster-tracking-demo`` ranks the demo's runs), and the
run's URL and the ``mlflow ui`` command that serves it are printed.

torch and mlflow are imported only when the demo runs, so the CLI checks the tracking URI first
and a dead server is one line within seconds.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster_tracking.errors import ConfigError
from cluster_tracking.report import (
    MISSING,
    P_FLOOR_NOTE,
    Baseline,
    ClusterabilityReport,
    format_diff,
    format_ncut,
    format_null,
    format_p,
    format_z,
    p_at_floor,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Where the demo logs when neither ``--tracking-uri`` nor ``MLFLOW_TRACKING_URI`` says otherwise.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: MLflow experiment of the demo's runs.
EXPERIMENT_NAME = "cluster-tracking-demo"
#: The experiment tag MLflow 3's UI reads to choose an experiment's view, and the value of its
#: model-training view (runs, metrics, artifacts) rather than the GenAI view (traces), which
#: MLflow 3 opens for an experiment without it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Name of the trained model the demo logs (an MLflow 3 logged model, torch.export format).
MODEL_NAME = "digits-mlp"
#: Where ``mlflow ui`` serves by default.
MLFLOW_UI_URL = "http://127.0.0.1:5000"


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
        base = self.tracking_uri.rstrip("/") if _is_server(self.tracking_uri) else MLFLOW_UI_URL
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
    import torch
    from torch import nn

    from cluster_tracking.errors import SinkError

    # The demo is MLflow's: imported here, so the core package never needs it.
    from cluster_tracking.integrations.mlflow import INSTALL_HINT, MlflowSink
    from cluster_tracking.tracking.sinks import LocalDirectorySink
    from cluster_tracking.tracking.tracker import ClusterabilityTracker

    try:
        import mlflow
    except ImportError as error:
        raise SinkError(
            f"the demo logs to MLflow, which is not installed: {INSTALL_HINT}"
        ) from error
    ClusterabilityTracker(k=k, shuffles=shuffles, seed=seed)  # checks the settings, starts nothing
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    model = digits_mlp(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)

    def test_accuracy() -> float:
        with torch.no_grad():
            return float((model(x_test).argmax(dim=1) == y_test).float().mean())

    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        try:
            experiment = mlflow.set_experiment(EXPERIMENT_NAME)
            mlflow.MlflowClient().set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        except Exception as error:
            raise SinkError(
                f"cannot use the MLflow tracking store {uri!r}: {str(error).splitlines()[0]}"
            ) from error
        accuracies: dict[int, float] = {}
        epoch_of: dict[int, int | None] = {0: None}
        notes: list[str] = []
        model_uri: str | None = None
        with mlflow.start_run(run_name="digits-mlp") as run:
            run_dir = Path(out_dir) / run.info.run_id
            mlflow.log_params(
                {
                    "demo.model": "MLP 64-128-128-10",
                    "demo.dataset": "sklearn load_digits",
                    "demo.epochs": epochs,
                    "demo.batch_size": batch_size,
                    "demo.learning_rate": learning_rate,
                }
            )
            tracker = ClusterabilityTracker(
                [MlflowSink(), LocalDirectorySink(run_dir, run_id=run.info.run_id)],
                every_n_epochs=1,
                k=k,
                shuffles=shuffles,
                seed=seed,
                on_backlog="queue",  # the demo wants every epoch, even on a slow machine
            )
            with tracker:
                accuracies[0] = test_accuracy()
                mlflow.log_metric("test_accuracy", accuracies[0], step=0)
                tracker.checkpoint(model, 0)  # the untrained network, for reference
                step = 0
                for epoch in range(epochs):
                    model.train()
                    for batch in torch.randperm(len(y_train), generator=generator).split(
                        batch_size
                    ):
                        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                        optimiser.zero_grad()
                        loss.backward()
                        optimiser.step()
                        step += 1
                    model.eval()
                    accuracies[step] = test_accuracy()
                    epoch_of[step] = epoch
                    mlflow.log_metric("test_accuracy", accuracies[step], step=step)
                    mlflow.log_metric("train_loss", loss.item(), step=step)
                    tracker.epoch_end(model, epoch, step=step)
            model_uri = _log_model(mlflow, model, x_test[:2].numpy(), notes)
        rows = [_row(report, epoch_of, accuracies) for report in tracker.reports]
        return DemoResult(
            run_id=run.info.run_id,
            tracking_uri=uri,
            experiment=EXPERIMENT_NAME,
            out_dir=run_dir,
            rows=rows,
            seconds=time.perf_counter() - started,
            experiment_id=experiment.experiment_id,
            model_uri=model_uri,
            skipped_steps=tracker.skipped_steps,
            notes=notes,
        )
    finally:
        mlflow.set_tracking_uri(previous_uri)


def _log_model(mlflow: Any, model: nn.Module, example: np.ndarray, notes: list[str]) -> str | None:
    """Log the trained model to the active run (an MLflow 3 logged model, in torch.export form:
    no pickle), so that ``compare --experiment`` finds it; its URI, or ``None`` with a note when
    MLflow refuses it (the run and its clusterability are still complete)."""
    try:
        info = mlflow.pytorch.log_model(
            model, name=MODEL_NAME, input_example=example, pip_requirements=["torch"]
        )
    except Exception as error:
        text = str(error).strip().splitlines()
        notes.append(
            f"the trained model was not logged ({type(error).__name__}: "
            f"{text[0] if text else 'no message'}); compare --experiment will skip this run."
        )
        return None
    model_id = getattr(info, "model_id", None)
    return f"models:/{model_id}" if model_id else str(info.model_uri)


def _row(
    report: ClusterabilityReport, epoch_of: dict[int, int | None], accuracies: dict[int, float]
) -> DemoRow:
    step = int(report.step or 0)
    baseline = report.baseline
    return DemoRow(
        step=step,
        epoch=epoch_of.get(step),
        ncut=report.ncut,
        z_score=baseline.z_score if baseline else None,
        p_value=baseline.p_value if baseline else None,
        test_accuracy=accuracies.get(step, float("nan")),
        baseline=baseline,
    )


def _is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def mlflow_executable() -> str:
    """The ``mlflow`` command of this environment (``.venv/bin/mlflow`` when run from the
    project), relative to the working directory when it lies inside it; else plain ``mlflow``."""
    found = Path(sys.executable).with_name("mlflow")
    if not found.exists():
        return "mlflow"
    try:
        return str(found.relative_to(Path.cwd()))
    except ValueError:
        return str(found)


def dashboard_command(tracking_uri: str) -> str:
    """How to see a run logged to ``tracking_uri`` in the MLflow UI: for a local store, the
    ``mlflow ui`` command (this environment's ``mlflow``) that serves it on
    :data:`MLFLOW_UI_URL`; for a tracking server, its address."""
    if _is_server(tracking_uri):
        return f"open {tracking_uri} in a browser"
    return f"{mlflow_executable()} ui --backend-store-uri {tracking_uri} --port 5000"


def print_demo_result(result: DemoResult) -> None:
    """Print the demo's table (step, n-cut, null, diff, z, p, test accuracy) and where to look
    next: the run's URL and the command that serves it."""
    from rich.table import Table

    from cluster_tracking.cli.app import console as make_console

    console = make_console()
    table = Table(title="Clusterability of an MLP learning digits (k = 12 clusters)")
    for name in ("step", "epoch", "n-cut", "null mean ± std", "diff (rel.)", "z", "p", "test acc."):
        table.add_column(name, justify="right")
    for row in result.rows:
        table.add_row(
            str(row.step),
            "init" if row.epoch is None else str(row.epoch + 1),
            format_ncut(row.ncut),
            format_null(row.baseline),
            format_diff(row.baseline),
            format_z(row.z_score),
            format_p(row.baseline) if row.baseline else MISSING,
            f"{row.test_accuracy:.1%}",
        )
    console.print(table)
    console.print(
        "Lower n-cut = more clusterable; z < 0 and small p: more clusterable than the "
        "weight-shuffled networks. diff = n-cut - null mean."
    )
    if any(row.baseline is not None and p_at_floor(row.baseline) for row in result.rows):
        console.print(P_FLOOR_NOTE)
    if result.skipped_steps:
        listed = ", ".join(str(step) for step in result.skipped_steps)
        console.print(f"Skipped steps (measuring could not keep up): {listed}.")
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    console.print(
        f"MLflow run [bold]{result.run_id}[/bold] in experiment '{result.experiment}' at "
        f"{result.tracking_uri} ({result.seconds:.0f} s).",
        markup=True,
    )
    if not _is_server(result.tracking_uri):
        console.print(f"Dashboard: [bold]{dashboard_command(result.tracking_uri)}[/bold]")
    console.print(f"Run:       {result.run_url}", markup=False)
    if result.model_uri:
        console.print(
            f"Model:     {result.model_uri} (cluster-tracking compare --experiment "
            f"{result.experiment} ranks the experiment's runs)",
            markup=False,
        )
    console.print(f"Report:    {result.report_html}", markup=False)
