"""``cluster-tracking demo``: clusterability tracked through a real training run, in under a minute.

Trains a small MLP (64-128-128-10) on scikit-learn's bundled handwritten digits (``load_digits``,
no download), measures its clusterability with a
:class:`~cluster_tracking.tracker.ClusterabilityTracker` before training and after every epoch, and
logs everything to MLflow: by default the local SQLite store ``sqlite:///mlflow.db`` in the working
directory (or ``MLFLOW_TRACKING_URI``), plus a plain copy in ``./cluster-tracking-demo/``. Open
the dashboard with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import ConfigError
from cluster_tracking.report import ClusterabilityReport

#: Where the demo logs when neither ``--tracking-uri`` nor ``MLFLOW_TRACKING_URI`` says otherwise.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: MLflow experiment of the demo's runs.
EXPERIMENT_NAME = "cluster-tracking-demo"


@dataclass
class DemoRow:
    """One measured step of the demo: clusterability and the model's test accuracy."""

    step: int
    epoch: int | None
    ncut: float
    z_score: float | None
    p_value: float | None
    test_accuracy: float


@dataclass
class DemoResult:
    """What the demo did: where it logged and what it measured."""

    run_id: str
    tracking_uri: str
    experiment: str
    out_dir: Path
    rows: list[DemoRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def report_html(self) -> Path:
        """The local copy of the run's self-contained HTML report."""
        return self.out_dir / "clusterability" / "report.html"


def digits_mlp(seed: int = 0) -> nn.Sequential:
    """The demo's model: an MLP 64-128-128-10 (8x8 digit images in, 10 classes out)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float tensors in [0, 1]: ``x_train, y_train, x_test, y_test``."""
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
        out_dir: folder of the local copy (a :class:`~cluster_tracking.sinks.LocalDirectorySink`).
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
    # The demo is MLflow's: imported here, so the core package never needs it.
    from cluster_tracking.integrations.mlflow import INSTALL_HINT, MlflowSink
    from cluster_tracking.sinks import LocalDirectorySink, SinkError
    from cluster_tracking.tracker import ClusterabilityTracker

    try:
        import mlflow
    except ImportError as error:
        raise SinkError(
            f"the demo logs to MLflow, which is not installed: {INSTALL_HINT}"
        ) from error
    ClusterabilityTracker(k=k, shuffles=shuffles, seed=seed)  # checks the settings, starts nothing
    started = time.perf_counter()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    from cluster_tracking.loading import check_tracking_uri

    check_tracking_uri(uri, existing=False)  # a malformed, silent or refused store: in seconds
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
            mlflow.set_experiment(EXPERIMENT_NAME)
        except Exception as error:
            raise SinkError(
                f"cannot use the MLflow tracking store {uri!r}: {str(error).splitlines()[0]}"
            ) from error
        accuracies: dict[int, float] = {}
        epoch_of: dict[int, int | None] = {0: None}
        with mlflow.start_run(run_name="digits-mlp") as run:
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
                [MlflowSink(), LocalDirectorySink(out_dir)],
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
        rows = [_row(report, epoch_of, accuracies) for report in tracker.reports]
        return DemoResult(
            run_id=run.info.run_id,
            tracking_uri=uri,
            experiment=EXPERIMENT_NAME,
            out_dir=Path(out_dir),
            rows=rows,
            seconds=time.perf_counter() - started,
        )
    finally:
        mlflow.set_tracking_uri(previous_uri)


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
    )


def dashboard_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on ``tracking_uri``."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def print_demo_result(result: DemoResult) -> None:
    """Print the demo's table (step, n-cut, z, p, test accuracy) and where to look next."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Clusterability of an MLP learning digits (k = 12 clusters)")
    table.add_column("step", justify="right")
    table.add_column("epoch", justify="right")
    table.add_column("n-cut", justify="right")
    table.add_column("z", justify="right")
    table.add_column("p", justify="right")
    table.add_column("test acc.", justify="right")
    for row in result.rows:
        table.add_row(
            str(row.step),
            "init" if row.epoch is None else str(row.epoch + 1),
            f"{row.ncut:.3f}",
            "—" if row.z_score is None else f"{row.z_score:+.2f}",
            "—" if row.p_value is None else f"{row.p_value:.3f}",
            f"{row.test_accuracy:.1%}",
        )
    console.print(table)
    console.print(
        "Lower n-cut = more clusterable; z < 0 and small p: more clusterable than the "
        "weight-shuffled networks."
    )
    console.print(
        f"MLflow run [bold]{result.run_id}[/bold] in experiment '{result.experiment}' at "
        f"{result.tracking_uri} ({result.seconds:.0f} s)."
    )
    console.print(f"Dashboard: [bold]{dashboard_command(result.tracking_uri)}[/bold]")
    console.print(f"Report:    {result.report_html}")
