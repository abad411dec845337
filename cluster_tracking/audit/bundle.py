"""The files of an audit: the report bundle (``--out``, ``--log-to-run``), the comparison CSV and
chart of ``compare``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster_tracking.errors import ConfigError
from cluster_tracking.resources.limits import current_memory_limit, format_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cluster_tracking.audit.run import AuditResult

#: Files an audit writes (``--out``, ``--log-to-run``).
BUNDLE_FILES = (
    "report.json",
    "adjacency.png",
    "cluster_matrix.png",
    "composition.png",
    "report.html",
)


def write_bundle(
    result: AuditResult, folder: str | os.PathLike[str], *, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write the audit's files into ``folder`` (created if missing).

    ``report.json`` (the :class:`~cluster_tracking.report.ClusterabilityReport`), ``adjacency.png``
    (the weight graph ordered by cluster), ``cluster_matrix.png`` (edge weight between clusters
    over volume, k x k), ``composition.png`` (each layer's neurons by cluster), ``report.html``
    (self-contained, the images embedded), and ``audit.json`` when ``extra`` is given (what was
    audited, when, and where it was logged).

    Returns:
        File name -> path.
    """
    from cluster_tracking.viz.html_report import write_html
    from cluster_tracking.viz.plots import (
        adjacency_figure,
        cluster_matrix,
        cluster_matrix_figure,
        composition_figure,
        png_bytes,
    )

    target = make_folder(Path(folder))
    report = result.report
    graph = result.graph
    if not graph.assembled:  # a bounded-memory audit: the heat map needs the sparse adjacency
        needed = 3 * 12 * sum(block.weight.size for block in graph.blocks)
        if needed > current_memory_limit():
            raise ConfigError(
                f"{result.label}: the adjacency heat map of --out/--log-to-run needs the sparse "
                f"adjacency, about {format_size(needed)}, more than the memory limit of "
                f"{format_size(current_memory_limit())}; audit fewer --layers for the files, or "
                "drop --out/--log-to-run."
            )
        graph = graph.assemble()
    images = {
        "adjacency": png_bytes(
            adjacency_figure(
                graph,
                report.partition.labels,
                title=f"{result.label}: weight graph ordered by cluster",
            )
        ),
        "cluster_matrix": png_bytes(
            cluster_matrix_figure(cluster_matrix(result.graph, report.partition.labels))
        ),
        "composition": png_bytes(
            composition_figure(report, title=f"{result.label}: clusters by layer (k = {report.k})")
        ),
    }
    written = {
        "report.json": target / "report.json",
        "adjacency.png": target / "adjacency.png",
        "cluster_matrix.png": target / "cluster_matrix.png",
        "composition.png": target / "composition.png",
        "report.html": target / "report.html",
    }
    try:
        written["report.json"].write_text(report.to_json(indent=2) + "\n", encoding="utf-8")
        written["adjacency.png"].write_bytes(images["adjacency"])
        written["cluster_matrix.png"].write_bytes(images["cluster_matrix"])
        written["composition.png"].write_bytes(images["composition"])
        write_html(
            written["report.html"],
            [report],
            images=images,
            params=_params(result),
            title=f"Clusterability audit: {result.label}",
        )
        if extra is not None:
            written["audit.json"] = target / "audit.json"
            written["audit.json"].write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot write into {str(target)!r} ({error.strerror}).") from None
    return written


