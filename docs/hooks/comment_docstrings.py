"""Griffe extensions for the package's Sphinx-flavoured docstrings (loaded from ``mkdocs.yml``).

- :class:`CommentDocstrings`: the package documents its public constants the Sphinx way, with
  ``#:`` comment lines right above the assignment (``METRIC_KEYS`` in
  ``cluster_tracking/report.py``), which griffe does not read. An attribute with no docstring of
  its own gets the text of those lines, so the API reference shows it and ``tests/test_docs.py``
  can require it.
- :class:`SphinxRoles`: docstrings cross-reference with Sphinx roles (``:class:`~a.b.C```,
  ``:func:`a.b.f```), which Markdown would print verbatim. Each becomes a code span of the name
  as Sphinx shows it (the last part after ``~``). Not a link: many targets are internal modules
  the reference does not document, and a dangling link fails the strict build.
"""

from __future__ import annotations

import ast
import re
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


ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def _code_span(match: re.Match[str]) -> str:
    target = match.group(2).strip()
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    """Turn Sphinx cross-reference roles in docstrings into Markdown code spans."""

    def on_instance(
        self, *, node: ast.AST | griffe.ObjectNode, obj: griffe.Object, agent: Any, **kwargs: Any
    ) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_code_span, obj.docstring.value)
