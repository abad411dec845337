"""The audit's time estimate (:func:`cluster_tracking.resources.limits.run_time_estimate`)
against real partitions on this machine.

For random Glorot MLPs of 0.5 to 16 million stored adjacency entries, times one spectral
partition (eigenvectors, then k-means restarts) per preset and k on one core (BLAS pinned to one
thread, as in a null worker), prints each beside its estimate (estimate / measured: below 1 the
estimate refuses later than needed, above 1 sooner), and the power law
``coefficient * stored ** exponent`` fitted to this machine's timings at k = 12 (the constants
of ``_PARTITION_COST`` in :mod:`cluster_tracking.resources.limits`).

    python -m benchmarks.bench_run_time [--repeats 2] [--largest 2000]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from cluster_tracking.graph import weight_graph
from cluster_tracking.resources.limits import partition_seconds
from cluster_tracking.spectral.partition import spectral_partitions


def mlp(widths: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        linear = nn.Linear(n_in, n_out)
        nn.init.xavier_uniform_(linear.weight)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--largest", type=int, default=2000, help="widest hidden layer")
    args = parser.parse_args()
    shapes = [
        (784, 256, 256, 10),
        (784, 256, 256, 256, 256, 10),
        (1000, 1000, 1000),
        (args.largest, args.largest, args.largest),
    ]
    rows = []
    with threadpool_limits(1):  # imports and first-call set-up are not a partition's cost
        for preset in ("default", "filan2021"):
            spectral_partitions(weight_graph(mlp((64, 128, 10))), [12], seed=0, preset=preset)
    header = ("graph", "preset", "k", "measured s", "estimate s", "ratio")
    print("{:>28} {:>9} {:>3} {:>10} {:>10} {:>6}".format(*header))
    for widths in shapes:
        graph = weight_graph(mlp(widths))
        stored = graph.adjacency.nnz
        for preset, k in itertools.product(("default", "filan2021"), (12, 24)):
            times = []
            with threadpool_limits(1):
                for repeat in range(args.repeats):
                    started = time.perf_counter()
                    spectral_partitions(graph, [k], seed=repeat, preset=preset)
                    times.append(time.perf_counter() - started)
            measured = min(times)
            estimate = partition_seconds(stored, [k], preset)
            if k == 12:
                rows.append((preset, stored, measured))
            name = "-".join(map(str, widths))
            print(
                f"{name:>28} {preset:>9} {k:>3} {measured:>10.3f} {estimate:>10.3f} "
                f"{estimate / measured:>6.2f}"
            )
    for preset in ("default", "filan2021"):
        picked = [(stored, seconds) for name, stored, seconds in rows if name == preset]
        slope, intercept = np.polyfit(
            np.log([p[0] for p in picked]), np.log([p[1] for p in picked]), 1
        )
        print(f"{preset}: seconds at k = 12 ~ {np.exp(intercept):.3g} * stored ** {slope:.2f}")


if __name__ == "__main__":
    main()
