"""Spectral partition and n-cut: exact values, and quality at least scikit-learn's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score
from torch import nn

import cluster_tracking as ct
from cluster_tracking.nulls.shuffles import shuffle_weights
from cluster_tracking.spectral import partition as spectral
from cluster_tracking.spectral.adjacency import _edges_of, bipartition
from cluster_tracking.spectral.cuts import _ncuts_of_pieces
from cluster_tracking.spectral.eigensolver import laplacian_embedding
from cluster_tracking.spectral.kmeans import _kmeans_restarts
from cluster_tracking.spectral.partition import spectral_partitions


def _symmetric(n: int, edges: dict[tuple[int, int], float]) -> sp.csr_array:
    rows, cols, values = [], [], []
    for (i, j), w in edges.items():
        rows += [i, j]
        cols += [j, i]
        values += [w, w]
    return sp.csr_array((values, (rows, cols)), shape=(n, n))


def layered_graph(
    widths: list[int], seed: int, modules: int = 0, contrast: float = 25.0
) -> sp.csr_array:
    """Adjacency of a random MLP-shaped weight graph; with ``modules``, planted blocks."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    n = int(offsets[-1])
    rows, cols, values = [], [], []
    for layer in range(len(widths) - 1):
        n_in, n_out = widths[layer], widths[layer + 1]
        weight = np.abs(rng.normal(size=(n_out, n_in)))
        if modules:
            same = (np.arange(n_out)[:, None] % modules) == (np.arange(n_in)[None, :] % modules)
            weight *= np.where(same, contrast, 1.0)
        out_idx, in_idx = np.nonzero(weight)
        rows += [offsets[layer + 1] + out_idx, offsets[layer] + in_idx]
        cols += [offsets[layer] + in_idx, offsets[layer + 1] + out_idx]
        values += [weight[out_idx, in_idx]] * 2
    return sp.csr_array(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )


def _sklearn_ncut(adjacency: sp.csr_array, k: int, seed: int) -> float:
    matrix = sp.csr_matrix(adjacency)
    matrix.indices = matrix.indices.astype(np.int32)
    matrix.indptr = matrix.indptr.astype(np.int32)
    model = SpectralClustering(
        n_clusters=k, affinity="precomputed", assign_labels="kmeans", random_state=seed
    )
    return ct.ncut(adjacency, model.fit(matrix).labels_)


def test_ncut_matches_hand_computation() -> None:
    # 0 -2- 1 -1- 2 -3- 3 ; clusters {0,1} and {2,3}
    adjacency = _symmetric(4, {(0, 1): 2.0, (1, 2): 1.0, (2, 3): 3.0})
    # cut = 1 for both; vol({0,1}) = 2 + 3 = 5, vol({2,3}) = 4 + 3 = 7
    assert ct.ncut(adjacency, np.array([0, 0, 1, 1])) == pytest.approx(1 / 5 + 1 / 7)
    # {0} alone: cut 2 / vol 2; {1,2,3}: cut 2 / vol 3 + 4 + 3
    assert ct.ncut(adjacency, np.array([0, 1, 1, 1])) == pytest.approx(1.0 + 2 / 10)
    # one cluster: nothing is cut
    assert ct.ncut(adjacency, np.zeros(4, dtype=int)) == 0.0
    # every node alone: every cluster cuts all of its volume
    assert ct.ncut(adjacency, np.arange(4)) == pytest.approx(4.0)


def test_ncut_ignores_unclustered_isolated_nodes_and_rejects_bad_labels() -> None:
    adjacency = _symmetric(5, {(0, 1): 2.0, (1, 2): 1.0, (2, 3): 3.0})  # node 4 isolated
    assert ct.ncut(adjacency, np.array([0, 0, 1, 1, -1])) == pytest.approx(1 / 5 + 1 / 7)
    with pytest.raises(ct.ConfigError, match="one label per node"):
        ct.ncut(adjacency, np.array([0, 0, 1, 1]))
    with pytest.raises(ct.ConfigError, match="zero-degree"):
        ct.ncut(adjacency, np.array([-1, 0, 1, 1, 0]))


def test_partition_is_at_least_as_good_as_sklearn_over_several_graphs() -> None:
    ours, theirs = [], []
    for seed, widths in enumerate([[30, 40, 40, 10], [64, 64, 64, 10], [100, 80, 60, 40, 20]]):
        for shift in range(2):
            adjacency = layered_graph(widths, seed=10 * seed + shift)
            ours.append(ct.spectral_partition(adjacency, k=6, seed=shift).ncut)
            theirs.append(_sklearn_ncut(adjacency, k=6, seed=shift))
    ours_arr, theirs_arr = np.array(ours), np.array(theirs)
    assert ours_arr.mean() <= theirs_arr.mean()
    assert np.all(ours_arr <= theirs_arr * 1.002), (ours, theirs)