def make_folder(folder: Path) -> Path:
    """``folder``, created with its parents if missing.

    Raises:
        ConfigError: it cannot be created.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the folder {str(folder)!r} ({error.strerror or error})."
        ) from None
    return folder


def _params(result: AuditResult) -> dict[str, Any]:
    config = result.report.config
    params: dict[str, Any] = {
        "source": result.loaded.source,
        "read as": result.loaded.format,
    }
    if result.loaded.prefix:
        params["prefix removed"] = result.loaded.prefix
    for key in ("k", "shuffles", "method", "seed", "layers", "norm", "preset"):
        if config.get(key) is not None:
            params[key] = config[key]
    return params


def out_folders(results: Sequence[AuditResult], out: Path) -> dict[int, Path]:
    """``--out``'s folder of each result: ``out`` itself for one source, ``out/<label>/`` (unique
    names) for several."""
    if len(results) == 1:
        return {0: out}
    folders: dict[int, Path] = {}
    used: set[str] = set()
    for index, result in enumerate(results):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", result.label).strip("-.")[:80] or "source"
        name, number = slug, 1
        while name in used:
            number += 1
            name = f"{slug}-{number}"
        used.add(name)
        folders[index] = out / name
    return folders


CSV_COLUMNS = (
    "rank",
    "source",
    "label",
    "ncut",
    "null_mean",
    "null_std",
    "z_score",
    "p_value",
    "percentile",
    "k",
    "nodes",
    "nodes_clustered",
    "shuffles",
    "method",
    "seed",
    "read_as",
)


def write_csv(results: Sequence[AuditResult], path: str | os.PathLike[str]) -> Path:
    """The comparison table as CSV (columns :data:`CSV_COLUMNS`, rows in the given order)."""
    target = Path(path)
    try:
        if target.parent != Path():
            target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for rank, result in enumerate(results, start=1):
                report, baseline = result.report, result.report.baseline
                writer.writerow(
                    [
                        rank,
                        result.loaded.source,
                        result.label,
                        report.ncut,
                        _cell(baseline.mean if baseline else None),
                        _cell(baseline.std if baseline else None),
                        _cell(baseline.z_score if baseline else None),
                        _cell(baseline.p_value if baseline else None),
                        _cell(baseline.percentile if baseline else None),
                        report.k,
                        report.nodes.total,
                        report.nodes.clustered,
                        report.config.get("shuffles"),
                        report.config.get("method"),
                        report.config.get("seed"),
                        result.loaded.format,
                    ]
                )
    except OSError as error:
        raise ConfigError(
            f"cannot write the CSV file {str(target)!r} ({error.strerror})."
        ) from None
    return target


def _cell(value: float | None) -> str | float:
    return "" if value is None or not math.isfinite(value) else value


def comparison_figure(results: Sequence[AuditResult], *, title: str | None = None) -> Figure:
    """Each source's n-cut (dot) against its null model's mean ± one std (grey bar), in order."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [result.label for result in results]
    positions = np.arange(len(results))
    figure = Figure(figsize=(min(4.0 + 0.55 * len(results), 18.0), 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    with_null = [
        (position, result.report.baseline)
        for position, result in zip(positions, results, strict=True)
        if result.report.baseline is not None
    ]
    if with_null:
        axes.errorbar(
            [position for position, _ in with_null],
            [baseline.mean for _, baseline in with_null],
            yerr=[baseline.std for _, baseline in with_null],
            fmt="s",
            color="tab:gray",
            ecolor="tab:gray",
            capsize=4,
            markersize=5,
            label="null mean ± std",
        )
    axes.plot(
        positions,
        [result.report.ncut for result in results],
        "o",
        color="tab:blue",
        markersize=7,
        label="n-cut",
    )
    rotation = 0 if len(results) <= 4 and max(map(len, labels), default=0) <= 18 else 30
    axes.set_xticks(positions, labels, rotation=rotation, ha="right" if rotation else "center")
    axes.set_ylabel("n-cut (lower = more clusterable)")
    axes.set_xlim(-0.6, len(results) - 0.4)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8, loc="best")
    axes.set_title(title or "Clusterability by source (sorted by z)", fontsize=10)
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``figure`` to ``path`` in the format its extension names (PNG by default).

    Raises:
        ConfigError: the file cannot be written.
    """
    target = Path(path)
    suffix = target.suffix.lower().lstrip(".")
    try:
        if target.parent != Path():
            target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, format=suffix if suffix in ("png", "pdf", "svg") else "png", dpi=100)
    except OSError as error:
        raise ConfigError(f"cannot write the plot {str(target)!r} ({error.strerror}).") from None
    return target
