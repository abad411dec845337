"""The filan2021 preset is the published procedure, and every null keeps dead and pruned structure.

Each null convention is pinned on a small hand-made case: dead units stay dead, exact zeros stay
zero, the preset's CNN null permutes channel norms, and the kernel density has the documented
bandwidth. The preset's partition is scikit-learn's, label for label.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import SpectralClustering
from torch import nn

import cluster_tracking as ct
from cluster_tracking.nulls.networks import live_masks, null_blocks, shuffled_ncuts
from cluster_tracking.nulls.shuffles import FILAN2021_BANDWIDTH, kde_bandwidth, shuffle_tensor
from cluster_tracking.report import mixed_procedures, procedure_of
from cluster_tracking.spectral import partition as spectral

PRESETS = ("default", "filan2021")


def mlp(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    """An MLP with Glorot-uniform weights (the paper's Keras initialiser)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        linear = nn.Linear(n_in, n_out)
        nn.init.xavier_uniform_(linear.weight)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def with_dead_units(model: nn.Sequential) -> nn.Sequential:
    """Input pixel 0 and hidden unit 3 of the first hidden layer dead (all their weights zero)."""
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0  # input 0: no outgoing weight
        model[0].weight[3, :] = 0.0  # hidden unit 3: no incoming weight...
        model[2].weight[:, 3] = 0.0  # ...and no outgoing one
    return model


def sklearn_labels(graph: ct.WeightGraph, k: int, random_state: int, n_init: int) -> np.ndarray:
    """The published code's call, on the graph with its zero-degree nodes deleted."""
    active = graph.degrees > 0
    adjacency = sp.csr_matrix(graph.adjacency)[active][:, active]
    found = SpectralClustering(
        n_clusters=k,
        affinity="precomputed",
        eigen_solver="arpack",
        assign_labels="kmeans",
        n_init=n_init,
        random_state=random_state,
    ).fit(adjacency)
    labels = np.full(graph.n_nodes, -1)
    labels[active] = spectral._canonical_labels(found.labels_)
    return labels


# --- the preset's clustering is scikit-learn's ---------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preset_partition_is_scikit_learns_label_for_label(seed: int) -> None:
    graph = ct.weight_graph(with_dead_units(mlp((40, 32, 32, 10), seed)))
    part = spectral.spectral_partition(graph, 6, seed=seed, preset="filan2021")
    random_state = int(spectral.child_seed(np.random.SeedSequence(seed), 1, 6).generate_state(1)[0])
    expected = sklearn_labels(graph, 6, random_state, n_init=25)
    np.testing.assert_array_equal(part.labels, expected)
    assert part.n_isolated == 2 and (part.labels[[0, 40 + 3]] == -1).all()
    assert part.ncut == pytest.approx(ct.ncut(graph, expected), rel=1e-12)


def test_preset_restarts_follow_the_published_rule() -> None:
    assert spectral.filan2021_n_init(2000) == 25
    assert spectral.filan2021_n_init(2001) == 100
    report = ct.measure(mlp((20, 16, 8), 0), k=4, shuffles=0, seed=0, preset="filan2021")
    assert report.config["n_init"] == 25
    assert report.config["procedure"] == "filan2021"
    assert "scikit-learn" in report.config["clustering"]
    default = ct.measure(mlp((20, 16, 8), 0), k=4, shuffles=0, seed=0)
    assert default.config["procedure"] == "default" and default.config["n_init"] == 25
    # the settings themselves, not the names of the constants that hold them
    assert "tolerance of 0.003" in default.config["clustering"]
    assert "capped at 10 iterations" in default.config["clustering"]
    assert "_TOL" not in default.config["clustering"]


def test_preset_nulls_are_clustered_by_scikit_learn_too() -> None:
    """A null network's n-cut under the preset is that of scikit-learn's partition of it."""
    graph = ct.weight_graph(mlp((24, 20, 20, 6), 3))
    root = np.random.SeedSequence(7)
    (ncut,) = shuffled_ncuts(
        [0], graph.blocks, graph.n_nodes, graph.node_layer, "layer", [5], root, None, "filan2021"
    )
    blocks = null_blocks(
        graph.blocks,
        graph.n_nodes,
        "layer",
        np.random.default_rng(spectral.child_seed(root, 1, 0)),
        "filan2021",
    )
    null_graph = graph.with_weights([block.weight for block in blocks])
    state = int(spectral.child_seed(spectral.child_seed(root, 2, 0), 1, 5).generate_state(1)[0])
    expected = ct.ncut(null_graph, sklearn_labels(null_graph, 5, state, n_init=25))
    assert ncut[0] == pytest.approx(expected, rel=1e-12)


def test_preset_numbers_do_not_depend_on_the_workers() -> None:
    model = with_dead_units(mlp((16, 20, 20, 6), 4))
    one = ct.measure(model, k=4, shuffles=6, seed=3, n_jobs=1, preset="filan2021")
    two = ct.measure(model, k=4, shuffles=6, seed=3, n_jobs=2, preset="filan2021")
    assert one.baseline is not None and two.baseline is not None
    assert one.baseline.ncuts == two.baseline.ncuts and one.ncut == two.ncut
    assert one.nodes.removed == 2


# --- dead units stay dead ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    "method",
    ["layer", "layer_nonzero", "layer_all_distribution", "layer_all_distribution_dense"],
)
def test_a_dead_unit_stays_dead_in_every_shuffle(preset: str, method: str) -> None:
    graph = ct.weight_graph(with_dead_units(mlp((10, 12, 12, 4), 0)))
    first, second = graph.blocks[0].weight, graph.blocks[1].weight
    for trial in range(20):
        rng = np.random.default_rng(trial)
        blocks = null_blocks(graph.blocks, graph.n_nodes, method, rng, preset)
        w1, w2 = blocks[0].weight, blocks[1].weight
        assert (w1[:, 0] == 0).all(), "the dead input pixel got weight"
        assert (w1[3, :] == 0).all() and (w2[:, 3] == 0).all(), "the dead hidden unit got weight"
        if method == "layer":  # the live entries are permuted, nothing else
            live = np.ones_like(first, dtype=bool)
            live[:, 0] = live[3, :] = False
            np.testing.assert_array_equal(np.sort(w1[live]), np.sort(first[live]))
            np.testing.assert_array_equal(np.sort(w2.ravel()), np.sort(second.ravel()))


