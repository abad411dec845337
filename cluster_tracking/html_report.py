"""A self-contained HTML report of a tracked training run.

One file that opens anywhere, offline: no external URL, no JavaScript, plots embedded as base64
PNG ``data:`` URIs, styles inline. It holds the n-cut trajectory, a table of every measured step
(step, n-cut, null mean ± std, z-score, p-value), the steps that were skipped or failed, and for
the last step its heat map, its cluster composition chart and its cluster table.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster_tracking.report import ClusterabilityReport

#: Images the report embeds when they are given, by name (PNG bytes).
IMAGE_NAMES = ("trajectory", "adjacency", "composition")

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
        images: PNG bytes by name: ``trajectory`` (n-cut against step), ``adjacency`` and
            ``composition`` (of the last step). Missing ones are left out.
        params: the tracker's settings, shown as a table.
        skipped_steps: steps not measured because the previous measurement was still running.
        failed_steps: steps whose measurement failed (see the run's warnings).
        title: the page title.
    """
    ordered = sorted(reports, key=lambda r: (r.step is None, r.step if r.step is not None else 0))
    images = dict(images or {})
    last = ordered[-1] if ordered else None
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version = last.versions.get("cluster_tracking", "") if last else ""
    parts = [
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
    if last is None:
        parts.append("<p>No step was measured.</p>")
    else:
        parts.append(_verdict(last))
    if "trajectory" in images:
        parts.append(
            _figure(
                "trajectory",
                images["trajectory"],
                "n-cut against training step; grey band: null model mean ± one standard deviation.",
            )
        )
    parts.append("<h2>Measured steps</h2>")
    parts.append(_steps_table(ordered))
    if skipped_steps:
        listed = ", ".join(str(int(s)) for s in skipped_steps)
        parts.append(
            f'<p id="skipped">Skipped steps (a measurement was still running): {_e(listed)}</p>'
        )
    if failed_steps:
        listed = ", ".join(str(int(s)) for s in failed_steps)
        parts.append(f'<p id="failed">Failed steps (see the run\'s warnings): {_e(listed)}</p>')
    if last is not None:
        step = f"step {last.step}" if last.step is not None else "the last report"
        parts.append(f"<h2>Clusters at {_e(step)}</h2>")
        parts.append(_clusters_table(last))
        if "adjacency" in images:
            parts.append(
                _figure(
                    "adjacency",
                    images["adjacency"],
                    "Adjacency matrix of the weight graph, nodes sorted by cluster.",
                )
            )
        if "composition" in images:
            parts.append(
                _figure("composition", images["composition"], "Neurons of each layer by cluster.")
            )
    if params:
        parts.append("<h2>Settings</h2>")
        parts.append(_params_table(params))
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


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
    text += f"n-cut {_num(report.ncut)} with k = {report.k} clusters"
    if baseline is None:
        text += " (no null model was measured)."
    else:
        text += (
            f"; the {baseline.n} shuffled networks ({_e(baseline.method)}) have "
            f"{_num(baseline.mean)} ± {_num(baseline.std)}: z = {_num(baseline.z_score, 2)}, "
            f"p = {_num(baseline.p_value, 3)}. "
        )
        if baseline.p_value <= 0.05 and (baseline.z_score or 0) < 0:
            text += "The network is more clusterable than its shuffles."
        else:
            text += "The network is not significantly more clusterable than its shuffles."
    return f'<p class="verdict">{text}</p>'


def _steps_table(reports: Sequence[ClusterabilityReport]) -> str:
    rows = [
        '<table id="steps">',
        "<thead><tr><th>step</th><th>n-cut</th><th>null mean ± std</th><th>z</th><th>p</th>"
        "<th>ave in/out</th></tr></thead>",
        "<tbody>",
    ]
    for report in reports:
        baseline = report.baseline
        null = f"{_num(baseline.mean)} ± {_num(baseline.std)}" if baseline else "—"
        z = _num(baseline.z_score, 2) if baseline else "—"
        p = _num(baseline.p_value, 3) if baseline else "—"
        step = "—" if report.step is None else str(report.step)
        rows.append(
            f"<tr><td>{step}</td><td>{_num(report.ncut)}</td><td>{null}</td><td>{z}</td>"
            f"<td>{p}</td><td>{_num(report.ave_in_out, 3)}</td></tr>"
        )
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
            f"<tr><td>{cluster.cluster}</td><td>{cluster.size}</td><td>{_num(cluster.cut)}</td>"
            f"<td>{_num(cluster.volume)}</td><td>{_num(cluster.ncut_term)}</td>{counts}</tr>"
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


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
