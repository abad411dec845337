"""A self-contained HTML report of a tracked training run.

One file that opens anywhere, offline: no external URL, no JavaScript, plots embedded as base64
PNG ``data:`` URIs, styles inline. It holds the n-cut trajectory, a table of every measured step
(step, n-cut, null mean ± std, diff, z-score, p-value, with the steps that were skipped or
failed in their place), and for the last step its cluster table, the k x k matrix of edge weight
between clusters, its heat map and its cluster composition chart. Numbers are written by the
helpers of :mod:`cluster_tracking.report` (fixed decimals, as in the CLI's tables).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster_tracking.report import (
    MISSING,
    P_FLOOR_NOTE,
    ClusterabilityReport,
    format_diff,
    format_ncut,
    format_null,
    format_number,
    format_p,
    format_z,
    p_at_floor,
)

#: Images the report embeds when they are given, by name (PNG bytes).
IMAGE_NAMES = ("trajectory", "cluster_matrix", "adjacency", "composition")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
p.meta { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f6f8fa; }
td.text, th.text { text-align: left; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.85rem; }
.verdict { padding: 0.6rem 0.9rem; background: #f6f8fa; border-left: 4px solid #0969da; }
tr.skipped td, tr.failed td { color: #8c959f; font-style: italic; }
"""


def render_html(
    reports: Sequence[ClusterabilityReport],
    *,
    images: Mapping[str, bytes] | None = None,
    params: Mapping[str, Any] | None = None,
    skipped_steps: Sequence[int] = (),
    failed_steps: Sequence[int] = (),
    title: str = "Clusterability report",
) -> str:
    """The HTML5 text of the report.

    Args:
        reports: the measured steps (sorted by step here).
        images: PNG bytes by name: ``trajectory`` (n-cut against step), ``cluster_matrix``,
            ``adjacency`` and ``composition`` (of the last step). Missing ones are left out.
        params: the tracker's settings, shown as a table.
        skipped_steps: steps not measured because the previous measurement was still running.
        failed_steps: steps whose measurement failed (see the run's warnings).
        title: the page title.
    """
    ordered = sorted(reports, key=lambda r: (r.step is None, r.step if r.step is not None else 0))
    images = dict(images or {})
    last = ordered[-1] if ordered else None
    parts = _head(title, last)
    parts.append("<p>No step was measured.</p>" if last is None else _verdict(last))
    if "trajectory" in images:
        parts.append(
            _figure(
                "trajectory",
                images["trajectory"],
                "n-cut against training step; grey band: null model mean ± one standard deviation; "
                "red ticks: skipped steps (due, not measured).",
            )
        )
    parts += _steps_section(ordered, skipped_steps, failed_steps)
    if last is not None:
        parts += _clusters_section(last, images)
    if params:
        parts.append("<h2>Settings</h2>")
        parts.append(_params_table(params))
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _head(title: str, last: ClusterabilityReport | None) -> list[str]:
    """The page up to its first section: the HTML head, the title and who generated it when."""
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version = last.versions.get("cluster_tracking", "") if last else ""
    return [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Generated {_e(generated)} by cluster-tracking {_e(version)}. '
        "Clusterability as in Filan et al. (2021), arXiv:2103.03386: the n-cut of a spectral "
        "partition of the weight graph, compared with weight-shuffled networks.</p>",
    ]


def _steps_section(
    ordered: Sequence[ClusterabilityReport],
    skipped_steps: Sequence[int],
    failed_steps: Sequence[int],
) -> list[str]:
    """The measured steps: their table, the p-value floor note, and the skipped and failed
    steps."""
    parts = ["<h2>Measured steps</h2>", _steps_table(ordered, skipped_steps, failed_steps)]
    if any(r.baseline is not None and p_at_floor(r.baseline) for r in ordered):
        parts.append(f'<p id="p-floor">{_e(P_FLOOR_NOTE)}</p>')
    if skipped_steps:
        listed = ", ".join(str(int(s)) for s in skipped_steps)
        parts.append(
            f'<p id="skipped">Skipped steps (due, but not measured: a measurement was still '
            f"running): {_e(listed)}</p>"
        )
    if failed_steps:
        listed = ", ".join(str(int(s)) for s in failed_steps)
        parts.append(f'<p id="failed">Failed steps (see the run\'s warnings): {_e(listed)}</p>')
    return parts


def _clusters_section(last: ClusterabilityReport, images: Mapping[str, bytes]) -> list[str]:
    """The clusters of the last measured step: their table and the figures of its partition."""
    step = f"step {last.step}" if last.step is not None else "the last report"
    parts = [f"<h2>Clusters at {_e(step)}</h2>", _clusters_table(last)]
    captions = {
        "cluster_matrix": "Edge weight between clusters, each row divided by its cluster's volume: "
        "the diagonal is the share that stays inside the cluster (a bright diagonal: "
        "modular), the rest of a row sums to the cluster's cut / volume.",
        "adjacency": "Adjacency matrix of the weight graph, nodes sorted by cluster.",
        "composition": "Neurons of each layer by cluster.",
    }
    for name, caption in captions.items():
        if name in images:
            parts.append(_figure(name, images[name], caption))
    return parts


