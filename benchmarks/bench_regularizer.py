"""What the spectral regulariser costs a training step, by solver.

Trains, in one process and on one thread, the paper's MLP 784-256-256-256-256-10 (1,818 neurons),
a wider MLP 784-1024-1024-1024-10 (3,866 neurons) and a small CNN (channels 1-32-32-64-64, global
average pooling, a Linear head; 12x12 inputs) on random data, batch 128, with SGD (lr 0.05,
momentum 0.9) and with Adam (lr 1e-3), and measures:

* the median time of a training step (forward, backward, optimiser step) without the
  regulariser (the reference),
* for ``SpectralRegularizer(model, k=12, every_n_steps=1)`` with ``solver="tracking"`` (the fast
  path, what ``"auto"`` takes above 150 nodes) and ``solver="iterative"`` (a full warm-started
  solve to its tolerance at every call): the time the regulariser adds to a training step (its
  evaluation, forward and backward, as ``loss = criterion(...) + reg()`` makes it), as a ratio of
  the reference step, and the operator applications per evaluation;
* the same for ``solver="tracking", every_n_steps=4`` (rescaled, the default) as ``tracking/4``:
  the time it adds to a step on average; its evaluations are far enough apart that the tracking
  step may need its widening step or a fallback (counted in the applications).

Configurations are interleaved within each repeat, so a busy moment of the machine hits all alike;
every number is the median over the repeats of the median over a repeat's steps. For
``tracking/4`` (and the reference it is compared with) it is the median over a repeat's runs of 4
consecutive steps, of their mean: any 4 consecutive steps hold exactly one evaluation, and a median
over them keeps a busy moment of the machine out without leaving the evaluations out. Wall-clock
numbers are for people to read; no test asserts on them.

    python -m benchmarks.bench_regularizer [--steps 40] [--repeats 5] [--k 12]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.networks import cnn, mlp, paper_mlp
from cluster_tracking.promote.regularizer import SpectralRegularizer

BATCH = 128
#: name: (solver, every_n_steps)
CONFIGS: dict[str, tuple[str, int]] = {
    "tracking": ("tracking", 1),
    "iterative": ("iterative", 1),
    "tracking/4": ("tracking", 4),
}


class SmallCNN(nn.Module):
    """``benchmarks.networks.cnn`` (channels 1-32-32-64-64, 3x3 kernels), global average pooling
    and a Linear head to 10 classes (203 nodes: ``"auto"`` tracks it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = cnn()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MLP 784-256x4-10": (paper_mlp, (784,)),
    "MLP 784-1024x3-10": (lambda: mlp([784, 1024, 1024, 1024, 10]), (784,)),
    "CNN 1-32-32-64-64 + head": (SmallCNN, (1, 12, 12)),
}
OPTIMISERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SGD": lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    "Adam": lambda model: torch.optim.Adam(model.parameters(), lr=1e-3),
}


@dataclass
class Run:
    """One configuration's training run: a fresh model, optimiser and data stream."""

    model: nn.Module
    optimiser: torch.optim.Optimizer
    regulariser: SpectralRegularizer | None
    inputs: torch.Tensor
    labels: torch.Tensor
    generator: torch.Generator

    def step(self) -> None:
        batch = torch.randint(0, len(self.labels), (BATCH,), generator=self.generator)
        loss = nn.functional.cross_entropy(self.model(self.inputs[batch]), self.labels[batch])
        if self.regulariser is not None:
            loss = loss + self.regulariser()
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()


def make_run(network: str, optimiser: str, config: tuple[str, int] | None, k: int) -> Run:
    build, shape = NETWORKS[network]
    torch.manual_seed(0)
    model = build()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((1024, *shape), generator=generator)
    labels = torch.randint(0, 10, (1024,), generator=generator)
    regulariser = None
    if config is not None:
        solver, every = config
        regulariser = SpectralRegularizer(
            model,
            k=k,
            weight=0.1,
            solver=solver,  # type: ignore[arg-type]
            every_n_steps=every,
        )
    return Run(model, OPTIMISERS[optimiser](model), regulariser, inputs, labels, generator)


def timed(function: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


@dataclass
class Row:
    step: float  # seconds of a step without the regulariser
    extra: float  # seconds the regulariser adds to a step
    applies: float  # operator applications per evaluation


def measure(network: str, optimiser: str, args: argparse.Namespace) -> dict[str, Row]:
    """Each configuration's row for one network and optimiser, against a run without
    regulariser."""
    runs = {"none": make_run(network, optimiser, None, args.k)}
    runs.update({name: make_run(network, optimiser, CONFIGS[name], args.k) for name in CONFIGS})
    for run in runs.values():  # allocator, kernels, the cold solve, Adam's first large step
        timed(run.step, args.warmup)
    times: dict[str, list[list[float]]] = {name: [] for name in runs}  # [repeat][step]
    applies: dict[str, list[int]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append([])
            for _ in range(args.steps):
                times[name][-1] += timed(run.step, 1)
                regulariser = run.regulariser
                if regulariser is not None and (regulariser.calls - 1) % CONFIGS[name][1] == 0:
                    applies[name].append(regulariser.last_solver_applies)  # (an evaluation)
    rows = {}
    for name, (_, every) in CONFIGS.items():
        steps = {
            key: [_typical_step(repeat, every) for repeat in times[key]] for key in (name, "none")
        }
        rows[name] = Row(
            statistics.median(steps["none"]),
            statistics.median(
                with_reg - plain for with_reg, plain in zip(steps[name], steps["none"], strict=True)
            ),
            statistics.mean(applies[name]),
        )
    return rows


def _typical_step(times: list[float], every: int) -> float:
    """The median over runs of ``every`` consecutive steps of their mean step time (the median
    step for ``every=1``)."""
    return statistics.median(
        sum(times[start : start + every]) / every
        for start in range(0, len(times) - every + 1, every)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before the first")
    parser.add_argument("--k", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(
        f"k={args.k}, batch {BATCH}, torch threads: {torch.get_num_threads()}; "
        f"median over {args.repeats} repeats of the median over {args.steps} steps"
    )
    header = (
        f"{'network':<26} {'optimiser':<9} {'step ms':>8} {'solver':<11} {'+reg ms':>8} "
        f"{'ratio':>6} {'applies/eval':>13}"
    )
    print(header)
    print("-" * len(header))
    for network in NETWORKS:
        for optimiser in OPTIMISERS:
            for name, row in measure(network, optimiser, args).items():
                print(
                    f"{network:<26} {optimiser:<9} {1e3 * row.step:>8.2f} {name:<11} "
                    f"{1e3 * row.extra:>8.2f} {row.extra / row.step:>6.2f} {row.applies:>13.2f}"
                )
    print(
        "\nstep ms: a training step without the regulariser. +reg ms: what the regulariser adds "
        "to a step (median of the per-repeat differences); ratio = +reg / step. tracking/4: "
        "solver='tracking' with every_n_steps=4, per step on average (over runs of 4 steps). "
        "applies/eval: operator applications per evaluation (each one pass over every weight in "
        "each direction); 1 = the tracking step was accepted, 2 = it needed its widening step."
    )


if __name__ == "__main__":
    main()
