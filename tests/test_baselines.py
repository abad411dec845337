"""Null models and their statistics: what each shuffle keeps, calibration, power, seeds."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch
from torch import nn

import cluster_tracking as ct
from cluster_tracking.nulls.local_workers import NULL_WORKER_ENV
from cluster_tracking.nulls.shuffles import shuffle_tensor
from cluster_tracking.nulls.statistics import null_statistics
from cluster_tracking.parallel.pool import WorkerPool, live_pool


def planted_mlp(
    widths: list[int], modules: int, contrast: float = 30.0, seed: int = 0
) -> nn.Module:
    """An MLP whose weights are strong inside ``modules`` planted groups and weak across them."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        linear = nn.Linear(n_in, n_out)
        same = (torch.arange(n_out)[:, None] % modules) == (torch.arange(n_in)[None, :] % modules)
        with torch.no_grad():
            linear.weight.mul_(torch.where(same, contrast, 1.0))
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def small_mlp(seed: int, widths: tuple[int, ...] = (8, 16, 16, 4)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.fixture
def pruned_weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(20, 30))
    weight[rng.random(weight.shape) < 0.6] = 0.0
    return weight


def test_layer_shuffle_keeps_the_multiset_of_values(pruned_weight: np.ndarray) -> None:
    shuffled = shuffle_tensor(pruned_weight, "layer", np.random.default_rng(1))
    assert shuffled.shape == pruned_weight.shape
    np.testing.assert_array_equal(np.sort(shuffled.ravel()), np.sort(pruned_weight.ravel()))
    assert not np.array_equal(shuffled, pruned_weight)
    # zeros moved: the mask is not kept
    assert not np.array_equal(shuffled != 0, pruned_weight != 0)


def test_layer_nonzero_keeps_the_mask_exactly(pruned_weight: np.ndarray) -> None:
    shuffled = shuffle_tensor(pruned_weight, "layer_nonzero", np.random.default_rng(1))
    np.testing.assert_array_equal(shuffled != 0, pruned_weight != 0)
    np.testing.assert_array_equal(
        np.sort(shuffled[shuffled != 0]), np.sort(pruned_weight[pruned_weight != 0])
    )
    assert not np.array_equal(shuffled, pruned_weight)


def test_distribution_variants_keep_the_mask_and_draw_new_values(pruned_weight: np.ndarray) -> None:
    nonzero = shuffle_tensor(pruned_weight, "layer_nonzero_distribution", np.random.default_rng(2))
    np.testing.assert_array_equal(nonzero != 0, pruned_weight != 0)
    assert not np.isin(nonzero[nonzero != 0], pruned_weight[pruned_weight != 0]).any()
    # the fitted density keeps the scale of the values
    assert nonzero[nonzero != 0].std() == pytest.approx(
        pruned_weight[pruned_weight != 0].std(), rel=0.3
    )

    dense = np.random.default_rng(3).normal(size=(30, 30))
    resampled = shuffle_tensor(dense, "layer_all_distribution", np.random.default_rng(2))
    assert resampled.shape == dense.shape
    assert not np.isin(resampled, dense).any()
    assert resampled.std() == pytest.approx(dense.std(), rel=0.2)


def test_statistics_match_their_definitions() -> None:
    nulls = [4.0, 5.0, 6.0, 7.0]
    baseline = null_statistics(5.0, nulls, "layer")
    assert baseline.mean == 5.5
    assert baseline.std == pytest.approx(np.sqrt(1.25))  # population std
    assert baseline.z_score == pytest.approx(-0.5 / np.sqrt(1.25))
    assert baseline.p_value == pytest.approx((1 + 1) / (4 + 1))  # one null strictly below
    assert baseline.percentile == pytest.approx(100 * (1 + 0.5) / 4)
    assert baseline.diff == pytest.approx(-0.5)
    assert baseline.rel_diff == pytest.approx(-0.5 / 5.5)
    floor = null_statistics(1.0, nulls, "layer")
    assert floor.p_value == pytest.approx(1 / 5)
    flat = null_statistics(1.0, [3.0, 3.0, 3.0], "layer")
    assert flat.degenerate and flat.z_score is None and flat.std == 0.0


def test_bad_null_settings_are_clear_errors() -> None:
    model = small_mlp(0)
    with pytest.raises(ct.ConfigError, match="at least 2 networks"):
        ct.measure(model, k=3, shuffles=1, seed=0)
    with pytest.raises(ct.ConfigError, match="unknown null model 'rows'"):
        ct.measure(model, k=3, shuffles=5, shuffle="rows", seed=0)
    sparse = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        sparse[2].weight.zero_()
        sparse[2].weight[0, 0] = 1.0
    with pytest.raises(ct.ConfigError, match="at least 2 non-zero weights"):
        ct.measure(sparse, k=2, shuffles=5, shuffle="layer_nonzero", seed=0)
    with pytest.raises(ct.ConfigError, match=r"needs a torch\.nn\.Module"):
        ct.measure(model.state_dict(), k=3, shuffles=5, shuffle="random_init", seed=0)


