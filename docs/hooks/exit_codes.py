"""MkDocs hook: the exit-code table, generated from the one table in ``cluster_tracking.errors``.

A page holding the marker ``<!-- exit-codes -->`` gets, in its place,
:func:`cluster_tracking.errors.exit_codes_markdown` (code, name, meaning of every exit status), the
same table that ``exit_code()`` and the CLI's ``--help`` are generated from.
"""

from __future__ import annotations

from typing import Any

from cluster_tracking.errors import exit_codes_markdown

MARKER = "<!-- exit-codes -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker with the generated table (pages without it pass unchanged)."""
    return markdown.replace(MARKER, exit_codes_markdown()) if MARKER in markdown else markdown
