"""Track clusterability in a Lightning ``Trainer``, logged into its ``MLFlowLogger`` run.

Run it as it is (well under a minute on a laptop, most of it importing Lightning):

    python examples/lightning_mlflow.py

It logs to ``$MLFLOW_TRACKING_URI`` when set, else to ``./mlflow.db``; look at the run with

    mlflow ui --backend-store-uri sqlite:///mlflow.db

The run of the experiment ``cluster-tracking-lightning`` holds Lightning's ``train_loss`` and, at
the global step each epoch ended on, ``clusterability/ncut``, ``clusterability/z_score``,
``clusterability/p_value``, ...; its artifacts hold ``clusterability/step-<step>/`` (report, heat
map, cluster composition) and, from the end of ``fit``, ``clusterability/report.html``.
"""

from __future__ import annotations

import os
import tempfile

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cluster_tracking.integrations.lightning import ClusterabilityCallback


def make_data(n: int = 2048, seed: int = 0) -> TensorDataset:
    """A toy task: 4 classes, each a noisy copy of its own random 16-dimensional prototype."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(4, 16, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    inputs = prototypes[labels] + 0.8 * torch.randn(n, 16, generator=generator)
    return TensorDataset(inputs, labels)


class Classifier(L.LightningModule):
    """An MLP classifier; the network itself is ``self.model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main() -> None:
    torch.manual_seed(0)
    logger = MLFlowLogger(
        experiment_name="cluster-tracking-lightning",
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
    )
    # After every epoch: 8 clusters, 10 weight-shuffled networks as the null model. module="model"
    # measures the network inside the LightningModule (its layers are then "0", "2", "4"). The
    # epochs here take less time than a measurement: on_backlog="queue" keeps every epoch's
    # snapshot (the default "skip" drops a snapshot while the previous one is still measured).
    clusterability = ClusterabilityCallback(
        every_n_epochs=1, module="model", k=8, shuffles=10, on_backlog="queue"
    )
    with tempfile.TemporaryDirectory() as checkpoints:
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=5,
            logger=logger,
            callbacks=[clusterability],
            default_root_dir=checkpoints,
            enable_checkpointing=False,
            enable_progress_bar=False,
            log_every_n_steps=8,
        )
        trainer.fit(Classifier(), DataLoader(make_data(), batch_size=64, shuffle=True))

    print(f"MLflow run {logger.run_id} at {logger.experiment.tracking_uri}")
    for report in clusterability.reports:
        baseline = report.baseline
        z = f"{baseline.z_score:+.2f}" if baseline and baseline.z_score is not None else "n/a"
        p = f"{baseline.p_value:.3f}" if baseline else "n/a"
        print(f"step {report.step:4d}  n-cut {report.ncut:.3f}  z {z}  p {p}")


if __name__ == "__main__":
    main()
