"""The paper's findings, reproduced on data we have (scikit-learn's digits; nothing downloaded).

Filan et al. (2021), "Clusterability in Neural Networks" (arXiv:2103.03386), with
``preset="filan2021"`` (the published procedure) next to the default one:

1. **Calibration at random init.** 784-256-256-256-256-10 MLPs, Glorot uniform, k = 12: the
   paper's n-cut is 10.295 +- 0.032 (and 6.799 +- 0.034 with its clusterable initialisation,
   10 modules, down-weight 0.6), over 100 networks. The preset's partition is checked against
   scikit-learn's ``SpectralClustering`` called directly, label for label.
2. **Trained vs shuffled.** An MLP trained on digits, its n-cut against ``layer`` shuffles:
   n-cut, null mean +- std, z and p under both presets.
3. **Pruned.** The same MLP magnitude-pruned to 90% sparsity (and fine-tuned with its mask):
   ``layer`` nulls (zeros move) against ``layer_nonzero`` nulls (the mask kept), as the paper
   discusses: dead units stay dead in both.
4. **The kernel density's bandwidth** of the distribution nulls: the paper's fixed 0.01 against
   the default's Scott's rule, on the trained and the pruned net, and on the same nets with every
   weight multiplied by 10 (the n-cut does not change; a null should not either).

Run: ``python examples/filan2021_digits.py`` (``--networks 30 --shuffles 30`` by default; 450 s
on two shared cores). It prints Markdown tables (the README's are from this script).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import SpectralClustering
from sklearn.datasets import load_digits
from torch import nn

import cluster_tracking as ct
from cluster_tracking import nulls
from cluster_tracking.promote.clusterable_init import clusterable_init_
from cluster_tracking.spectral import partition as spectral

PAPER_WIDTHS = (784, 256, 256, 256, 256, 10)
DIGITS_WIDTHS = (64, 256, 256, 256, 256, 10)
K = 12


def glorot_mlp(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    """An MLP with Glorot-uniform weights, as the paper's Keras models start."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        linear = nn.Linear(n_in, n_out)
        nn.init.xavier_uniform_(linear.weight)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def sklearn_directly(graph: ct.WeightGraph, random_state: int) -> np.ndarray:
    """The published ``cluster_net`` call on the graph without its zero-degree nodes."""
    active = graph.degrees > 0
    adjacency = sp.csr_matrix(graph.adjacency)[active][:, active]
    found = SpectralClustering(
        n_clusters=K,
        affinity="precomputed",
        eigen_solver="arpack",
        assign_labels="kmeans",
        n_init=spectral.filan2021_n_init(int(active.sum())),
        random_state=random_state,
    ).fit(adjacency)
    labels = np.full(graph.n_nodes, -1)
    labels[active] = spectral._canonical_labels(found.labels_)
    return labels


def calibration(networks: int) -> None:
    print(f"## 1. Random-init calibration ({networks} networks, 784-256x4-10, k = {K})\n")
    print("| init | procedure | n-cut mean +- std | paper (100 networks) |")
    print("|---|---|---|---|")
    same_labels = 0
    for clusterable, paper in ((False, "10.295 +- 0.032"), (True, "6.799 +- 0.034")):
        ncuts: dict[str, list[float]] = {"filan2021": [], "default": []}
        for index in range(networks):
            model = glorot_mlp(PAPER_WIDTHS, 1000 + index)
            if clusterable:
                clusterable_init_(model, modules=10, down_weight=0.6, seed=index)
            graph = ct.weight_graph(model)
            for preset, values in ncuts.items():
                part = spectral.spectral_partition(graph, K, seed=index, preset=preset)
                values.append(part.ncut)
                if preset == "filan2021" and not clusterable:
                    state = spectral.child_seed(np.random.SeedSequence(index), 1, K)
                    direct = sklearn_directly(graph, int(state.generate_state(1)[0]))
                    same_labels += bool(np.array_equal(direct, part.labels))
        name = "clusterable (10 modules, 0.6)" if clusterable else "Glorot uniform"
        for preset, values in ncuts.items():
            print(
                f"| {name} | `{preset}` | {np.mean(values):.3f} +- {np.std(values):.3f} | "
                f"{paper if preset == 'filan2021' else ''} |"
            )
    print(
        f"\nscikit-learn's SpectralClustering called directly gave the preset's labels on "
        f"{same_labels} of {networks} random-init networks.\n"
    )


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    masks: list[torch.Tensor] | None = None,
) -> float:
    """Adam on cross-entropy; ``masks`` keeps pruned weights at zero. Returns train accuracy."""
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
            if masks is not None:
                with torch.no_grad():
                    for linear, mask in zip(linears, masks, strict=True):
                        linear.weight.mul_(mask)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Magnitude pruning per layer to 50%, 75%, then 90% sparsity, fine-tuning after each."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    masks: list[torch.Tensor] = []
    for sparsity in (0.5, 0.75, 0.9):
        masks = []
        for linear in linears:
            magnitude = linear.weight.detach().abs()
            threshold = magnitude.flatten().kthvalue(int(sparsity * magnitude.numel())).values
            masks.append((magnitude > threshold).float())
        with torch.no_grad():
            for linear, mask in zip(linears, masks, strict=True):
                linear.weight.mul_(mask)
        train(model, x, y, epochs=5, masks=masks)
    return masks


