"""What the clusterability hook costs a training loop.

Runs the same training loop (an MLP 784-256-256-10 on random data) in one process:

* without a tracker (the reference),
* with a tracker writing to a local directory,
* with a tracker whose sink sleeps on every call (a slow tracking server),
* with ``worker="thread"`` (measuring in the training process: it competes for the GIL),
* with ``layers=[...]`` (snapshot = CPU copy of the weights; the graph is built in the background),

and prints each loop's wall time as a ratio of the reference, the time the training thread spent
inside ``tracker.step()`` at due steps (the snapshot stall), and how long ``close()`` waited.

Then the two targets of the speed issue:

* the demo's digits MLP (64-128-128-10, scikit-learn's digits, Adam, batch 32) trained for some
  epochs with a measurement at every epoch end (k=12, 20 shuffles), against the same run without
  a tracker: wall time of the loop and of loop + ``close()``; and that target's CPU budget: the
  CPU time of one measurement (ours and the scikit-learn reference's) against an epoch's, and
  the least wall time any schedule of that work on this machine's cores can take;
* the snapshot stall at the due steps of the paper's MLP (784-256-256-256-256-10): the first due
  step traces the model with ``torch.fx``, later ones only copy the weights.

Wall-clock numbers are for people to read; no test asserts on them.

    python -m benchmarks.bench_hooks [--steps 600] [--every 100] [--shuffles 10] [--repeats 3]
                                       [--digits-epochs 20]
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.networks import paper_mlp
from cluster_tracking.graph import WeightGraph
from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.tracking.sinks import LocalDirectorySink
from cluster_tracking.tracking.tracker import ClusterabilityTracker


class SlowSink(LocalDirectorySink):
    """A local sink that first sleeps ``delay`` seconds on every call, like a slow server."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self.delay = delay

    def log_params(self, params: Mapping[str, Any]) -> None:
        time.sleep(self.delay)
        super().log_params(params)

    def log_report(
        self, report: ClusterabilityReport, step: int, artifacts: Mapping[str, Path]
    ) -> None:
        time.sleep(self.delay)
        super().log_report(report, step, artifacts)

    def log_summary(
        self, reports: Sequence[ClusterabilityReport], artifacts: Mapping[str, Path]
    ) -> None:
        time.sleep(self.delay)
        super().log_summary(reports, artifacts)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def train(
    steps: int, tracker: ClusterabilityTracker | None
) -> tuple[float, list[float], float, int]:
    """Loop seconds, seconds inside tracker.step() at each due step, close() seconds, #reports."""
    model = make_model()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 784, generator=generator)
    y = torch.randint(0, 10, (2048,), generator=generator)
    stalls: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        batch = torch.randint(0, len(y), (128,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if tracker is not None:
            tick = time.perf_counter()
            if tracker.step(model, step):
                stalls.append(time.perf_counter() - tick)
    loop = time.perf_counter() - started
    if tracker is None:
        return loop, stalls, 0.0, 0
    tick = time.perf_counter()
    tracker.close()
    return loop, stalls, time.perf_counter() - tick, len(tracker.reports)


def train_digits(epochs: int, tracker: ClusterabilityTracker | None) -> tuple[float, float]:
    """The demo's training loop: (loop seconds, loop + close() seconds)."""
    from cluster_tracking.cli.demo import digits_mlp, load_digits_split

    x_train, y_train, _, _ = load_digits_split(0)
    model = digits_mlp(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for epoch in range(epochs):
        for batch in torch.randperm(len(y_train), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if tracker is not None:
            tracker.epoch_end(model, epoch)
    loop = time.perf_counter() - started
    if tracker is not None:
        tracker.close()
    return loop, time.perf_counter() - started


def paper_mlp_stalls(due_steps: int) -> list[float]:
    """Seconds inside tracker.step() at each due step of the paper's MLP (SGD, batch 128)."""
    model = paper_mlp()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = ClusterabilityTracker(every_n_steps=20, k=12, shuffles=0, plots=False)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    stalls = []
    for step in range(20 * due_steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        tick = time.perf_counter()
        if tracker.step(model, step):
            stalls.append(time.perf_counter() - tick)
    tracker.close()
    return stalls


def cpu_seconds(function: Callable[[], object]) -> float:
    """CPU time (user + system) this process spends in ``function()``."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    function()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def reference_measurement(graph: WeightGraph, shuffles: int) -> None:
    """The paper's pipeline on the graph and ``shuffles`` layer shuffles of it, one thread."""
    from benchmarks.reference import as_int32_csr, reference_labels
    from cluster_tracking import ncut, nulls

    rng = np.random.default_rng(0)
    graphs = [graph] + [
        graph.with_weights(nulls.shuffle_weights(graph.weights(), "layer", rng))
        for _ in range(shuffles)
    ]
    for seed, null in enumerate(graphs):
        ncut(null, reference_labels(as_int32_csr(null.adjacency), 12, seed))


def digits_cpu_budget(epochs: int, repeats: int) -> None:
    """What the digits target asks of the CPU: the work of one measurement (CPU seconds, one
    thread, in this process) against the epoch's, and the least wall time any schedule of that
    work on this machine's cores can take."""
    from cluster_tracking import measure
    from cluster_tracking.cli.demo import digits_mlp
    from cluster_tracking.graph import weight_graph

    graph = weight_graph(digits_mlp(0))
    measure(graph, k=12, shuffles=20, n_jobs=1, seed=0)  # warm-up
    one = statistics.median(
        cpu_seconds(functools.partial(measure, graph, k=12, shuffles=20, n_jobs=1, seed=seed))
        for seed in range(repeats)
    )
    reference = cpu_seconds(functools.partial(reference_measurement, graph, 20))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loop's own work, without OpenMP threads spinning
    try:
        loop_cpu = statistics.median(
            cpu_seconds(lambda: train_digits(epochs, None)) for _ in range(repeats)
        )
        loop_wall = min(train_digits(epochs, None)[0] for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    bound = max(loop_wall, (loop_cpu + epochs * one) / cores)
    allowed = max(0.0, (1.1 * loop_wall * cores - loop_cpu) / epochs)
    print(
        f"CPU budget of that target: one measurement (330 nodes, 21 partitions) takes "
        f"{1000 * one:.0f} ms of CPU (the scikit-learn reference: {1000 * reference:.0f} ms), "
        f"an epoch {1000 * loop_cpu / epochs:.0f} ms (one thread, "
        f"{1000 * loop_wall / epochs:.0f} ms wall); {epochs} measurements and the loop need "
        f"{loop_cpu + epochs * one:.2f} CPU s, so on {cores} cores no schedule finishes in under "
        f"{bound:.2f} s = {bound / loop_wall:.2f}x the loop's wall time. 1.10x would need a "
        f"measurement of at most {1000 * allowed:.0f} ms of CPU, with the loop never slowed."
    )


def issue_targets(epochs: int, repeats: int) -> None:
    train_digits(1, None)  # warm-up
    without: list[tuple[float, float]] = []
    with_tracker: list[tuple[float, float]] = []
    reports = 0
    for _ in range(repeats):  # interleaved
        without.append(train_digits(epochs, None))
        tracker = ClusterabilityTracker(every_n_epochs=1, k=12, shuffles=20, plots=False)
        with_tracker.append(train_digits(epochs, tracker))
        reports = len(tracker.reports)
    loop0 = statistics.median(run[0] for run in without)
    loop1 = statistics.median(run[0] for run in with_tracker)
    total1 = statistics.median(run[1] for run in with_tracker)
    print(
        f"\ndigits MLP 64-128-128-10, {epochs} epochs, measured every epoch (k=12, 20 shuffles), "
        f"median of {repeats}: {loop0:.2f} s without a tracker, {loop1:.2f} s with "
        f"({loop1 / loop0:.3f}x; {total1:.2f} s = {total1 / loop0:.3f}x with close()), "
        f"{reports} of {epochs} epochs measured (target: <= 1.10x)"
    )
    digits_cpu_budget(epochs, repeats)
    stalls = paper_mlp_stalls(8)
    later = stalls[1:]
    print(
        f"paper MLP 784-256x4-10 snapshot stall: first due step {1000 * stalls[0]:.1f} ms "
        f"(torch.fx trace), later due steps median {1000 * statistics.median(later):.1f} ms, "
        f"max {1000 * max(later):.1f} ms (target: < 20 ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--shuffles", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sink-delay", type=float, default=2.0)
    parser.add_argument("--digits-epochs", type=int, default=20)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-hooks-"))
    options: dict[str, Any] = {"every_n_steps": args.every, "k": 12, "shuffles": args.shuffles}

    configs: dict[str, Callable[[int], ClusterabilityTracker | None]] = {
        "no tracker (reference)": lambda i: None,
        "tracker, local sink": lambda i: ClusterabilityTracker(
            [LocalDirectorySink(workdir / f"local-{i}")], **options
        ),
        f"tracker, sink sleeping {args.sink_delay:g} s": lambda i: ClusterabilityTracker(
            [SlowSink(workdir / f"slow-{i}", args.sink_delay)], **options
        ),
        "tracker, worker='thread' (same process)": lambda i: ClusterabilityTracker(
            [LocalDirectorySink(workdir / f"thread-{i}")], worker="thread", **options
        ),
        "tracker, layers=[...] (copy snapshot)": lambda i: ClusterabilityTracker(
            [LocalDirectorySink(workdir / f"layers-{i}")], layers=["0", "2", "4"], **options
        ),
    }
    train(50, None)  # warm-up: allocator, kernels
    all_runs: dict[str, list[tuple[float, list[float], float, int]]] = {
        name: [] for name in configs
    }
    for i in range(args.repeats):  # interleaved, so a busy moment of the machine hits all alike
        for name, make in configs.items():
            all_runs[name].append(train(args.steps, make(i)))
    results: dict[str, tuple[float, list[float], float, int]] = {}
    for name, runs in all_runs.items():
        best = min(runs, key=lambda run: run[0])
        stalls = [stall for run in runs for stall in run[1]]
        results[name] = (best[0], stalls, statistics.median(run[2] for run in runs), best[3])

    reference = results["no tracker (reference)"][0]
    print(
        f"{args.steps} steps, measuring every {args.every} (k=12, shuffles={args.shuffles}), "
        f"best of {args.repeats}; torch threads: {torch.get_num_threads()}"
    )
    header = (
        f"{'configuration':<40} {'loop s':>8} {'ratio':>7} {'stall ms (median/max)':>22} "
        f"{'close s':>8} {'reports':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, (loop, stalls, close, reports) in results.items():
        stall = (
            f"{1000 * statistics.median(stalls):.1f} / {1000 * max(stalls):.1f}" if stalls else "-"
        )
        print(
            f"{name:<40} {loop:>8.2f} {loop / reference:>7.2f} {stall:>22} {close:>8.2f} "
            f"{reports:>8}"
        )
    print(
        "\nratio: loop time / reference loop time (same process). stall: time the training "
        "thread spent in tracker.step() at a due step. close: time close() waited for pending "
        "measurements and sinks. Skipped steps (backlog) show as fewer reports."
    )
    issue_targets(args.digits_epochs, args.repeats)


if __name__ == "__main__":
    main()
