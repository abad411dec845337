"""Read back what an offline W&B run wrote: its ``run-<id>.wandb`` record log and ``files/``.

W&B has no public API for offline runs, so the tests read the run's transaction log directly.

Version note (checked against wandb 0.31.0): the log is written by ``wandb-core`` (Go) in the
format that ``wandb.sdk.internal.datastore.DataStore`` read and wrote before the Python internal
process was removed. wandb 0.31 ships neither ``DataStore`` nor any other Python reader of it, so
this module implements the format itself:

* a 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` (uint16, little endian), version ``0``;
* then LevelDB-log style chunks in 32 KiB blocks: a 7-byte chunk header (CRC-32 as uint32, length
  as uint16, chunk type as uint8: 1 full, 2 first, 3 middle, 4 last), then ``length`` bytes. The
  CRC is ``zlib.crc32(data, zlib.crc32(bytes([type])))``. A block's tail of fewer than 7 bytes is
  zero padding. Chunks of types 2, 3, 4 are joined into one record;
* each record is a serialized ``wandb.proto.wandb_internal_pb2.Record`` (still shipped in 0.31).

What it relies on in ``wandb_internal_pb2`` (0.31): ``Record`` with the ``record_type`` oneof
(``history``, ``summary``, ``config``, ``artifact``, ``metric``, ``run``, ``files``...);
``HistoryItem`` keyed by ``key`` or ``nested_key`` with the value in ``value_json`` (or, with
``x_history_value_encoding="typed"``, in the ``none``/``boolean``/``integer``/``number``/``text``
/``json`` fields); ``SummaryRecord.update``/``remove``; ``ConfigRecord.update``;
``ArtifactRecord`` with ``name``, ``type``, ``aliases``, ``metadata`` (JSON text) and
``manifest.contents`` (``path``, ``digest``, ``size``, ``local_path`` in the staging folder).

Offline runs of wandb 0.31 write no ``files/wandb-summary.json``: the summary is rebuilt here from
the log's summary records, in order. Media (images, tables) are in ``files/media/``; the history
row holds each one's ``path`` relative to ``files/``.
"""

from __future__ import annotations

import importlib
import json
import struct
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The generated protobuf module has no type stubs.
pb: Any = importlib.import_module("wandb.proto.wandb_internal_pb2")

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineArtifact:
    """One ``log_artifact`` call: the artifact's name, type, aliases, metadata and files
    (path inside the artifact -> staged copy on disk)."""

    name: str
    type: str
    aliases: list[str]
    digest: str
    metadata: dict[str, Any]
    files: dict[str, Path]


@dataclass
class OfflineRun:
    """What one offline run wrote, decoded.

    Attributes:
        directory: the run's folder (``.../wandb/offline-run-<time>-<id>``).
        run_id: the run's id.
        history: one dict per written history row, keys as logged (nested media metadata as
            nested dicts), in order.
        summary: the final run summary.
        config: the run's config (key -> value).
        artifacts: every logged artifact, in order.
        metric_definitions: the ``define_metric`` records (name or glob -> step metric).
    """

    directory: Path
    run_id: str
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    artifacts: list[OfflineArtifact] = field(default_factory=list)
    metric_definitions: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> Path:
        """The run's ``files/`` folder (media, tables, requirements...)."""
        return self.directory / "files"

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        """The history rows that hold ``key``."""
        return [row for row in self.history if key in row]

    def series(self, key: str, step_key: str) -> dict[Any, Any]:
        """``key``'s values by ``step_key`` (e.g. ``clusterability/ncut`` by
        ``clusterability/step``), from the rows that hold both; a repeated step raises."""
        values: dict[Any, Any] = {}
        for row in self.rows_with(key):
            if step_key in row:
                step = row[step_key]
                assert step not in values, f"{key} logged twice at {step_key}={step}"
                values[step] = row[key]
        return values

    def artifacts_named(self, name: str) -> list[OfflineArtifact]:
        """The logged versions of the artifact ``name``, in order."""
        return [artifact for artifact in self.artifacts if artifact.name == name]


