"""Plots of a clusterability measurement: what a dashboard shows next to the metrics.

Four figures, each a plain :class:`matplotlib.figure.Figure` drawn on the Agg canvas (no
``pyplot``, so no global figure state, no GUI backend, safe in a background thread):

* :func:`adjacency_figure`: the weight graph's adjacency matrix with nodes ordered by cluster, so a
  clusterable network shows bright diagonal blocks (Filan et al. 2021, fig. 1). Graphs larger than
  ``max_pixels`` nodes are block-averaged down to at most ``max_pixels`` rows and columns.
* :func:`cluster_matrix_figure`: the k x k matrix of edge weight between clusters, each row
  divided by its cluster's volume (:func:`cluster_matrix`): a bright diagonal is a modular
  network at a glance, whatever the layer structure (which the node-level heat map shows as a
  checkerboard).
* :func:`composition_figure`: how many neurons of each layer every cluster holds (stacked bars,
  one bar per layer, one colour per cluster).
* :func:`trajectory_figure`: the n-cut against the training step, with the null model's mean and a
  band of one standard deviation: the gap between the line and the band is the clusterability.
  Steps that were due but not measured (skipped) are marked on the step axis.

:func:`save_png` writes a figure to a file and :func:`png_bytes` returns it in memory.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, LogNorm
from matplotlib.figure import Figure

from cluster_tracking.graph.types import WeightGraph
from cluster_tracking.report import ClusterabilityReport

#: Largest side, in matrix cells, of the adjacency heat map (bigger graphs are block-averaged).
MAX_HEATMAP_PIXELS = 600
#: Largest k whose cluster matrix has its values printed in the cells.
MATRIX_VALUES_UP_TO = 6


def cluster_order(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Node indices sorted by cluster (stable: node order inside a cluster); nodes labelled
    ``-1`` (zero-degree nodes removed before clustering) are left out."""
    labels = np.asarray(labels, dtype=np.int64)
    kept = np.flatnonzero(labels >= 0)
    return kept[np.argsort(labels[kept], kind="stable")]


def block_average(matrix: sp.sparray | sp.spmatrix | np.ndarray, max_size: int) -> np.ndarray:
    """Dense ``[b, b]`` block means of a square ``[n, n]`` matrix, ``b = min(n, max_size)``.

    Row/column ``p`` of the input falls in bin ``floor(p * b / n)``; each output cell is the mean
    of its ``rows x cols`` block, computed as ``P @ A @ P.T`` with ``P[bin, p] = 1 / |bin|``.
    """
    matrix = sp.csr_array(matrix)
    n = matrix.shape[0]
    if n <= max_size:
        return np.asarray(matrix.toarray(), dtype=np.float64)
    bins = (np.arange(n) * max_size) // n
    counts = np.bincount(bins, minlength=max_size).astype(np.float64)
    pool = sp.csr_array(
        (1.0 / counts[bins], (bins, np.arange(n))), shape=(max_size, n), dtype=np.float64
    )
    return np.asarray((pool @ matrix @ pool.T).toarray(), dtype=np.float64)