def test_live_masks_mark_exactly_the_entries_between_live_nodes() -> None:
    graph = ct.weight_graph(with_dead_units(mlp((6, 5, 3), 0)))
    first, second = live_masks(graph.blocks, graph.n_nodes)
    assert first is not None and second is not None
    expected = np.ones((5, 6), dtype=bool)
    expected[:, 0] = expected[3, :] = False
    np.testing.assert_array_equal(first, expected)
    assert (~second[:, 3]).all() and second[:, [0, 1, 2, 4]].all()
    assert live_masks(ct.weight_graph(mlp((6, 5, 3), 0)).blocks, 14) == [None, None]


def test_a_dead_conv_channel_stays_dead_in_default_kernel_shuffles() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3))
    with torch.no_grad():
        model[0].weight[2] = 0.0  # channel 2 of the first conv: no input
        model[2].weight[:, 2] = 0.0  # and no output
    graph = ct.weight_graph(model)
    for trial in range(10):
        blocks = null_blocks(graph.blocks, graph.n_nodes, "layer", np.random.default_rng(trial))
        assert (blocks[0].weight[2] == 0).all() and (blocks[1].weight[:, 2] == 0).all()


# --- zeros stay zeros in the distribution nulls --------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_zeros_stay_zeros_in_both_distribution_nulls(preset: str) -> None:
    rng = np.random.default_rng(0)
    pruned = rng.uniform(-0.5, 0.5, size=(40, 50))
    pruned[rng.random(pruned.shape) < 0.7] = 0.0
    n_zero = int((pruned == 0).sum())
    kept = shuffle_tensor(pruned, "layer_nonzero_distribution", rng, preset=preset)
    np.testing.assert_array_equal(kept != 0, pruned != 0)  # the mask itself
    moved = shuffle_tensor(pruned, "layer_all_distribution", rng, preset=preset)
    assert int((moved == 0).sum()) == n_zero  # as many exact zeros, moved
    assert not np.array_equal(moved != 0, pruned != 0)
    for drawn in (kept, moved):
        assert not np.isin(drawn[drawn != 0], pruned[pruned != 0]).any()  # new values
    dense = shuffle_tensor(pruned, "layer_all_distribution_dense", rng, preset=preset)
    assert int((dense == 0).sum()) == 0  # the opt-in dense null: a pruned net's null is dense


# --- the preset's CNN null permutes channel norms ------------------------------------------------


def conv_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3),
        nn.ReLU(),
        nn.Conv2d(5, 3, 3),
    )


