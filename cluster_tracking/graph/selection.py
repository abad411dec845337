"""``layers=``: the one parser for the layer selections of every entry point.

:func:`weight_graph`, :func:`~cluster_tracking.measure`, the tracker, the framework callbacks and
the CLI's ``--layers`` all take the same selections:

- a list of layer names, in data-flow order (the chain the graph is built from);
- entries may be shell-style glob patterns (``*``, ``?``, ``[...]``, as :mod:`fnmatch`, where
  ``*`` also crosses dots): a pattern stands for every measurable layer (Linear/Conv module, or a
  state_dict's weight prefix) whose name it matches, in declaration order, in its place in the
  list;
- a string of entries separated by ``|`` (``"*.intermediate.dense|*.output.dense"``): the
  selected names then come in declaration order (for transformers, the data-flow order).

A name selected twice is kept once. A pattern that matches no layer is an error listing the
available ones.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from cluster_tracking.errors import ConfigError, GraphError

__all__ = ["is_pattern", "list_names", "parse_layers", "select_layers"]

_GLOB_CHARS = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """Whether ``name`` is a glob pattern rather than a plain layer name."""
    return any(char in _GLOB_CHARS for char in name)


def parse_layers(layers: str | Iterable[str] | None) -> list[str] | None:
    """The entries of a ``layers=`` value (``"a|b.*"`` gives ``["a", "b.*"]``); ``None`` stays
    ``None`` (the whole model). Raises :class:`ConfigError` for an empty entry or a value that is
    neither a string nor a list of strings."""
    if layers is None:
        return None
    if isinstance(layers, str):
        entries = [part.strip() for part in layers.split("|")]
    elif isinstance(layers, Iterable) and not isinstance(layers, bytes):
        entries = []
        for item in layers:
            if not isinstance(item, str):
                raise ConfigError(
                    f"layers must be layer names or glob patterns (strings), got {item!r} in "
                    f"{layers!r}; e.g. layers=['fc1', 'fc2'] or layers='blocks.*.mlp.*'."
                )
            entries.append(item.strip())
    else:
        raise ConfigError(
            f"layers must be a list of layer names or a '|'-separated string of glob patterns, "
            f"got {layers!r}; e.g. layers=['fc1', 'fc2'] or layers='blocks.*.mlp.*'."
        )
    if not entries or any(not entry for entry in entries):
        raise ConfigError(
            f"layers={layers!r} holds an empty entry, which selects no layer; name the "
            "Linear/Conv layers to use."
        )
    return entries


def select_layers(
    layers: str | Iterable[str], available: Sequence[str], *, what: str = "the model"
) -> list[str]:
    """The layer names a selection stands for, given the measurable layers of ``what`` in
    declaration order (``available``). Plain names are kept as given (the graph reader checks
    them and lists the available names when one is wrong)."""
    entries = parse_layers(layers)
    assert entries is not None
    order = {name: index for index, name in enumerate(available)}
    selected: list[str] = []
    for entry in entries:
        if not is_pattern(entry):
            selected.append(entry)
            continue
        matches = [name for name in available if fnmatch.fnmatchcase(name, entry)]
        if not matches:
            raise GraphError(
                f"layers pattern {entry!r} matches no Linear/Conv layer of {what}. Available: "
                f"{list_names(available)}."
            )
        selected.extend(matches)
    unique = list(dict.fromkeys(selected))
    if isinstance(layers, str):  # declaration order; unknown names last, for the reader to report
        unique.sort(key=lambda name: order.get(name, len(order)))
    return unique


def list_names(names: Sequence[str], limit: int = 12) -> str:
    """``'a', 'b', ... (N in all)``: names for a message, at most ``limit`` of them."""
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
