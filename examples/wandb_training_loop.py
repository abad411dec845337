"""Track clusterability in a plain PyTorch loop and log it to Weights & Biases.

    python examples/wandb_training_loop.py

W&B runs offline unless ``WANDB_MODE`` says otherwise: everything is written under ``./wandb/``
(upload it later with ``wandb sync wandb/offline-run-*``). Set ``WANDB_MODE=online`` after
``wandb login`` to log to your workspace directly.

The model is a small MLP trained on two unrelated tasks at once (the parity of the first four
inputs and the sign of the sum of the last four), the kind of problem where the paper finds
networks becoming more clusterable than their shuffled versions (Filan et al. 2021, section 4).
In the run: ``clusterability/ncut``, ``clusterability/z_score``, ... against
``clusterability/step`` at steps 0, 1000, ..., 5000 and 5999 (the final weights); the cluster
table and the heat map, cluster matrix and composition images of each measured step (media panels
show them at the W&B step when the measurement arrived, and each image's caption names the
training step it shows); the partition artifact ``clusterability-partition-<run id>`` (versions
``step-0`` and ``step-5999``) and, at the end, the n-cut trajectory with the null model's band.
"""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")  # before wandb reads its settings

import torch
import wandb
from torch import nn

from cluster_tracking.integrations.wandb import WandbSink
from cluster_tracking.report import format_ncut, format_null, format_p, format_z
from cluster_tracking.tracking.tracker import ClusterabilityTracker

STEPS = 6000  # train steps 0..5999
EVERY = 1000  # measure at 0, 1000, ..., 5000; the final weights (5999) at close()
BATCH = 128


def two_tasks(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in {-1, 1}^8; targets: parity of inputs 0-3 and sign of the sum of inputs 4-7."""
    x = torch.randint(0, 2, (batch, 8), generator=generator).float() * 2 - 1
    parity = (x[:, :4] < 0).sum(dim=1) % 2
    majority = (x[:, 4:].sum(dim=1) > 0).long()
    return x, torch.stack([parity, majority], dim=1).float()


def main() -> None:
    # A network this small trains fastest on one thread; on a machine whose cores are all busy
    # (the measuring process takes one), torch's default thread pool made this loop 7-22x slower
    # (600 of its steps took 8.2 s and 24.6 s on 2 busy cores, against 1.1 s on one thread).
    torch.set_num_threads(1)
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
    # Measure at the due steps 0, 1000, ..., 5000 and, at close(), the final weights of step 5999
    # (measure_final=True, the default): 4 clusters, 20 weight-shuffled networks as the null model.
    #
    # This toy loop trains in seconds, not much longer than its 7 measurements take (the
    # measuring process's start and the plots are most of that), so the defaults would skip due
    # steps: the newest due step wins, and measuring may take max_overhead=0.1 of the wall time,
    # its process's start included. Here
    # every due step is measured: on_backlog="queue" with room for all 6 due snapshots
    # (max_pending=6; each one is a CPU copy of the weights) keeps every one of them, and
    # max_overhead=None measures them back to back. In a real run of hours keep the defaults:
    # the 10% budget protects the training loop, and the dashboard follows the newest weights.
    tracker = ClusterabilityTracker(
        sinks=[WandbSink(run)],
        every_n_steps=EVERY,
        k=4,
        shuffles=20,
        seed=0,
        on_backlog="queue",
        max_pending=len(range(0, STEPS, EVERY)),
        max_overhead=None,
    )
    try:
        for step in range(STEPS):
            x, y = two_tasks(BATCH, generator)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            run.log({"train/loss": loss.item()}, step=step)  # your own logging, unchanged
            tracker.step(model, step)  # cheap; measures in the background when due
    finally:
        # Measures the final weights (step 5999, off the schedule), waits for the measurements
        # and logs the summary: before finish().
        tracker.close()
        run.finish()

    for report in tracker.reports:
        baseline = report.baseline
        print(
            f"step {report.step:4d}  n-cut {format_ncut(report.ncut)}  "
            f"null {format_null(baseline)}  z {format_z(baseline.z_score if baseline else None)}"
            f"  p {format_p(baseline)}"
        )
    print(f"W&B run {run.id} written to {run.dir}")


if __name__ == "__main__":
    main()
