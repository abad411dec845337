"""The outbox of a platform sink: what it must deliver, in order, and what it delivered.

A sink that talks to a tracking platform (MLflow, W&B) first writes every item it is given to a
local spool, then sends it. The :class:`Outbox` is the durable part of that: it survives a crash or
an outage, so that every item is delivered once, in order, when the platform answers again.

Two files in the spool folder:

- ``outbox.jsonl``: one item per line, numbered by ``seq``; a line cut short by a crash is
  ignored (it was never acknowledged);
- ``delivered.json``: the item parts that are ``done`` (acknowledged), ``attempted`` (sent, but
  the outcome is unknown, so the sink checks the platform before sending again), ``dropped``
  (refused for good; kept in the spool) and ``thinned`` (given up on purpose to keep a backlog
  bounded, e.g. the plots of an old step while the platform was slow), and ``next_seq``. A part's
  key is ``"<seq>:<part>"``.

Delivered items leave the outbox at once (:meth:`Outbox.prune`), so at steady state with a
reachable platform the outbox holds only what is in flight, however long the run. The sink decides
what the parts of an item are and how to send one; the outbox only keeps count.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Where sinks put their spools when no ``spool_dir`` is given (one folder per run).
DEFAULT_SPOOL_ROOT = Path(tempfile.gettempdir()) / "cluster-tracking-spool"

Item = dict[str, Any]


class Outbox:
    """The items of one spool folder and their delivery record.

    Args:
        folder: the spool folder (created by the sink's local spool before the first item).
        parts: the parts of an item, delivered and recorded one by one, in this order.
        identity: written into ``delivered.json`` beside the record (e.g. the run id), so a
            person reading the spool knows where it belongs.
    """

    def __init__(
        self,
        folder: Path,
        parts: Callable[[Item], Sequence[str]],
        identity: Mapping[str, str],
    ) -> None:
        self.folder = folder
        self._parts = parts
        self._identity = dict(identity)
        self._items_file = folder / "outbox.jsonl"
        self._record_file = folder / "delivered.json"
        self.items: list[Item] = _read_jsonl(self._items_file)
        record = _read_json(self._record_file)
        self.done: set[str] = set(record.get("done", []))
        self.dropped: set[str] = set(record.get("dropped", []))
        self.thinned: set[str] = set(record.get("thinned", []))
        self._next_seq = int(record.get("next_seq", 0))
        # After a restart nobody knows whether an in-flight send landed: check before resending.
        self.attempted: set[str] = set(record.get("attempted", []))

    def append(self, item: Item) -> Item:
        """Number ``item`` and write it durably at the end of the outbox."""
        seq = max(self._next_seq, self.items[-1]["seq"] + 1 if self.items else 0)
        item = {"seq": seq, **item}
        self._next_seq = seq + 1
        line = json.dumps(item, allow_nan=False) + "\n"
        if not _ends_with_newline(self._items_file):
            line = "\n" + line  # after a line cut short by a crash
        with open(self._items_file, "a", encoding="utf-8") as handle:
            handle.write(line)
        self.items.append(item)
        return item

    def undelivered(self, item: Item) -> list[str]:
        """Keys of the parts of ``item`` neither done, dropped nor thinned, in delivery order."""
        keys = [f"{item['seq']}:{part}" for part in self._parts(item)]
        settled = (self.done, self.dropped, self.thinned)
        return [key for key in keys if not any(key in keys_ for keys_ in settled)]

    @property
    def pending(self) -> int:
        """Number of items with a part still to deliver."""
        return sum(1 for item in self.items if self.undelivered(item))

    def drain(self, deliver: Callable[[Item, str], bool]) -> bool:
        """Call ``deliver(item, key)`` for every undelivered part, in order; stop at the first
        one it could not deliver (False). True when nothing is left."""
        for item in self.items:
            for key in self.undelivered(item):
                if not deliver(item, key):
                    return False
        return True

    def mark(
        self,
        *,
        done: str | Sequence[str] | None = None,
        attempted: str | Sequence[str] | None = None,
        dropped: str | None = None,
        thinned: str | None = None,
    ) -> None:
        """Record parts as attempted, done, dropped or thinned (one key or several), and write
        the record atomically."""
        for key in _keys(done):
            self.done.add(key)
            self.attempted.discard(key)
        self.attempted.update(_keys(attempted))
        self.dropped.update(_keys(dropped))
        for key in _keys(thinned):
            self.thinned.add(key)
            self.attempted.discard(key)
        self._write_record()

    def prune(self) -> list[Item]:
        """Remove the items whose every part is done or thinned from the outbox and the record
        (an item with a dropped part stays, for a person to look at). Returns the removed items."""
        removed = [
            item
            for item in self.items
            if all(
                f"{item['seq']}:{part}" in self.done or f"{item['seq']}:{part}" in self.thinned
                for part in self._parts(item)
            )
        ]
        if not removed:
            return []
        gone = {item["seq"] for item in removed}
        self.items = [item for item in self.items if item["seq"] not in gone]
        lines = "".join(json.dumps(item, allow_nan=False) + "\n" for item in self.items)
        temporary = self._items_file.with_name(self._items_file.name + ".tmp")
        temporary.write_text(lines, encoding="utf-8")
        os.replace(temporary, self._items_file)
        for keys in (self.done, self.thinned, self.attempted):
            keys.difference_update({key for key in keys if _key_order(key)[0] in gone})
        self._write_record()
        return removed

    def _write_record(self) -> None:
        record = {
            **self._identity,
            "next_seq": self._next_seq,
            "done": sorted(self.done, key=_key_order),
            "attempted": sorted(self.attempted, key=_key_order),
            "dropped": sorted(self.dropped, key=_key_order),
            "thinned": sorted(self.thinned, key=_key_order),
        }
        temporary = self._record_file.with_name(self._record_file.name + ".tmp")
        temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(temporary, self._record_file)


def _keys(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _key_order(key: str) -> tuple[int, str]:
    seq, _, part = key.partition(":")
    return (int(seq) if seq.isdigit() else -1, part)


def _read_jsonl(path: Path) -> list[Item]:
    if not path.exists():
        return []
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: it was never acknowledged
            continue
    return items


def _ends_with_newline(path: Path) -> bool:
    """True for a missing or empty file, or one whose last byte is a newline."""
    if not path.exists() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