def test_planted_modules_are_recovered() -> None:
    widths = [40, 60, 60, 40]
    adjacency = layered_graph(widths, seed=3, modules=4)
    truth = np.concatenate([np.arange(w) % 4 for w in widths])
    partition = ct.spectral_partition(adjacency, k=4, seed=0)
    assert adjusted_rand_score(truth, partition.labels) > 0.95
    assert partition.ncut < 0.6  # 4 clusters; a random split of this graph cuts about 3


def test_disconnected_graph_splits_along_components_and_isolated_nodes_are_removed() -> None:
    left = {(i, j): 1.0 for i in range(5) for j in range(i + 1, 5)}
    right = {(i + 5, j + 5): 1.0 for i in range(5) for j in range(i + 1, 5)}
    adjacency = _symmetric(12, {**left, **right})  # nodes 10 and 11 have no edge
    partition = ct.spectral_partition(adjacency, k=2, seed=0)
    assert partition.ncut == pytest.approx(0.0, abs=1e-12)
    assert partition.n_isolated == 2
    assert list(partition.labels[10:]) == [-1, -1]
    assert len(set(partition.labels[:5])) == 1 and len(set(partition.labels[5:10])) == 1
    assert partition.labels[0] != partition.labels[5]


def test_fewer_nodes_than_k_is_a_clear_error() -> None:
    adjacency = _symmetric(4, {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0})
    with pytest.raises(ct.ConfigError, match=r"k=12 .* only 4 connected nodes; choose k <= 4"):
        ct.spectral_partition(adjacency, k=12)
    with pytest.raises(ct.ConfigError, match="k must be an integer >= 2"):
        ct.spectral_partition(adjacency, k=1)


def test_same_seed_same_partition() -> None:
    adjacency = layered_graph([50, 50, 50], seed=1)
    first = ct.spectral_partition(adjacency, k=5, seed=7)
    second = ct.spectral_partition(adjacency, k=5, seed=7)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.ncut == second.ncut


def test_bipartite_fast_path_gives_the_laplacian_eigenpairs() -> None:
    adjacency = layered_graph([30, 40, 50, 20], seed=2)
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    values, embedding = laplacian_embedding(adjacency, 6, rng=np.random.default_rng(0))
    laplacian = np.eye(adjacency.shape[0]) - adjacency.toarray() / np.sqrt(
        np.outer(degrees, degrees)
    )
    expected = np.linalg.eigvalsh(laplacian)[:6]
    np.testing.assert_allclose(values, expected, atol=1e-8)
    # embedding = D^-1/2 v with L v = lambda v
    vectors = embedding * np.sqrt(degrees)[:, None]
    np.testing.assert_allclose(laplacian @ vectors, vectors * values, atol=1e-7)


def test_sweep_shares_the_embedding_and_matches_single_k_runs() -> None:
    adjacency = layered_graph([40, 40, 40], seed=5, modules=3)
    sweep = spectral_partitions(adjacency, [3, 5], seed=np.random.SeedSequence(11))
    single = spectral_partitions(adjacency, [5], seed=np.random.SeedSequence(11))
    assert [p.k for p in sweep] == [3, 5]
    assert sweep[1].ncut == pytest.approx(single[0].ncut, rel=1e-9)


def _laplacian_spectrum(adjacency: sp.csr_array, n: int) -> np.ndarray:
    dense = adjacency.toarray()
    degrees = dense.sum(axis=1)
    laplacian = np.eye(dense.shape[0]) - dense / np.sqrt(np.outer(degrees, degrees))
    return np.linalg.eigvalsh(laplacian)[:n]


def test_iterative_path_on_a_large_graph_matches_the_dense_eigenvalues_and_ncut() -> None:
    # 2,400 nodes: past the dense limit, so the embedding comes from block Krylov in float32.
    adjacency = layered_graph([800, 600, 600, 400], seed=4)
    partition = ct.spectral_partition(adjacency, k=8, seed=0)
    np.testing.assert_allclose(partition.eigenvalues, _laplacian_spectrum(adjacency, 8), atol=1e-6)
    # k-means on the exact embedding, same starts: the Krylov subspace does as well in n-cut.
    _, exact = laplacian_embedding(adjacency, 8, rng=np.random.default_rng(0))
    edges = _edges_of(adjacency)
    starts = _kmeans_restarts(exact, 8, np.random.default_rng(1), 25)
    exact_best = _ncuts_of_pieces(edges, starts, 8, np.float64).min()
    assert partition.ncut <= exact_best * 1.005, (partition.ncut, exact_best)
    assert ct.ncut(adjacency, partition.labels) == pytest.approx(partition.ncut, rel=1e-9)