def write_html(
    path: str | os.PathLike[str], reports: Sequence[ClusterabilityReport], **options: Any
) -> Path:
    """Write :func:`render_html` output to ``path`` (UTF-8); returns the path."""
    target = Path(path)
    target.write_text(render_html(reports, **options), encoding="utf-8")
    return target


def _verdict(report: ClusterabilityReport) -> str:
    baseline = report.baseline
    text = f"At step {report.step}, " if report.step is not None else "The last report: "
    text += f"n-cut {format_ncut(report.ncut)} with k = {report.k} clusters"
    if baseline is None:
        text += " (no null model was measured)."
    else:
        text += (
            f"; the {baseline.n} shuffled networks ({_e(baseline.method)}) have "
            f"{format_null(baseline)}: diff {format_diff(baseline)}, "
            f"z = {format_z(baseline.z_score)}, p = {format_p(baseline, long=True)}. "
        )
        if baseline.p_value <= 0.05 and (baseline.z_score or 0) < 0:
            text += "The network is more clusterable than its shuffles."
        else:
            text += "The network is not significantly more clusterable than its shuffles."
    return f'<p class="verdict">{text}</p>'


def _steps_table(
    reports: Sequence[ClusterabilityReport],
    skipped_steps: Sequence[int] = (),
    failed_steps: Sequence[int] = (),
) -> str:
    """Every measured step, with the skipped and failed ones in their place (marked)."""
    rows = [
        '<table id="steps">',
        "<thead><tr><th>step</th><th>n-cut</th><th>null mean ± std</th><th>diff (rel.)</th>"
        "<th>z</th><th>p</th><th>ave in/out</th></tr></thead>",
        "<tbody>",
    ]
    entries: list[tuple[float, int, str]] = []
    for index, report in enumerate(reports):
        baseline = report.baseline
        step = MISSING if report.step is None else str(report.step)
        entries.append(
            (
                float(report.step) if report.step is not None else float("inf"),
                index,
                f"<tr><td>{step}</td><td>{format_ncut(report.ncut)}</td>"
                f"<td>{format_null(baseline)}</td><td>{format_diff(baseline)}</td>"
                f"<td>{format_z(baseline.z_score) if baseline else MISSING}</td>"
                f"<td>{format_p(baseline)}</td>"
                f"<td>{format_number(report.ave_in_out, 3)}</td></tr>",
            )
        )
    for kind, steps in (("skipped", skipped_steps), ("failed", failed_steps)):
        why = "skipped: not measured" if kind == "skipped" else "failed: see the run's warnings"
        for number in steps:
            entries.append(
                (
                    float(number),
                    len(entries),
                    f'<tr class="{kind}"><td>{int(number)}</td><td colspan="6" class="text">'
                    f"{why}</td></tr>",
                )
            )
    rows += [row for _, _, row in sorted(entries)]
    rows += ["</tbody>", "</table>"]
    return "\n".join(rows)


def _clusters_table(report: ClusterabilityReport) -> str:
    layer_names = [layer.name for layer in report.layers]
    header = "".join(f"<th>{_e(name)}</th>" for name in layer_names)
    rows = [
        '<table id="clusters">',
        "<thead><tr><th>cluster</th><th>size</th><th>cut</th><th>volume</th>"
        f"<th>cut / volume</th>{header}</tr></thead>",
        "<tbody>",
    ]
    for cluster in report.partition.clusters:
        counts = "".join(f"<td>{cluster.per_layer.get(name, 0)}</td>" for name in layer_names)
        rows.append(
            f"<tr><td>{cluster.cluster}</td><td>{cluster.size}</td>"
            f"<td>{format_ncut(cluster.cut)}</td><td>{format_ncut(cluster.volume)}</td>"
            f"<td>{format_ncut(cluster.ncut_term)}</td>{counts}</tr>"
        )
    rows += ["</tbody>", "</table>"]
    removed = report.nodes.removed
    if removed:
        rows.append(f"<p>{removed} zero-degree node(s) were removed before clustering.</p>")
    return "\n".join(rows)


def _params_table(params: Mapping[str, Any]) -> str:
    rows = ['<table id="settings">', "<tbody>"]
    for key in sorted(params):
        rows.append(
            f'<tr><th class="text">{_e(str(key))}</th><td class="text">{_e(str(params[key]))}</td>'
            "</tr>"
        )
    rows += ["</tbody>", "</table>"]
    return "\n".join(rows)


def _figure(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="figure-{name}"><img id="{name}" alt="{_e(caption)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


def _e(text: str) -> str:
    return html.escape(text, quote=True)