def test_planted_modules_reach_the_p_value_floor() -> None:
    model = planted_mlp([24, 32, 32, 24], modules=4)
    report = ct.measure(model, k=4, shuffles=20, seed=0, n_jobs=1)
    assert report.baseline is not None
    assert report.baseline.p_value == pytest.approx(1 / 21)
    assert report.baseline.z_score is not None and report.baseline.z_score < -10
    assert report.baseline.percentile == 0.0
    assert report.ncut < report.baseline.mean


@pytest.mark.slow
def test_p_values_are_calibrated_on_networks_without_structure() -> None:
    """An observed network that is itself a shuffle: p is uniform, 5% false positives at 0.05."""
    from cluster_tracking.nulls.shuffles import shuffle_weights

    base = ct.weight_graph(small_mlp(0, (10, 16, 16, 6)))
    p_values = []
    for trial in range(160):
        rng = np.random.default_rng(1000 + trial)
        observed = base.with_weights(shuffle_weights(base.weights(), "layer", rng))
        report = ct.measure(observed, k=4, shuffles=19, seed=trial, n_init=8, n_jobs=1)
        assert report.baseline is not None
        p_values.append(report.baseline.p_value)
    p = np.array(p_values)
    false_positive_rate = float(np.mean(p <= 0.05))
    # Binomial(160, 0.05): mean 8 (5%), sd 2.8; 0-16 rejections is within 3 sd
    assert false_positive_rate <= 0.10, false_positive_rate
    assert 0.4 <= p.mean() <= 0.6, p.mean()  # a uniform p on {1/20..1} has mean 0.525


def test_same_seed_same_numbers_whatever_the_workers() -> None:
    model = small_mlp(1, (12, 24, 24, 6))
    reports = [
        ct.measure(model, k=4, shuffles=12, seed=5, n_jobs=1),
        ct.measure(model, k=4, shuffles=12, seed=5, n_jobs=2),
        ct.measure(model, k=4, shuffles=12, seed=5, n_jobs=2, backend="threading"),
    ]
    first = reports[0]
    assert first.baseline is not None
    for other in reports[1:]:
        assert other.baseline is not None
        assert other.ncut == first.ncut
        assert other.baseline.ncuts == first.baseline.ncuts
        assert other.partition.labels == first.partition.labels
    different = ct.measure(model, k=4, shuffles=12, seed=6, n_jobs=1)
    assert different.baseline is not None and different.baseline.ncuts != first.baseline.ncuts


def test_random_init_null_uses_fresh_networks() -> None:
    model = planted_mlp([16, 24, 24, 8], modules=4)
    report = ct.measure(model, k=4, shuffles=8, shuffle="random_init", seed=0, n_jobs=1)
    assert report.baseline is not None and report.baseline.method == "random_init"
    assert report.baseline.p_value == pytest.approx(1 / 9)
    again = ct.measure(model, k=4, shuffles=8, shuffle="random_init", seed=0, n_jobs=2)
    assert again.baseline is not None and again.baseline.ncuts == report.baseline.ncuts
    xavier = ct.measure(
        model, k=4, shuffles=8, shuffle="random_init", init="xavier_normal", seed=0, n_jobs=1
    )
    assert xavier.baseline is not None and xavier.baseline.ncuts != report.baseline.ncuts
    with pytest.raises(ct.ConfigError, match="unknown init"):
        ct.measure(model, k=4, shuffles=4, shuffle="random_init", init="zeros", seed=0)


def test_every_shuffle_method_runs_through_measure() -> None:
    model = small_mlp(2)
    for method in (
        "layer",
        "layer_nonzero",
        "layer_nonzero_distribution",
        "layer_all_distribution",
    ):
        report = ct.measure(model, k=3, shuffles=4, shuffle=method, seed=0, n_jobs=1)
        assert report.baseline is not None
        assert report.baseline.method == method and report.baseline.n == 4


def test_k_sweep_and_auto_k() -> None:
    model = planted_mlp([24, 32, 32, 24], modules=4)
    reports = ct.measure(model, k=[2, 4, 8], shuffles=4, seed=0, n_jobs=1)
    assert [r.k for r in reports] == [2, 4, 8]
    assert all(r.baseline is not None and r.baseline.n == 4 for r in reports)
    assert reports[0].ncut < reports[2].ncut  # more clusters, more cut
    auto = ct.measure(model, k="auto", shuffles=0, seed=0)
    assert auto.k == 4
    assert auto.config["k_auto"]["chosen"] == 4
    assert auto.config["k_auto"]["range"] == [2, 32]