def test_preset_cnn_null_permutes_channel_norm_entries() -> None:
    graph = ct.weight_graph(conv_net(0), preset="filan2021")
    norms = [block.edge_weights() for block in graph.blocks]  # [out, in] induced "L1" norms
    for trial in range(5):
        rng = np.random.default_rng(trial)
        blocks = null_blocks(graph.blocks, graph.n_nodes, "layer", rng, "filan2021")
        for block, original in zip(blocks, norms, strict=True):
            assert block.kind == "linear" and block.weight.shape == original.shape
            # the null's edge weights are the original channel norms, permuted
            np.testing.assert_array_equal(np.sort(block.weight.ravel()), np.sort(original.ravel()))
        assert not all(np.array_equal(b.weight, o) for b, o in zip(blocks, norms, strict=True))
    # the default shuffles kernel entries and takes norms after: new edge weights
    default = null_blocks(graph.blocks, graph.n_nodes, "layer", np.random.default_rng(0))
    edges = default[0].edge_weights()
    assert not np.array_equal(np.sort(edges.ravel()), np.sort(norms[0].ravel()))


# --- the kernel density's bandwidth ------------------------------------------------------------


def test_bandwidth_is_the_documented_one() -> None:
    """filan2021: 0.01 fixed. default: Scott's rule std * n^(-1/5), so it scales with W."""
    values = np.tile([-0.5, 0.5], 2048)  # std 0.5, n = 4096
    scott = 0.5 * 4096 ** (-1 / 5)  # 0.0947
    assert kde_bandwidth(values, "filan2021") == FILAN2021_BANDWIDTH == 0.01
    assert kde_bandwidth(values, "default") == pytest.approx(scott)
    for preset, width in (("filan2021", 0.01), ("default", scott)):
        drawn = shuffle_tensor(
            values, "layer_nonzero_distribution", np.random.default_rng(1), preset=preset
        )
        noise = drawn - np.where(drawn > 0, 0.5, -0.5)  # the kernel's noise around its center
        assert noise.std() == pytest.approx(width, rel=0.05)
    # default: the null of c * W is c times the null of W (n-cut ignores the overall scale)
    pruned = np.where(np.arange(300) % 3 == 0, 0.0, np.linspace(-1, 1, 300)).reshape(15, 20)
    for method in ("layer_nonzero_distribution", "layer_all_distribution"):
        one = shuffle_tensor(pruned, method, np.random.default_rng(2))
        ten = shuffle_tensor(10 * pruned, method, np.random.default_rng(2))
        np.testing.assert_allclose(ten, 10 * one, rtol=1e-12)


def test_bandwidth_of_a_pruned_tensor_is_fitted_to_its_non_zero_values() -> None:
    """Both distribution nulls fit the density to the non-zero values only (the README's
    statement): the zeros of a pruned tensor neither shrink the std nor raise n."""
    rng = np.random.default_rng(4)
    values = np.tile([-0.5, 0.5], 1024)  # std 0.5, n = 2048 non-zero
    pruned = np.zeros(6144)
    pruned[rng.permutation(6144)[:2048]] = values
    pruned = pruned.reshape(64, 96)
    scott = 0.5 * 2048 ** (-1 / 5)
    for preset, width in (("filan2021", 0.01), ("default", scott)):
        for method in ("layer_nonzero_distribution", "layer_all_distribution"):
            drawn = shuffle_tensor(pruned, method, np.random.default_rng(5), preset=preset)
            kept = drawn[drawn != 0]
            assert kept.size == 2048, (preset, method)  # zeros stay zeros, none added
            noise = kept - np.where(kept > 0, 0.5, -0.5)
            assert noise.std() == pytest.approx(width, rel=0.06), (preset, method)


# --- the report says which procedure produced it -----------------------------------------------


def test_reports_of_different_procedures_are_flagged_when_mixed() -> None:
    model = mlp((12, 10, 4), 0)
    default = ct.measure(model, k=3, shuffles=2, seed=0, n_jobs=1)
    preset = ct.measure(model, k=3, shuffles=2, seed=0, n_jobs=1, preset="filan2021")
    assert procedure_of(default) == "default" and procedure_of(preset) == "filan2021"
    assert procedure_of(ct.ClusterabilityReport.from_json(preset.to_json())) == "filan2021"
    assert mixed_procedures([default, default]) is None
    warning = mixed_procedures([default, preset])
    assert warning is not None and "'default'" in warning and "'filan2021'" in warning
    old = dict(default.config)
    del old["procedure"]  # a report written before the procedure was recorded
    assert procedure_of(old) == "unrecorded"
    assert mixed_procedures([old, default.config]) is not None


