"""Track clusterability in a plain PyTorch training loop, logged to MLflow.

Run it as it is (about 15 seconds on a laptop; every due step, 0, 50, ..., 300, is measured):

    python examples/mlflow_training_loop.py

It logs to ``$MLFLOW_TRACKING_URI`` when set, else to ``./mlflow.db``; look at the run with

    mlflow ui --backend-store-uri sqlite:///mlflow.db

The metrics ``clusterability/ncut``, ``clusterability/z_score``, ``clusterability/p_value``, ... sit
next to the loss, and the run's artifacts hold ``clusterability/step-<step>/`` (report, heat map,
cluster composition) and ``clusterability/report.html``.
"""

from __future__ import annotations

import os

import mlflow
import torch
from torch import nn

from cluster_tracking.integrations.mlflow import MlflowSink
from cluster_tracking.report import format_ncut, format_null, format_p, format_z
from cluster_tracking.tracking.tracker import ClusterabilityTracker

STEPS = 300  # train steps 0..300
EVERY = 50  # measure at 0, 50, ..., 300


def make_data(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy task: 4 classes, each a noisy copy of its own random 16-dimensional prototype."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(4, 16, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    inputs = prototypes[labels] + 0.8 * torch.randn(n, 16, generator=generator)
    return inputs, labels


def main() -> None:
    if "MLFLOW_TRACKING_URI" not in os.environ:
        mlflow.set_tracking_uri("sqlite:///mlflow.db")
    mlflow.set_experiment("cluster-tracking-example")

    # A network this small trains fastest on one thread; on a machine whose cores are all busy
    # (the measuring process takes one), torch's default thread pool made this loop 3-36x slower
    # (its 301 steps took 6.1 s and 68.5 s on 2 busy cores, against 1.9 s on one thread).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inputs, labels = make_data()
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    with mlflow.start_run() as run:
        # Measure every 50 steps, 0, 50, ..., 300 (the last training step is on the schedule):
        # 8 clusters, 10 weight-shuffled networks as the null model.
        #
        # This toy loop trains its 301 steps in a few seconds, less than its 7 measurements
        # take, so the defaults would skip most due steps (the newest due step wins, and
        # measuring may take max_overhead=0.1 of the wall time). Here every due step is
        # measured: on_backlog="queue" with room for all 7 snapshots (max_pending=7; each one is
        # a CPU copy of the weights) keeps every one of them, and max_overhead=None measures
        # them back to back. In a real run of hours keep the defaults: the 10% budget protects
        # the training loop, and the dashboard follows the newest weights.
        tracker = ClusterabilityTracker(
            sinks=[MlflowSink()],
            every_n_steps=EVERY,
            k=8,
            shuffles=10,
            on_backlog="queue",
            max_pending=STEPS // EVERY + 1,
            max_overhead=None,
        )
        for step in range(STEPS + 1):
            batch = torch.randint(0, len(labels), (64,))
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step % EVERY == 0:
                mlflow.log_metric("loss", loss.item(), step=step)
            tracker.step(model, step)  # cheap; measures only when the schedule says so
        # Waits for pending measurements and logs the summary. Had training ended off the
        # schedule, close() would also measure the final weights (measure_final=True).
        tracker.close()

    print(f"MLflow run {run.info.run_id} at {mlflow.get_tracking_uri()}")
    for report in tracker.reports:
        baseline = report.baseline
        print(
            f"step {report.step:4d}  n-cut {format_ncut(report.ncut)}  "
            f"null {format_null(baseline)}  z {format_z(baseline.z_score if baseline else None)}"
            f"  p {format_p(baseline)}"
        )
    if tracker.skipped_steps:
        print(f"skipped (a measurement was still running): {tracker.skipped_steps}")


if __name__ == "__main__":
    main()
