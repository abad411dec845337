"""Track clusterability in a plain PyTorch loop and log it to Weights & Biases.

    python examples/wandb_training_loop.py

W&B runs offline unless ``WANDB_MODE`` says otherwise: everything is written under ``./wandb/``
(upload it later with ``wandb sync wandb/offline-run-*``). Set ``WANDB_MODE=online`` after
``wandb login`` to log to your workspace directly.

The model is a small MLP trained on two unrelated tasks at once (the parity of the first four
inputs and the sign of the sum of the last four), the kind of problem where the paper finds
networks becoming more clusterable than their shuffled versions (Filan et al. 2021, section 4).
In the run: ``clusterability/ncut`` and ``clusterability/z_score`` against
``clusterability/step``, the cluster table and plots at each measured step, the partition
artifact ``clusterability-partition-<run id>`` (one version per step) and, at the end, the n-cut
trajectory with the null model's band.
"""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")  # before wandb reads its settings

import torch
import wandb
from torch import nn

from cluster_tracking.integrations.wandb import WandbSink
from cluster_tracking.tracker import ClusterabilityTracker

STEPS = 600
BATCH = 128


def two_tasks(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in {-1, 1}^8; targets: parity of inputs 0-3 and sign of the sum of inputs 4-7."""
    x = torch.randint(0, 2, (batch, 8), generator=generator).float() * 2 - 1
    parity = (x[:, :4] < 0).sum(dim=1) % 2
    majority = (x[:, 4:].sum(dim=1) > 0).long()
    return x, torch.stack([parity, majority], dim=1).float()


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    run = wandb.init(
        project="cluster-tracking-example",
        config={"steps": STEPS, "batch": BATCH, "lr": 3e-3, "hidden": 64},
    )
    tracker = ClusterabilityTracker(
        sinks=[WandbSink(run)],
        every_n_steps=100,
        k=4,
        shuffles=20,
        seed=0,
    )
    try:
        for step in range(STEPS):
            x, y = two_tasks(BATCH, generator)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            run.log({"train/loss": loss.item()}, step=step)  # your own logging, unchanged
            tracker.step(model, step)  # measures at steps 0, 100, ..., 500 in the background
    finally:
        tracker.close()  # waits for the measurements and logs the summary: before finish()
        run.finish()

    for report in tracker.reports:
        z = report.baseline.z_score if report.baseline is not None else None
        print(f"step {report.step:4d}  n-cut {report.ncut:.3f}  z-score {z}")
    print(f"W&B run {run.id} written to {run.dir}")


if __name__ == "__main__":
    main()
