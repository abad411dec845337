"""The outbox of a platform sink: what it must deliver, in order, and what it delivered.

A sink that talks to a tracking platform (MLflow, W&B) first writes every item it is given to a
local spool, then sends it. The :class:`Outbox` is the durable part of that: it survives a crash or
an outage, so that every item is delivered once, in order, when the platform answers again.

Two files in the spool folder:

- ``outbox.jsonl``: one item per line, numbered by ``seq``; a line cut short by a crash is
  ignored (it was never acknowledged);
- ``delivered.json``: the item parts that are ``done`` (acknowledged), ``attempted`` (sent, but
  the outcome is unknown, so the sink checks the platform before sending again) and ``dropped``
  (refused for good; kept in the spool). A part's key is ``"<seq>:<part>"``.

The sink decides what the parts of an item are and how to send one; the outbox only keeps count.
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
        # After a restart nobody knows whether an in-flight send landed: check before resending.
        self.attempted: set[str] = set(record.get("attempted", []))

    def append(self, item: Item) -> Item:
        """Number ``item`` and write it durably at the end of the outbox."""
        item = {"seq": self.items[-1]["seq"] + 1 if self.items else 0, **item}
        line = json.dumps(item, allow_nan=False) + "\n"
        if not _ends_with_newline(self._items_file):
            line = "\n" + line  # after a line cut short by a crash
        with open(self._items_file, "a", encoding="utf-8") as handle:
            handle.write(line)
        self.items.append(item)
        return item

    def undelivered(self, item: Item) -> list[str]:
        """Keys of the parts of ``item`` neither done nor dropped, in delivery order."""
        keys = [f"{item['seq']}:{part}" for part in self._parts(item)]
        return [key for key in keys if key not in self.done and key not in self.dropped]

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
        self, *, done: str | None = None, attempted: str | None = None, dropped: str | None = None
    ) -> None:
        """Record a part as attempted, done or dropped, and write the record atomically."""
        if done is not None:
            self.done.add(done)
            self.attempted.discard(done)
        if attempted is not None:
            self.attempted.add(attempted)
        if dropped is not None:
            self.dropped.add(dropped)
        record = {
            **self._identity,
            "done": sorted(self.done, key=_key_order),
            "attempted": sorted(self.attempted, key=_key_order),
            "dropped": sorted(self.dropped, key=_key_order),
        }
        temporary = self._record_file.with_name(self._record_file.name + ".tmp")
        temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(temporary, self._record_file)


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
