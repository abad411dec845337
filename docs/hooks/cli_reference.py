"""MkDocs hook: the CLI reference page, generated from the Typer app at build time.

A page holding the marker ``<!-- cli-reference -->`` gets, in its place, the Markdown that
Typer's own ``typer cluster_tracking.cli utils docs`` writes for ``cluster_tracking.cli:app``
(every command, argument and option with its help and default), its headings moved one level
down under the page's title. Run with this interpreter, so it documents the installed package. A
failure stops the build: a reference page that silently lost its content is worse than none.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

MARKER = "<!-- cli-reference -->"
COMMAND = [
    sys.executable,
    "-m",
    "typer",
    "cluster_tracking.cli",
    "utils",
    "docs",
    "--name",
    "cluster-tracking",
]


def cli_markdown() -> str:
    """The Typer app's reference in Markdown, headings one level down (``#`` becomes ``##``)."""
    done = subprocess.run(COMMAND, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"the CLI reference could not be generated: `{' '.join(COMMAND[1:])}` exited "
            f"{done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    lines, fence = [], False
    for line in done.stdout.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("#"):
            line = "#" + line
        lines.append(line)
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker with the generated reference (pages without it pass unchanged)."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_markdown())
