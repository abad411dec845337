"""Promote clusterability in training: the spectral regulariser and the clusterable initialisation.

Filan et al. (2021), "Clusterability in Neural Networks", section "Promoting clusterability":
adding ``(lambda / k) * sum of the k smallest non-trivial eigenvalues of the normalised Laplacian``
of the weight graph to the loss, or initialising the network with planted modules, gives MLPs
that are much more clusterable than normally trained ones, at a small cost in accuracy.

This script trains a 64-128-128-10 ReLU MLP on scikit-learn's bundled digits data (8x8 images, 10
classes; no download) in four arms, several seeds each:

* ``control``: plain training;
* ``regulariser``: ``loss + SpectralRegularizer(model, k=12, weight=...)()``, with a
  ``ReLUWeightNormalizer`` after each optimiser step (so the penalty cannot be lowered by
  rescaling ReLU units);
* ``regulariser (n=4)``: the same with ``every_n_steps=4``: the penalty evaluated on every fourth
  step only, four times as strong there (lazy regularisation, a quarter of the cost);
* ``clusterable init``: ``clusterable_init_(model, modules=..., down_weight=...)`` after the
  default initialisation, then plain training;

then measures each trained network with ``cluster_tracking.measure`` (n-cut at k = 12 clusters
against ``layer``-shuffled networks) and prints a table: test accuracy, n-cut, the shuffled
networks' mean n-cut, the z-score (negative: more clusterable than chance) and the seconds the
training took.

    python examples/promote_clusterability.py             # 3 seeds, about 20 s
    python examples/promote_clusterability.py --quick     # 1 seed, fewer epochs and shuffles
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits
from torch import nn

import cluster_tracking as ct
from cluster_tracking.promote.clusterable_init import clusterable_init_
from cluster_tracking.promote.normalization import ReLUWeightNormalizer
from cluster_tracking.promote.regularizer import SpectralRegularizer

ARMS = ("control", "regulariser", "regulariser (n=4)", "clusterable init")
K = 12  # clusters measured, and non-trivial eigenvalues penalised (the paper's k)


@dataclass
class Settings:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    reg_weight: float = 5.0  # lambda: the penalty is (lambda / k) * sum of k eigenvalues
    modules: int = 12  # clusterable init: planted modules (>= 10, so each class gets its own)
    down_weight: float = 0.3  # clusterable init: factor of the weights between modules
    shuffles: int = 30  # shuffled networks in the null model


@dataclass
class Result:
    arm: str
    seed: int
    accuracy: float
    ncut: float
    null_mean: float
    z_score: float
    train_seconds: float  # the training loop alone
    seconds: float  # training and measuring


def load_data(
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits, standardised with the training split's statistics; 80 % train, 20 % test."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1.0  # +1: constant border pixels
    return (
        torch.tensor((x_train - mean) / std, dtype=torch.float32),
        torch.tensor(y_train),
        torch.tensor((x_test - mean) / std, dtype=torch.float32),
        torch.tensor(y_test),
    )


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def run(arm: str, seed: int, settings: Settings) -> Result:
    """Train one network of one arm and measure its clusterability."""
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = load_data(seed)
    torch.manual_seed(seed)
    model = make_model()  # PyTorch's default initialisation
    regulariser = normalize = None
    if arm == "clusterable init":
        clusterable_init_(
            model, modules=settings.modules, down_weight=settings.down_weight, seed=seed
        )
    elif arm.startswith("regulariser"):
        every = 4 if arm == "regulariser (n=4)" else 1
        regulariser = SpectralRegularizer(
            model, k=K, weight=settings.reg_weight, every_n_steps=every
        )
        normalize = ReLUWeightNormalizer(model)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)
    training = time.perf_counter()
    for _ in range(settings.epochs):
        order = torch.randperm(len(y_train), generator=generator)
        for batch in order.split(settings.batch_size):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            if regulariser is not None:
                loss = loss + regulariser()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if normalize is not None:
                normalize()
    train_seconds = time.perf_counter() - training
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(dim=1) == y_test).float().mean())
    report = ct.measure(model, k=K, shuffles=settings.shuffles, seed=seed, n_jobs=1)
    assert report.baseline is not None
    return Result(
        arm=arm,
        seed=seed,
        accuracy=accuracy,
        ncut=report.ncut,
        null_mean=report.baseline.mean,
        z_score=report.baseline.z_score,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - started,
    )


def _mean_sd(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def print_table(results: list[Result]) -> None:
    print(
        f"{'arm':<17} {'seed':>4} {'test acc':>9} {'n-cut':>7} {'null mean':>10} {'z':>8} "
        f"{'train s':>8}"
    )
    for r in results:
        print(
            f"{r.arm:<17} {r.seed:>4} {r.accuracy:>9.3f} {r.ncut:>7.3f} {r.null_mean:>10.3f} "
            f"{r.z_score:>8.1f} {r.train_seconds:>8.1f}"
        )
    print()
    print(f"{'arm':<17} {'test acc':>13} {'n-cut':>13} {'null mean':>13} {'z':>13} {'train s':>9}")
    for arm in ARMS:
        rows = [r for r in results if r.arm == arm]
        print(
            f"{arm:<17} {_mean_sd([r.accuracy for r in rows], 3):>13} "
            f"{_mean_sd([r.ncut for r in rows], 2):>13} "
            f"{_mean_sd([r.null_mean for r in rows], 2):>13} "
            f"{_mean_sd([r.z_score for r in rows], 1):>13} "
            f"{statistics.fmean([r.train_seconds for r in rows]):>9.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train digits MLPs with and without the clusterability-promoting methods of "
        "Filan et al. (2021) and compare their n-cuts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Settings()
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    parser.add_argument(
        "--shuffles", type=int, default=defaults.shuffles, help="shuffled networks per measure"
    )
    parser.add_argument(
        "--reg-weight", type=float, default=defaults.reg_weight, help="regulariser lambda"
    )
    parser.add_argument("--modules", type=int, default=defaults.modules, help="planted modules")
    parser.add_argument(
        "--down-weight", type=float, default=defaults.down_weight, help="between-module factor"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 15 epochs, 10 shuffles: a smoke run"
    )
    args = parser.parse_args(argv)
    settings = Settings(
        epochs=15 if args.quick else args.epochs,
        shuffles=10 if args.quick else args.shuffles,
        reg_weight=args.reg_weight,
        modules=args.modules,
        down_weight=args.down_weight,
    )
    seeds = range(1 if args.quick else args.seeds)
    # One thread: these networks are too small to gain from more, and BLAS threads that wait
    # for a busy core slow everything down.
    torch.set_num_threads(1)
    threadpool_limits(1)

    started = time.perf_counter()
    results = []
    for arm in ARMS:
        for seed in seeds:
            result = run(arm, seed, settings)
            print(
                f"  {arm} seed {seed}: acc {result.accuracy:.3f}, n-cut {result.ncut:.3f} "
                f"({result.seconds:.0f} s)",
                flush=True,
            )
            results.append(result)
    print()
    print_table(results)
    print(f"\n{len(results)} networks in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