def adjacency_figure(
    graph: WeightGraph,
    labels: Sequence[int] | np.ndarray,
    *,
    max_pixels: int = MAX_HEATMAP_PIXELS,
    title: str | None = None,
) -> Figure:
    """Heat map of ``|weights|`` between neurons, ordered by cluster (block structure visible).

    Args:
        graph: the weight graph that was partitioned.
        labels: cluster of each node, in node order (``-1`` for removed nodes, which are left out).
        max_pixels: largest side of the matrix drawn; bigger graphs are block-averaged.
        title: the figure's title.

    Returns:
        The figure (log colour scale; white = no edge; lines separate the clusters).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != graph.n_nodes:
        raise ValueError(f"{len(labels)} labels for a graph of {graph.n_nodes} nodes.")
    order = cluster_order(labels)
    n = len(order)
    adjacency = sp.csr_array(graph.adjacency)[order][:, order]
    cells = block_average(adjacency, max_pixels)
    scale = cells.shape[0] / max(n, 1)

    figure = _figure(6.4, 5.6)
    axes = figure.add_subplot()
    positive = cells[cells > 0]
    if positive.size:
        top = float(positive.max())
        bottom = max(float(np.percentile(positive, 1)), top * 1e-4)
        shown = np.ma.masked_less_equal(cells, 0)
        cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="white")
        image = axes.imshow(
            np.ma.clip(shown, bottom, top),
            cmap=cmap,
            norm=LogNorm(vmin=bottom, vmax=top),
            interpolation="nearest",
        )
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="|weight| (edge weight)")
    else:
        axes.imshow(np.zeros((1, 1)), cmap="Greys")

    sizes = np.bincount(labels[order], minlength=int(labels.max()) + 1) if n else np.array([])
    edges = np.concatenate([[0], np.cumsum(sizes)]) * scale - 0.5
    for edge in edges[1:-1]:
        axes.axhline(edge, color="tab:cyan", linewidth=0.6)
        axes.axvline(edge, color="tab:cyan", linewidth=0.6)
    if 0 < len(sizes) <= 32:
        centres = (edges[:-1] + edges[1:]) / 2
        axes.set_xticks(centres, [str(c) for c in range(len(sizes))], fontsize=7)
        axes.set_yticks(centres, [str(c) for c in range(len(sizes))], fontsize=7)
    axes.set_xlabel("cluster (nodes sorted by cluster)")
    axes.set_ylabel("cluster")
    subtitle = f"{n} nodes" + (
        f", block-averaged to {cells.shape[0]}" if cells.shape[0] < n else ""
    )
    axes.set_title(title or f"Weight graph ordered by cluster ({subtitle})", fontsize=10)
    return figure


def cluster_matrix(graph: WeightGraph, labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """The ``[k, k]`` matrix of edge weight between clusters, each row divided by its cluster's
    volume: ``M[i, j] = W(C_i, C_j) / vol(C_i)``, ``W(C_i, C_j)`` the summed weight of the edges
    between clusters i and j (each edge once per direction, so ``W(C_i, C_i)`` counts an internal
    edge twice, as the volume does) and ``vol(C_i)`` the sum of C_i's degrees.

    Each row sums to 1; its diagonal entry is the share of the cluster's volume that stays
    inside it and its off-diagonal entries sum to the cluster's n-cut term ``cut / vol``, so
    ``k - trace(M)`` is the n-cut. Nodes labelled ``-1`` (removed) are left out; computed as
    ``P.T @ A @ P`` with the sparse ``[n, k]`` indicator ``P`` (linear in the edges).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != graph.n_nodes:
        raise ValueError(f"{len(labels)} labels for a graph of {graph.n_nodes} nodes.")
    kept = np.flatnonzero(labels >= 0)
    k = int(labels.max()) + 1 if kept.size else 0
    indicator = sp.csr_array(
        (np.ones(kept.size), (kept, labels[kept])), shape=(graph.n_nodes, k), dtype=np.float64
    )
    between = np.asarray((indicator.T @ sp.csr_array(graph.adjacency) @ indicator).toarray())
    volumes = between.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(volumes[:, None] > 0, between / volumes[:, None], 0.0)


def cluster_matrix_figure(matrix: np.ndarray, *, title: str | None = None) -> Figure:
    """Heat map of :func:`cluster_matrix`: row i, column j is the share of cluster i's volume on
    edges to cluster j (the diagonal: what stays inside). Values are printed in the cells for up
    to :data:`MATRIX_VALUES_UP_TO` clusters only: drawing k^2 labels cost more than the rest of
    the figure (170 against 65 ms of CPU at k = 12), and the tracker draws it at every measured
    step in its CPU-budgeted child."""
    k = matrix.shape[0]
    side = min(3.2 + 0.32 * k, 9.0)
    figure = _figure(side + 1.2, side)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of row cluster's volume")
    if 0 < k <= MATRIX_VALUES_UP_TO:
        for (row, column), value in np.ndenumerate(matrix):
            axes.text(
                column,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if value > 0.6 else "white",
            )
    if k <= 32:
        axes.set_xticks(np.arange(k), [str(c) for c in range(k)], fontsize=7)
        axes.set_yticks(np.arange(k), [str(c) for c in range(k)], fontsize=7)
    axes.set_xlabel("to cluster")
    axes.set_ylabel("from cluster")
    inside = float(np.trace(matrix)) / k if k else 0.0
    axes.set_title(
        title or f"Edge weight between clusters / volume (k = {k}; mean diagonal {inside:.2f})",
        fontsize=9,
    )
    return figure


