"""Where the commands print: a Rich console sized for a terminal or for a file, and the one red
error line."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

#: Width of the output when it does not go to a terminal (a file, a pipe) and ``COLUMNS`` does
#: not say otherwise: wide enough that no table or line is wrapped, as it would be at Rich's
#: default of 80 columns.
UNWRAPPED_WIDTH = 1000


def console(*, stderr: bool = False) -> Console:
    """The Rich console the commands print with: the terminal's width on a terminal; elsewhere
    ``$COLUMNS``, or :data:`UNWRAPPED_WIDTH` so that output piped to a file is not wrapped."""
    from rich.console import Console

    made = Console(stderr=stderr, highlight=False, soft_wrap=stderr)
    if not made.is_terminal and not os.environ.get("COLUMNS", "").strip().isdigit():
        made.width = UNWRAPPED_WIDTH
    return made


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, in red, on one line (the message's whitespace collapsed)."""
    from rich.markup import escape

    text = " ".join(message.split())
    console(stderr=True).print(f"[bold red]error:[/bold red] {escape(text)}")
