"""Griffe extension: a module attribute's ``#:`` comment is its docstring.

The package documents its public constants the Sphinx way, with ``#:`` comment lines right above
the assignment (``METRIC_KEYS`` in ``cluster_tracking/report.py``), which griffe does not read.
This extension gives such an attribute, when it has no docstring of its own, the text of those
comment lines, so the API reference shows it and ``tests/test_docs.py`` can require it. Loaded by
mkdocstrings (``extensions:`` in ``mkdocs.yml``) and by the test.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class CommentDocstrings(griffe.Extension):
    """Read the ``#:`` lines above a module or class attribute as its docstring."""

    def on_attribute_instance(
        self,
        *,
        node: ast.AST | griffe.ObjectNode,
        attr: griffe.Attribute,
        agent: Any,
        **kwargs: Any,
    ) -> None:
        if attr.docstring is not None or attr.lineno is None or attr.parent is None:
            return
        try:
            lines = attr.parent.lines_collection[attr.parent.filepath]  # type: ignore[index]
        except (KeyError, TypeError, AttributeError):
            return
        comment: list[str] = []
        index = attr.lineno - 2  # the line above the assignment, 0-based
        while index >= 0 and lines[index].strip().startswith("#:"):
            comment.insert(0, lines[index].strip()[2:].strip())
            index -= 1
        if comment:
            attr.docstring = griffe.Docstring(
                "\n".join(comment), lineno=index + 2, endlineno=attr.lineno - 1, parent=attr
            )