def composition_figure(report: ClusterabilityReport, *, title: str | None = None) -> Figure:
    """Stacked bars: for each layer (x, from the input), its neurons split by cluster."""
    layer_names = [layer.name for layer in report.layers]
    n_layers = max(len(layer_names), 1)
    figure = _figure(min(4.0 + 0.45 * n_layers, 16.0), 4.6)
    axes = figure.add_subplot()
    positions = np.arange(len(layer_names))
    bottom = np.zeros(len(layer_names))
    colours = _colormap("tab20" if report.k <= 20 else "turbo")
    for cluster in report.partition.clusters:
        counts = np.array([cluster.per_layer.get(name, 0) for name in layer_names], dtype=float)
        colour = colours(cluster.cluster % 20 if report.k <= 20 else cluster.cluster / report.k)
        axes.bar(
            positions, counts, bottom=bottom, color=colour, label=str(cluster.cluster), width=0.8
        )
        bottom += counts
    rotation = 0 if len(layer_names) <= 8 else 90
    axes.set_xticks(positions, layer_names, rotation=rotation, fontsize=8)
    axes.set_xlabel("layer (from the input)")
    axes.set_ylabel("neurons")
    if report.k <= 24:
        axes.legend(
            title="cluster",
            fontsize=7,
            title_fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            ncols=1 if report.k <= 12 else 2,
        )
    step = f" at step {report.step}" if report.step is not None else ""
    axes.set_title(title or f"Cluster composition by layer{step} (k = {report.k})", fontsize=10)
    figure.tight_layout()
    return figure


def trajectory_figure(
    reports: Sequence[ClusterabilityReport],
    *,
    skipped_steps: Sequence[int] = (),
    title: str | None = None,
) -> Figure:
    """n-cut against training step, with the null model's mean ± one standard deviation.

    Reports without a step are placed at their index; reports without a baseline draw no band.
    ``skipped_steps`` (due but not measured: measuring could not keep up) are marked with a
    grey tick at the bottom of the plot, so a gap in the line is not read as a measurement.
    """
    ordered = sorted(
        enumerate(reports), key=lambda item: (item[1].step is None, item[1].step or item[0])
    )
    steps = np.array([r.step if r.step is not None else i for i, r in ordered], dtype=float)
    ncuts = np.array([r.ncut for _, r in ordered], dtype=float)
    figure = _figure(7.0, 4.2)
    axes = figure.add_subplot()
    with_null = [(s, r.baseline) for s, (_, r) in zip(steps, ordered, strict=True) if r.baseline]
    if with_null:
        null_steps = np.array([s for s, _ in with_null])
        means = np.array([b.mean for _, b in with_null])
        stds = np.array([b.std for _, b in with_null])
        method = with_null[-1][1].method
        axes.fill_between(
            null_steps,
            means - stds,
            means + stds,
            color="tab:gray",
            alpha=0.3,
            label=f"null ({method}) mean ± std",
        )
        axes.plot(null_steps, means, color="tab:gray", linestyle="--", linewidth=1)
    marker = "o" if len(steps) <= 60 else None
    axes.plot(steps, ncuts, color="tab:blue", marker=marker, markersize=3, label="n-cut")
    if len(skipped_steps):
        axes.plot(
            np.asarray(skipped_steps, dtype=float),
            np.zeros(len(skipped_steps)),
            linestyle="none",
            marker="|",
            markersize=10,
            color="tab:red",
            transform=axes.get_xaxis_transform(),  # x in steps, y at the bottom of the axes
            clip_on=False,
            label=f"skipped step ({len(skipped_steps)}, not measured)",
        )
    axes.set_xlabel("training step")
    axes.set_ylabel("n-cut (lower = more clusterable)")
    if len(steps):
        axes.legend(fontsize=8, loc="best")
    else:
        axes.text(0.5, 0.5, "no measurement", ha="center", va="center", transform=axes.transAxes)
    axes.grid(alpha=0.3)
    axes.set_title(title or "Clusterability over training", fontsize=10)
    figure.tight_layout()
    return figure


def save_png(figure: Figure, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG file; returns its path."""
    target = Path(path)
    figure.savefig(target, format="png", dpi=dpi)
    return target


def png_bytes(figure: Figure, *, dpi: int = 100) -> bytes:
    """The PNG encoding of ``figure``."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _colormap(name: str) -> Colormap:
    return matplotlib.colormaps[name].copy()
