"""Inert stand-ins for the classes and functions a pickle names, and what they hold.

A pickle that names other classes or functions (a whole pickled module, a checkpoint whose
hyper-parameters hold custom objects) is read with a :class:`StandIn` for each of them: nothing
named in the file is imported or called, the tensors are kept, and a pickled module's weights are
collected from its ``_parameters``/``_buffers`` in declaration order (:func:`stand_in_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch

#: visited path by path would otherwise take forever).
MAX_WALK_VISITS = 200_000

#: What the user can do about a pickle that cannot be read without running code from it.
TRUST_HINT = (
    "if you trust the file, pass --trust-pickle to unpickle it (this runs code from the file); "
    "better, save model.state_dict() (torch.save or safetensors) and audit that"
)


class StandIn:
    """An inert stand-in for a class or function that a pickle names.

    The weights-only unpickler may *create* one (in place of the class), *call* one (in place
    of the function) and *set its state*: each only records its arguments. Nothing of the real
    class or function is imported or run.
    """

    qualified_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        instance = object.__new__(cls)
        instance.__dict__["_args"] = args
        instance.__dict__["_state"] = None
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: ``__new__`` recorded the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualified_name}>"


def stand_in_class(name: str) -> type[StandIn]:
    """A :class:`StandIn` subclass standing for the global ``name`` a pickle names."""
    short = re.sub(r"\W", "_", name.rsplit(".", 1)[-1]) or "StandIn"
    return type(short, (StandIn,), {"qualified_name": name})


def stand_in_state_dict(root: StandIn) -> dict[str, Any]:
    """The ``state_dict()`` of a pickled ``nn.Module`` read with stand-ins, in declaration order:
    each module's parameters, then its persistent buffers, then its children."""
    found: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(node: StandIn, prefix: str, depth: int) -> None:
        if id(node) in seen or len(seen) > MAX_WALK_VISITS:
            return  # a module shared by two parents is read once (as its state_dict() does)
        seen.add(id(node))
        state = node.__dict__.get("_state")
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0]
        if not isinstance(state, Mapping) or depth > 64:
            return
        parameters = state.get("_parameters")
        if isinstance(parameters, Mapping):
            for name, value in parameters.items():
                if isinstance(value, torch.Tensor):
                    found[prefix + str(name)] = value
        skipped = state.get("_non_persistent_buffers_set")
        non_persistent = skipped if isinstance(skipped, (set, frozenset)) else set()
        buffers = state.get("_buffers")
        if isinstance(buffers, Mapping):
            for name, value in buffers.items():
                if isinstance(value, torch.Tensor) and name not in non_persistent:
                    found[prefix + str(name)] = value
        children = state.get("_modules")
        if isinstance(children, Mapping):
            for name, child in children.items():
                if isinstance(child, StandIn):
                    visit(child, f"{prefix}{name}.", depth + 1)

    visit(root, "", 0)
    return found


def is_stand_in_module(value: Any) -> bool:
    """Whether ``value`` stands in for a pickled ``nn.Module`` (its state has parameters and
    children)."""
    state = value.__dict__.get("_state") if isinstance(value, StandIn) else None
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]
    return isinstance(state, Mapping) and "_parameters" in state and "_modules" in state


def walk_objects(
    value: Any, max_depth: int = 16, max_visits: int = MAX_WALK_VISITS
) -> Iterator[Any]:
    """Every object in nested dicts/lists/tuples and stand-in states, each once.

    Bounded in depth *and* in visits: a pickle's memo lets a 2 KB file hold a DAG of shared
    lists whose paths number in the billions; each container is entered once, and the walk
    stops after ``max_visits`` objects.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(value, 0)]
    visits = 0
    while stack and visits < max_visits:
        item, depth = stack.pop()
        visits += 1
        yield item
        if depth >= max_depth:
            continue
        if isinstance(item, (Mapping, list, tuple, StandIn)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        elif isinstance(item, StandIn):
            children = [item.__dict__.get("_state")]
        else:
            continue
        stack.extend((child, depth + 1) for child in reversed(children))
