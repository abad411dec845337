"""The self-contained ``report.html``: no external URL, no script, and it renders in a real browser.

The browser test opens the file in headless Chromium (Debian's ``chromium`` package) and checks
that it loads without console errors, that the rendered DOM holds the trajectory image and the
cluster table, and takes a screenshot.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

from cluster_tracking.report import ClusterabilityReport
from cluster_tracking.tracking.sinks import LocalDirectorySink
from cluster_tracking.tracking.tracker import ClusterabilityTracker
from cluster_tracking.viz.html_report import render_html

CHROMIUM = "/usr/bin/chromium"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
K = 4


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ClusterabilityReport]]:
    """report.html of a short tracked run (3 measured steps)."""
    folder = tmp_path_factory.mktemp("html-report")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    with ClusterabilityTracker(
        [LocalDirectorySink(folder)],
        every_n_steps=4,
        k=K,
        shuffles=4,
        on_backlog="queue",
        worker="thread",
    ) as tracker:
        for step in range(9):
            loss = nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            tracker.step(model, step)
    return folder / "clusterability" / "report.html", tracker.reports


class _Structure(HTMLParser):
    """Collects what the checks need: tags, image sources, tables' rows, every URL-ish attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.doctype: str | None = None
        self.images: dict[str, str] = {}
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.rows: dict[str, int] = {}
        self._table: str | None = None
        self._in_body = False

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.append(tag)
        for name in ("src", "href", "action", "poster", "srcset"):
            if values.get(name):
                self.urls.append(str(values[name]))
        if tag == "img":
            self.images[str(values.get("id"))] = str(values.get("src"))
        if tag == "table":
            self._table = values.get("id")
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._table and self._in_body:
            self.rows[self._table] = self.rows.get(self._table, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        if tag == "table":
            self._table = None


def test_report_html_is_self_contained(tracked: tuple[Path, list[ClusterabilityReport]]) -> None:
    path, reports = tracked
    text = path.read_text(encoding="utf-8")
    page = _Structure()
    page.feed(text)

    assert page.doctype is not None and page.doctype.lower() == "doctype html"
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"(https?:)?//[a-z0-9]|url\(|@import", without_images, re.I)
    assert all(url.startswith("data:image/png;base64,") for url in page.urls)
    assert set(page.images) == {"trajectory", "cluster_matrix", "adjacency", "composition"}
    for source in page.images.values():
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
    assert page.rows["steps"] == len(reports) == 3
    assert page.rows["clusters"] == K
    last = reports[-1]
    assert f"Clusters at step {last.step}" in text
    assert f"{last.ncut:.3f}" in text  # n-cuts with the report's fixed 3 decimals
    assert last.baseline is not None
    assert f"{last.baseline.mean:.3f} ± {last.baseline.std:.3f}" in text


def test_skipped_and_failed_steps_are_rows_of_the_steps_table_in_step_order(
    tracked: tuple[Path, list[ClusterabilityReport]],
) -> None:
    _, reports = tracked  # steps 0, 4, 8
    text = render_html(reports, skipped_steps=[2, 6], failed_steps=[5])
    page = _Structure()
    page.feed(text)
    assert page.rows["steps"] == len(reports) + 3
    table = text[text.index('<table id="steps">') : text.index("</table>", text.index("steps"))]
    cells = re.findall(r"<tr(?: class=\"(\w+)\")?><td>(\d+)</td>", table)
    assert cells == [
        ("", "0"),
        ("skipped", "2"),
        ("", "4"),
        ("failed", "5"),
        ("skipped", "6"),
        ("", "8"),
    ]


def test_the_verdict_says_when_p_sits_at_its_floor(
    tracked: tuple[Path, list[ClusterabilityReport]],
) -> None:
    _, reports = tracked
    last = reports[-1]
    assert last.baseline is not None
    text = render_html([last])
    verdict = text[text.index('class="verdict"') :].split("</p>", 1)[0]
    assert f"diff {last.baseline.diff:+.3f}" in verdict
    at_floor = abs(last.baseline.p_value - 1 / (last.baseline.n + 1)) < 1e-12
    assert ("(the floor for 4 shuffles)" in verdict) == at_floor


def test_report_html_without_measurements_still_renders() -> None:
    text = render_html([], skipped_steps=[3, 4], failed_steps=[5])
    page = _Structure()
    page.feed(text)
    assert "No step was measured" in text and "3, 4" in text and "5" in text
    assert page.images == {}


def _chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    message = (
        f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`) to run "
        "the browser test of report.html"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _chromium(binary: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_html_renders_in_chromium_without_errors(
    tracked: tuple[Path, list[ClusterabilityReport]], tmp_path: Path
) -> None:
    binary = _chromium_or_skip()
    path, reports = tracked
    url = path.resolve().as_uri()

    loaded = _chromium(
        binary, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", url
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    console = [line for line in loaded.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "the page logged to the browser console"
    dom = _Structure()
    dom.feed(loaded.stdout)
    assert dom.images["trajectory"].startswith("data:image/png;base64,")
    assert dom.rows["clusters"] == K and dom.rows["steps"] == len(reports)

    screenshot = tmp_path / "report.png"
    shot = _chromium(
        binary,
        tmp_path / "profile-shot",
        "--hide-scrollbars",
        "--window-size=1200,2400",
        f"--screenshot={screenshot}",
        url,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes().startswith(PNG_SIGNATURE)
    kept = os.environ.get("CLUSTER_TRACKING_SCREENSHOT_DIR")
    if kept:  # to look at the rendering: CLUSTER_TRACKING_SCREENSHOT_DIR=/tmp pytest ...
        shutil.copy(screenshot, Path(kept) / "report-html-screenshot.png")


def test_the_plots_and_the_html_report_import_no_torch() -> None:
    """The tracker's torch-free child draws the plots and writes report.html: neither may load
    torch (the graph's types come from the torch-free graph/types.py)."""
    import sys

    code = (
        "import sys\n"
        "import cluster_tracking.viz.plots, cluster_tracking.viz.html_report\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] == 'torch')\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