def test_progress_callback_reaches_the_total() -> None:
    seen: list[tuple[int, int]] = []
    ct.measure(
        small_mlp(3), k=3, shuffles=6, seed=0, n_jobs=1, progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (6, 6)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def _null_pool() -> WorkerPool:
    """The kept pool of one null worker (``n_jobs=2``: this process and one worker)."""
    pool = live_pool(1, NULL_WORKER_ENV)
    assert pool is not None
    return pool


def test_worker_processes_share_the_nulls_and_a_killed_worker_loses_nothing() -> None:
    """n_jobs=2 runs the shuffles on this process and a worker process (kept alive between calls):
    the same numbers as one process; if the worker dies mid-call, its nulls are measured here."""
    import os
    import signal

    model = small_mlp(4, (12, 24, 24, 6))
    alone = ct.measure(model, k=4, shuffles=40, seed=9, n_jobs=1)
    shared = ct.measure(model, k=4, shuffles=40, seed=9, n_jobs=2)  # also warms the worker
    assert alone.baseline is not None and shared.baseline is not None
    assert shared.baseline.ncuts == alone.baseline.ncuts
    assert shared.config["backend"] == "loky"

    pool = _null_pool()
    killed: list[int] = []

    def kill_the_worker(done: int, total: int) -> None:
        if not killed:
            for pid in pool.pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    seen: list[int] = []
    with pytest.warns(RuntimeWarning, match="worker process measuring null networks stopped"):
        survived = ct.measure(
            model,
            k=4,
            shuffles=40,
            seed=9,
            n_jobs=2,
            progress=lambda done, total: (kill_the_worker(done, total), seen.append(done)),
        )
    assert killed
    assert survived.baseline is not None and survived.baseline.ncuts == alone.baseline.ncuts
    assert seen == sorted(seen) and seen[-1] == 40
    # the next call gets a fresh pool
    again = ct.measure(model, k=4, shuffles=40, seed=9, n_jobs=2)
    assert _null_pool() is not pool and _null_pool().usable()
    assert again.baseline is not None and again.baseline.ncuts == alone.baseline.ncuts


def test_an_interrupted_call_leaves_the_worker_processes_usable() -> None:
    """A call stopped mid-way (Ctrl-C in the progress callback) queues nothing more; the worker
    finishes the task it has and serves the next call, which gets the same numbers."""

    model = small_mlp(5, (12, 24, 24, 6))
    alone = ct.measure(model, k=4, shuffles=40, seed=3, n_jobs=1)
    ct.measure(model, k=4, shuffles=4, seed=3, n_jobs=2)  # the worker is up
    pool = _null_pool()

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ct.measure(model, k=4, shuffles=40, seed=3, n_jobs=2, progress=interrupt)
    again = ct.measure(model, k=4, shuffles=40, seed=3, n_jobs=2)
    assert _null_pool() is pool and pool.usable()
    assert alone.baseline is not None and again.baseline is not None
    assert again.baseline.ncuts == alone.baseline.ncuts


@pytest.mark.skipif(sys.platform != "linux", reason="forks the test process")
def test_a_forked_child_starts_its_own_workers_and_leaves_the_parents_alone() -> None:
    """A process forked after a call (a DataLoader worker, multiprocessing's fork) inherits the
    pipes to its parent's workers; its own calls start its own workers instead of writing into
    the parent's pipes, and its exit leaves the parent's workers running."""
    import multiprocessing

    graph = ct.weight_graph(small_mlp(6, (12, 24, 24, 6)))  # the child needs no torch
    alone = ct.measure(graph, k=4, shuffles=20, seed=4, n_jobs=1)
    ct.measure(graph, k=4, shuffles=4, seed=4, n_jobs=2)
    pool = _null_pool()

    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child() -> None:
        report = ct.measure(graph, k=4, shuffles=20, seed=4, n_jobs=2)
        assert report.baseline is not None
        results.put(report.baseline.ncuts)

    process = context.Process(target=child)
    process.start()
    try:
        from_child = results.get(timeout=120)
        process.join(timeout=60)
    finally:
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0
    again = ct.measure(graph, k=4, shuffles=20, seed=4, n_jobs=2)
    assert _null_pool() is pool and pool.usable()
    assert alone.baseline is not None and again.baseline is not None
    assert from_child == again.baseline.ncuts == alone.baseline.ncuts


def test_the_null_workers_import_path_needs_no_torch() -> None:
    """The worker processes import the measuring core only: numpy and scipy, not torch (seconds
    to import on a small machine), so they start while the first nulls are measured."""
    import subprocess
    import sys

    probe = (
        "import sys, cluster_tracking, cluster_tracking.nulls, cluster_tracking.measure;"
        "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