# --- calibration against the paper -------------------------------------------------------------


@pytest.mark.slow
def test_random_init_calibration_matches_the_published_numbers() -> None:
    """784-256-256-256-256-10, Glorot uniform, k = 12: published n-cut 10.295 +- 0.032 (100
    networks). 30 networks here: the spread of 10 is itself uncertain by a quarter."""
    ncuts = []
    for seed in range(30):
        graph = ct.weight_graph(mlp((784, 256, 256, 256, 256, 10), 100 + seed))
        (ncut,) = spectral.block_ncuts(
            graph.blocks, graph.n_nodes, graph.node_layer, [12], seed=seed, preset="filan2021"
        )
        ncuts.append(ncut)
    mean, spread = float(np.mean(ncuts)), float(np.std(ncuts))
    assert abs(mean - 10.295) <= 0.03, (mean, spread)
    assert 0.7 * 0.032 <= spread <= 1.5 * 0.032, (mean, spread)


# --- the tracker logs the procedure, and warns when a run holds the other one ------------------


def _track(sink: object, preset: str, steps: int = 3) -> list[ct.ClusterabilityReport]:
    """Measure a small MLP at ``steps`` steps under ``preset`` into ``sink``; close."""
    model = mlp((8, 12, 4), 0)
    tracker = ct.ClusterabilityTracker(
        [sink], every_n_steps=1, k=3, shuffles=4, seed=0, n_jobs=1, worker="thread",
        on_backlog="queue", preset=preset,
    )  # fmt: skip
    for step in range(steps):
        tracker.step(model, step)
    tracker.close()
    return tracker.reports


def _procedure_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, ct.ClusterTrackingWarning) and "procedure" in str(w.message)
    ]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from _servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_mlflow_run_measured_under_the_other_procedure_warns_once(
    mlflow_server: Any, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from cluster_tracking.integrations.mlflow import MlflowSink

    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run("0", run_name="two-procedures").info.run_id

    def sink(name: str) -> MlflowSink:
        return MlflowSink(run_id, tracking_uri=mlflow_server.uri, spool_dir=tmp_path / name)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _track(sink("first"), "default")
        again = _track(sink("again"), "default")  # the same procedure: nothing to say
    assert _procedure_warnings(caught) == [], [str(w.message) for w in caught]
    assert first[0].config["procedure"] == "default"
    assert client.get_run(run_id).data.params["clusterability.procedure"] == "default"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        later = _track(sink("later"), "filan2021", steps=2)
    said = _procedure_warnings(caught)
    assert len(said) == 1, [str(w.message) for w in caught]
    assert run_id in said[0] and "'default'" in said[0] and "'filan2021'" in said[0]
    assert not any("refused" in str(w.message) for w in caught)  # the params were not rejected
    run = client.get_run(run_id)
    # MLflow cannot change a param: the run keeps the first value; the new metrics still land
    assert run.data.params["clusterability.procedure"] == "default"
    assert later[-1].config["procedure"] == "filan2021"
    history = client.get_metric_history(run_id, "clusterability/ncut")
    assert len(history) == len(first) + len(again) + len(later)


@pytest.mark.slow
def test_wandb_run_measured_under_the_other_procedure_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from _wandb_offline import find_run_dir, offline_wandb, read_offline_run

    from cluster_tracking.integrations.wandb import WandbSink

    with offline_wandb(tmp_path / "wandb-home", monkeypatch) as home:
        run = wandb.init(
            project="cluster-tracking-tests",
            dir=str(home),
            mode="offline",
            settings=wandb.Settings(
                x_disable_stats=True, x_disable_meta=True, console="off", disable_git=True
            ),
        )
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _track(WandbSink(run=run, spool_dir=tmp_path / "first"), "filan2021")
                _track(WandbSink(run=run, spool_dir=tmp_path / "again"), "filan2021")
            assert _procedure_warnings(caught) == [], [str(w.message) for w in caught]
            assert run.config["clusterability.procedure"] == "filan2021"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _track(WandbSink(run=run, spool_dir=tmp_path / "later"), "default", steps=2)
            said = _procedure_warnings(caught)
            assert len(said) == 1, [str(w.message) for w in caught]
            assert "'filan2021'" in said[0] and "'default'" in said[0]
        finally:
            run.finish()
        written = read_offline_run(find_run_dir(home, run.id))
    assert written.config["clusterability.procedure"] == "default"