def read_records(path: str | Path) -> Iterator[Any]:
    """Every record of a ``.wandb`` file, in order (checks header and CRCs)."""
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: too short for a W&B record log")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (_IDENT, _MAGIC, _VERSION):
        raise ValueError(f"{path}: not a W&B record log (header {ident!r} {magic:#x} {version})")
    position, pending = _FILE_HEADER.size, b""
    while position < len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # zero padding at the end of a block
            position += left_in_block
            continue
        if position + _CHUNK_HEADER.size > len(data):
            raise ValueError(f"{path}: chunk header cut short at byte {position}")
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        start = position + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) != length:
            raise ValueError(f"{path}: record cut short at byte {position}")
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: CRC mismatch at byte {position}")
        position = start + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {position}")
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def find_run_dir(wandb_dir: str | Path, run_id: str) -> Path:
    """The folder of run ``run_id`` under a ``WANDB_DIR`` (or its ``wandb/`` subfolder)."""
    root = Path(wandb_dir)
    candidates = sorted(root.glob(f"**/offline-run-*-{run_id}"))
    if not candidates:
        raise FileNotFoundError(f"no offline run {run_id} under {root}")
    return candidates[-1]


def read_offline_run(directory: str | Path, timeout: float = 30.0) -> OfflineRun:
    """Decode the finished run in ``directory`` (a run folder holding ``run-<id>.wandb``).

    ``run.finish()`` returns before wandb-core has written the end of the log, so this waits
    (up to ``timeout`` seconds) until the log holds the run's ``exit`` record: records are
    written in order, so everything logged before ``finish()`` is then on disk.
    """
    directory = Path(directory)
    logs = sorted(directory.glob("run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {directory}, found {logs}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(read_records(logs[0]))
        except ValueError:  # the last record is being written
            records = []
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{logs[0]} has no exit record after {timeout} s: is the run finished?"
            )
        time.sleep(0.05)
    run = OfflineRun(directory=directory, run_id=logs[0].stem.removeprefix("run-"))
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, _key_path(item), _history_value(item))
            run.history.append(row)
        elif kind == "summary":
            for update in record.summary.update:
                _set(run.summary, _key_path(update), json.loads(update.value_json))
            for removed in record.summary.remove:
                _remove(run.summary, _key_path(removed))
        elif kind == "config":
            for update in record.config.update:
                _set(run.config, _key_path(update), json.loads(update.value_json))
        elif kind == "run":
            for update in record.run.config.update:
                _set(run.config, _key_path(update), json.loads(update.value_json))
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append(
                OfflineArtifact(
                    name=artifact.name,
                    type=artifact.type,
                    aliases=list(artifact.aliases),
                    digest=artifact.digest,
                    metadata=json.loads(artifact.metadata) if artifact.metadata else {},
                    files={
                        entry.path: Path(entry.local_path) for entry in artifact.manifest.contents
                    },
                )
            )
        elif kind == "metric":
            metric = record.metric
            name = metric.name or metric.glob_name
            run.metric_definitions[name] = metric.step_metric
    return run


def _key_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _history_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    typed = item.WhichOneof("value")
    if typed is None or typed == "none":
        return None
    value = getattr(item, typed)
    return json.loads(value) if typed == "json" else value


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for name in path[:-1]:
        child = target.get(name)
        if not isinstance(child, dict):
            child = target[name] = {}
        target = child
    target[path[-1]] = value


def _remove(target: dict[str, Any], path: list[str]) -> None:
    for name in path[:-1]:
        child = target.get(name)
        if not isinstance(child, dict):
            return
        target = child
    target.pop(path[-1], None)


@contextmanager
def offline_wandb(
    home: Path, monkeypatch: pytest.MonkeyPatch, extra: Mapping[str, str] | None = None
) -> Iterator[Path]:
    """An offline W&B environment under ``home`` (runs in ``home``): no login, no network, no
    git, no code saving; ``extra`` sets more ``WANDB_*`` variables. W&B's process-wide setup is
    torn down before (so an earlier test's settings do not leak in) and after, with any run
    left open finished."""
    import wandb

    for name, folder in {
        "WANDB_DIR": home,
        "WANDB_CACHE_DIR": home / "cache",
        "WANDB_CONFIG_DIR": home / "config",
        "WANDB_DATA_DIR": home / "data",
    }.items():
        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(folder))
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # were anything to call out
        **(extra or {}),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()
    try:
        yield home
    finally:
        if wandb.run is not None:
            wandb.run.finish()
        wandb.teardown()