def row(name: str, preset: str, report: ct.ClusterabilityReport) -> str:
    b = report.baseline
    assert b is not None
    z = "n/a" if b.z_score is None else f"{b.z_score:.1f}"
    return (
        f"| {name} | `{preset}` | `{b.method}` | {report.ncut:.3f} | {b.mean:.3f} +- {b.std:.3f} "
        f"| {z} | {b.p_value:.3f} | {report.nodes.removed} |"
    )


def trained_and_pruned(shuffles: int) -> tuple[nn.Module, nn.Module]:
    x, y = digits_data()
    trained = glorot_mlp(DIGITS_WIDTHS, 0)
    accuracy = train(trained, x, y, epochs=20)
    pruned = glorot_mlp(DIGITS_WIDTHS, 0)
    pruned.load_state_dict(trained.state_dict())
    prune(pruned, x, y)
    with torch.no_grad():
        pruned_accuracy = float((pruned(x).argmax(1) == y).float().mean())
    print(
        f"## 2-3. Digits MLP 64-256x4-10, k = {K}, {shuffles} shuffles "
        f"(train accuracy {accuracy:.3f}; pruned to 90%: {pruned_accuracy:.3f})\n"
    )
    print("| network | procedure | null | n-cut | null mean +- std | z | p | dead nodes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, methods in (
        ("trained", trained, ("layer",)),
        ("pruned 90%", pruned, ("layer", "layer_nonzero")),
    ):
        for method in methods:
            for preset in ("filan2021", "default"):
                report = ct.measure(
                    model, k=K, shuffles=shuffles, shuffle=method, seed=0, n_jobs=2, preset=preset
                )
                print(row(name, preset, report))
    print()
    return trained, pruned


def null_ncuts_with(graph: ct.WeightGraph, method: str, bandwidth: str, n: int) -> np.ndarray:
    """Default-procedure n-cuts of ``n`` distribution nulls whose density has ``bandwidth``
    ``"scott"`` (the default's) or ``"0.01"`` (the paper's; for an MLP the preset's null blocks
    differ from the default's in the bandwidth only)."""
    preset = "filan2021" if bandwidth == "0.01" else "default"
    values = []
    for index in range(n):
        rng = np.random.default_rng([7, index])
        blocks = nulls.null_blocks(graph.blocks, graph.n_nodes, method, rng, preset)
        (value,) = spectral.block_ncuts(blocks, graph.n_nodes, graph.node_layer, [K], seed=index)
        values.append(value)
    return np.array(values)


def bandwidths(trained: nn.Module, pruned: nn.Module, shuffles: int) -> None:
    print(
        f"## 4. Kernel density bandwidth of the distribution nulls (default clustering, "
        f"{shuffles} nulls)\n"
    )
    print("| network | null | bandwidth | bandwidth / std of the weights | null mean +- std | z |")
    print("|---|---|---|---|---|---|")
    for name, model, method in (
        ("trained", trained, "layer_nonzero_distribution"),
        ("pruned 90%", pruned, "layer_nonzero_distribution"),
        ("pruned 90%", pruned, "layer_all_distribution"),
    ):
        for scale in (1.0, 10.0):
            graph = ct.weight_graph(model)
            if scale != 1.0:
                graph = graph.with_weights([scale * w for w in graph.weights()])
            observed = spectral.spectral_partition(graph, K, seed=0).ncut
            nonzero = [w[w != 0] for w in graph.weights()]
            for bandwidth in ("scott", "0.01"):
                ratios = [
                    nulls.kde_bandwidth(v, "default" if bandwidth == "scott" else "filan2021")
                    / float(np.std(v))
                    for v in nonzero
                ]
                nulls = null_ncuts_with(graph, method, bandwidth, shuffles)
                z = (observed - nulls.mean()) / nulls.std()
                label = name if scale == 1.0 else f"{name}, weights x{scale:g}"
                print(
                    f"| {label} | `{method}` | {bandwidth} | {min(ratios):.3f}-{max(ratios):.3f} "
                    f"| {nulls.mean():.3f} +- {nulls.std():.3f} | {z:.1f} |"
                )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=30, help="random-init networks (>= 10)")
    parser.add_argument("--shuffles", type=int, default=30, help="null networks per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    calibration(args.networks)
    trained, pruned = trained_and_pruned(args.shuffles)
    bandwidths(trained, pruned, args.shuffles)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