def test_iterative_path_recovers_planted_modules_on_a_large_graph() -> None:
    widths = [500, 400, 400, 300]
    adjacency = layered_graph(widths, seed=6, modules=5, contrast=8.0)
    truth = np.concatenate([np.arange(w) % 5 for w in widths])
    partition = ct.spectral_partition(adjacency, k=5, seed=0)
    assert adjusted_rand_score(truth, partition.labels) > 0.95


def test_iterative_path_on_a_graph_with_odd_cycles() -> None:
    # Edges inside a layer break the 2-colouring: the general (non-bipartite) solver runs.
    layered = layered_graph([300, 300, 300], seed=8)
    rng = np.random.default_rng(0)
    inside = sp.random_array((900, 900), density=0.01, rng=rng, format="csr")
    inside = sp.triu(inside, k=1)
    adjacency = sp.csr_array(layered + inside + inside.T)
    assert bipartition(adjacency) is None
    partition = ct.spectral_partition(adjacency, k=6, seed=0)
    np.testing.assert_allclose(partition.eigenvalues, _laplacian_spectrum(adjacency, 6), atol=1e-6)
    assert partition.ncut <= _sklearn_ncut(adjacency, k=6, seed=0) * 1.002


def test_bipartition_colours_layers_and_detects_odd_cycles() -> None:
    path = _symmetric(5, {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0, (3, 4): 1.0})
    sides = bipartition(path)
    assert sides is not None
    assert all(sides[i] != sides[i + 1] for i in range(4))
    triangle = _symmetric(4, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.0, (2, 3): 1.0})
    assert bipartition(triangle) is None


def test_null_networks_from_weight_blocks_match_their_assembled_graphs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU())
    model.append(nn.Linear(300, 10))
    graph = ct.weight_graph(model)
    rng = np.random.default_rng(3)
    shuffled = shuffle_weights(graph.weights(), "layer", rng)
    blocks = [replace(b, weight=w) for b, w in zip(graph.blocks, shuffled, strict=True)]
    from_blocks = spectral.block_ncuts(blocks, graph.n_nodes, graph.node_layer, [4, 12], seed=5)
    assembled = spectral.spectral_partitions(graph.with_weights(shuffled), [4, 12], seed=5)
    assert from_blocks == [part.ncut for part in assembled]
    # the WeightGraph's blocks and its sparse adjacency give the same spectrum
    from_adjacency = spectral.laplacian_eigenvalues(graph.adjacency, 12, seed=0)
    np.testing.assert_allclose(
        spectral.spectral_partition(graph, 12, seed=0).eigenvalues, from_adjacency, atol=1e-7
    )


class _DepthwiseResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pointwise(torch.relu(self.depthwise(x)))
        return self.head(x)


def test_weight_blocks_with_groups_and_residual_adds_give_the_adjacency_spectrum() -> None:
    torch.manual_seed(1)
    graph = ct.weight_graph(_DepthwiseResidual())
    edges = _edges_of(graph)
    assert any(not piece.dense for piece in edges.pieces)  # the grouped conv stays sparse
    values = spectral.spectral_partition(graph, 4, seed=0).eigenvalues
    np.testing.assert_allclose(values, _laplacian_spectrum(graph.adjacency, 4), atol=1e-9)


@pytest.mark.parametrize("k", [2, 3, 12, 17, 300])
def test_nearest_centers_are_the_argmin_of_the_distances(k: int) -> None:
    """k-means' packed-minimum assignment gives argmin's labels (up to float32 near-ties)."""
    from cluster_tracking.spectral.kmeans import _nearest_centers

    rng = np.random.default_rng(k)
    points = rng.standard_normal((500, 6)).astype(np.float32)
    centers = rng.standard_normal((4, k, 6)).astype(np.float32)
    norms = (points**2).sum(axis=1)
    augmented = np.concatenate([-2.0 * points, np.ones((500, 1), np.float32), norms[:, None]], 1)
    labels, _ = _nearest_centers(augmented, centers)
    exact = ((points[None, None, :, :] - centers[:, :, None, :]) ** 2).sum(axis=3)  # [R, k, n]
    expected = exact.argmin(axis=1)
    chosen = np.take_along_axis(exact, labels[:, None, :], axis=1)[:, 0]
    best = exact.min(axis=1)
    assert np.all(chosen <= best * (1 + 1e-4) + 1e-5)  # never a farther center, beyond rounding
    assert np.mean(labels == expected) > 0.995
