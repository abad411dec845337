"""Loading the weights of a model for an audit, without running code from the file.

An audit measures a model that was saved or logged before: a local checkpoint, an MLflow run's
artifact or logged model, or a W&B model artifact. :func:`load_source` reads any of them into what
:func:`~cluster_tracking.measure.measure` takes (a ``state_dict`` of a chain of layers, or a
``torch.nn.Module``) and remembers where it came from, so that ``--log-to-run`` can write the
result back into the run that produced the model.

Sources (:func:`parse_source`):

* a local file: ``.safetensors``; a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``,
  ...) holding a ``state_dict``, a checkpoint dict (``{"state_dict": ...}``,
  ``{"model_state_dict": ..., "optimizer_state_dict": ...}``, a Lightning ``.ckpt``) or a pickled
  module; a ``torch.export`` archive (``.pt2``); or a folder holding one of these or an MLflow model
  (a folder with an ``MLmodel`` file);
* ``runs:/<run_id>/<path>``: an artifact of an MLflow run (a weight file, a ``log_state_dict``
  folder, an MLflow model) or, in MLflow 3, a model the run logged under that name;
  ``runs:/<run_id>`` alone takes the run's model (:func:`run_model_uris`);
* ``models:/<name>/<version>``, ``models:/<name>@<alias>`` (also ``models:/<name>/<alias>``,
  ``.../latest``, ``.../<stage>``) and MLflow 3's ``models:/<model_id>``;
* ``wandb-artifact://<entity>/<project>/<name>[:<alias or version>]`` (default ``:latest``).

Safety. Loading never runs code from the file unless the user passes ``trust_pickle=True``:

* ``torch.save`` files are read with ``torch.load(..., weights_only=True)``, PyTorch's restricted
  unpickler, which only rebuilds tensors and plain containers;
* a pickle that names other classes or functions (a whole pickled module, a checkpoint whose
  hyper-parameters hold custom objects) is read again with an inert stand-in for each of them
  (:class:`_StandIn`): nothing named in the file is imported or called, the tensors are kept,
  and a pickled module's weights are collected from its ``_parameters``/``_buffers`` in
  declaration order, the order of its ``state_dict()``. Functions that PyTorch blocks outright
  (``os.system``...) stop the load;
* ``torch.export`` archives (``.pt2``, MLflow 3's default PyTorch format) are read as a zip of raw
  tensor bytes described by JSON; nothing is unpickled but through ``weights_only``;
* only ``trust_pickle=True`` unpickles for real (``torch.load(weights_only=False)``, or
  ``mlflow.pytorch.load_model`` for an MLflow model saved with pickle), which gives the model's
  own class and lets the weight graph follow its real data flow.

Hostile input. Only regular files are read (devices, FIFOs and sockets are refused before they
are opened; symlinks are followed only to regular files); a folder is searched to
:data:`MAX_FOLDER_DEPTH` levels and :data:`MAX_FOLDER_ENTRIES` entries. Every size a file declares
(safetensors header and offsets, zip members, ``.pt2`` shapes) is checked against the bytes really
there and against the memory limit (:mod:`cluster_tracking.resources.limits`, ``--max-memory``)
before
anything is allocated; deflated zip members are inflated as a stream against that limit first.
Every path an ``MLmodel`` file names must stay inside the model's folder. Weights whose
magnitudes mean nothing alone (bool masks, integer tensors without their quantization scales),
empty layers and all-zero models are refused with a :class:`~cluster_tracking.errors.GraphError`;
PyTorch's own quantized tensors are dequantized first.

Errors are :class:`~cluster_tracking.errors.SourceError` (missing, unreadable or untrusted
source; :class:`~cluster_tracking.errors.LimitError` when it would pass the memory limit),
:class:`PlatformError` (MLflow or W&B cannot be reached or refuses),
:class:`~cluster_tracking.errors.GraphError` (weights that cannot be measured) and
:class:`~cluster_tracking.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pickle
import re
import socket
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from cluster_tracking.errors import (
    ClusterTrackingError,
    GraphError,
    LimitError,
    PlatformError,
    SourceError,
)
from cluster_tracking.integrations.tracking_uri import PROBE_TIMEOUT, check_tracking_uri
from cluster_tracking.resources.limits import MemoryBudget, format_size, memory_limit

__all__ = [
    "WEIGHT_SUFFIXES",
    "LoadedModel",
    "PlatformError",
    "RunTarget",
    "SourceRef",
    "check_tracking_uri",
    "experiment_sources",
    "load_file",
    "load_source",
    "mlflow_client",
    "parse_source",
    "run_model_uris",
]

#: File name endings read as weight files when a folder or a run is searched for a model.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pt2")

#: How deep (folders inside the source folder) and how many entries a folder source is searched.
MAX_FOLDER_DEPTH = 4
MAX_FOLDER_ENTRIES = 2000

#: Largest safetensors header and ``.pt2`` weights config read (bytes of JSON).
MAX_HEADER_BYTES = 100 * 2**20

#: Objects of an unpickled checkpoint visited when looking for stand-ins (a DAG of shared lists
#: visited path by path would otherwise take forever).
MAX_WALK_VISITS = 200_000

#: Keys of a checkpoint dict that hold the model's weights, in the order they are tried.
CHECKPOINT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "weights",
)

_MLFLOW_HINT = "pip install 'cluster-tracking[mlflow]'"
_WANDB_HINT = "pip install 'cluster-tracking[wandb]'"
_TRUST_HINT = (
    "if you trust the file, pass --trust-pickle to unpickle it (this runs code from the file); "
    "better, save model.state_dict() (torch.save or safetensors) and audit that"
)
_RUN_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_WANDB_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_STAGES = ("none", "staging", "production", "archived")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRef:
    """A model source as given on the command line, parsed.

    Attributes:
        uri: the source exactly as given.
        kind: ``file`` (a local file or folder), ``mlflow-run`` (``runs:/``), ``mlflow-model``
            (``models:/``) or ``wandb-artifact``.
        path: the local path (``file``).
        run_id, artifact_path: the run and the path inside it (``mlflow-run``; ``""``: the run's
            model).
        model_name, version, alias, stage, model_id: the registered model (``mlflow-model``):
            exactly one of ``version``/``alias``/``stage`` is set for a registered model
            (``stage == "latest"`` for the latest version); ``model_id`` for MLflow 3's
            ``models:/m-...`` logged models.
        entity, project, name: the W&B artifact, ``alias`` its alias or version.
    """

    uri: str
    kind: Literal["file", "mlflow-run", "mlflow-model", "wandb-artifact"]
    path: Path | None = None
    run_id: str | None = None
    artifact_path: str = ""
    model_name: str | None = None
    version: str | None = None
    alias: str | None = None
    stage: str | None = None
    model_id: str | None = None
    entity: str | None = None
    project: str | None = None
    name: str | None = None

    @property
    def remote(self) -> bool:
        """Whether the source lives on a tracking platform (so it has a run to log back to)."""
        return self.kind != "file"


def parse_source(source: str) -> SourceRef:
    """Parse a model source (see the module docstring) without touching it.

    Raises:
        SourceError: an unknown URI scheme or a malformed URI.
    """
    text = str(source).strip()
    if not text:
        raise SourceError(
            "an empty source; give a checkpoint file, runs:/..., models:/... or "
            "wandb-artifact://... ."
        )
    scheme, sep, rest = text.partition(":")
    if not sep or len(scheme) == 1 or "/" in scheme or "\\" in scheme:
        # A plain path (a one-letter "scheme" is a Windows drive).
        return SourceRef(uri=text, kind="file", path=Path(text).expanduser())
    scheme = scheme.lower()
    if scheme == "file":
        parsed = urllib.parse.urlparse(text)
        return SourceRef(uri=text, kind="file", path=Path(urllib.parse.unquote(parsed.path)))
    if scheme == "runs":
        return _parse_runs_uri(text, rest)
    if scheme == "models":
        return _parse_models_uri(text, rest)
    if scheme == "wandb-artifact":
        return _parse_wandb_uri(text, rest)
    raise SourceError(
        f"unknown source scheme {scheme + ':'!r} in {text!r}; audit reads local files and "
        "folders, runs:/<run_id>/<path>, models:/<name>/<version or alias> and "
        "wandb-artifact://<entity>/<project>/<name>:<alias>."
    )


def _parse_runs_uri(text: str, rest: str) -> SourceRef:
    path = rest.lstrip("/")
    run_id, _, artifact_path = path.partition("/")
    if not run_id or not _RUN_ID.match(run_id):
        raise SourceError(
            f"malformed MLflow run URI {text!r}; write runs:/<run_id>/<artifact path>, e.g. "
            "runs:/0a1b2c.../model (or runs:/<run_id> for the run's model)."
        )
    return SourceRef(uri=text, kind="mlflow-run", run_id=run_id, artifact_path=artifact_path)


def _parse_models_uri(text: str, rest: str) -> SourceRef:
    parts = rest.lstrip("/").rstrip("/").split("/")
    usage = (
        f"malformed MLflow model URI {text!r}; write models:/<name>/<version>, "
        "models:/<name>@<alias>, models:/<name>/latest or models:/<model_id>."
    )
    if not parts[0] or len(parts) > 2:
        raise SourceError(usage)
    if len(parts) == 2:
        name, suffix = parts
        if not name or not suffix:
            raise SourceError(usage)
        if suffix.isdigit():
            return SourceRef(uri=text, kind="mlflow-model", model_name=name, version=suffix)
        if suffix.lower() == "latest" or suffix.lower() in _STAGES:
            stage = "latest" if suffix.lower() == "latest" else suffix
            return SourceRef(uri=text, kind="mlflow-model", model_name=name, stage=stage)
        return SourceRef(uri=text, kind="mlflow-model", model_name=name, alias=suffix)
    name, at, alias = parts[0].rpartition("@")
    if at:
        if not name or not alias:
            raise SourceError(usage)
        return SourceRef(uri=text, kind="mlflow-model", model_name=name, alias=alias)
    return SourceRef(uri=text, kind="mlflow-model", model_id=parts[0])


def _parse_wandb_uri(text: str, rest: str) -> SourceRef:
    path = rest.lstrip("/")
    body, _, alias = path.partition(":")
    parts = body.split("/")
    usage = (
        f"malformed W&B artifact URI {text!r}; write "
        "wandb-artifact://<entity>/<project>/<name>:<alias or version>, e.g. "
        "wandb-artifact://my-team/my-project/model-3k2j1x:v4 (':latest' when left out)."
    )
    if len(parts) != 3 or not all(part and _WANDB_PART.match(part) for part in parts):
        raise SourceError(usage)
    if alias and not _WANDB_PART.match(alias):
        raise SourceError(usage)
    entity, project, name = parts
    return SourceRef(
        uri=text,
        kind="wandb-artifact",
        entity=entity,
        project=project,
        name=name,
        alias=alias or "latest",
    )


# ---------------------------------------------------------------------------------------------
# Loaded models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTarget:
    """The run a logged model came from: where ``--log-to-run`` writes the audit.

    Attributes:
        platform: ``mlflow`` or ``wandb``.
        run_id: the run's id.
        tracking_uri: the MLflow tracking URI (``mlflow``).
        model_id: the MLflow 3 logged model audited, if any (its metrics are linked to it).
        entity, project: the W&B run's entity and project (``wandb``).
        label: how messages name the run.
    """

    platform: Literal["mlflow", "wandb"]
    run_id: str
    tracking_uri: str | None = None
    model_id: str | None = None
    entity: str | None = None
    project: str | None = None
    label: str = ""


@dataclass
class LoadedModel:
    """The weights of one source, ready for :func:`~cluster_tracking.measure.measure`.

    Attributes:
        source: the source as given.
        label: a short name for tables (file name, run name, model name and version).
        weights: a ``state_dict`` (name -> tensor) read as a chain of layers, or a
            ``torch.nn.Module`` (only after a trusted unpickling) whose data flow is traced.
        format: what was read, in words (``"safetensors state_dict"``, ``"Lightning checkpoint
            (state_dict)"``, ``"MLflow model (torch.export archive)"``...).
        prefix: a prefix removed from every layer name (``"model."`` of a LightningModule
            attribute), ``""`` if none. ``--layers`` accepts names with or without it.
        notes: things the user should know about how the weights were read.
        run: the run the model came from (``None`` for a local file).
    """

    source: str
    label: str
    weights: nn.Module | dict[str, Any]
    format: str
    prefix: str = ""
    notes: list[str] = field(default_factory=list)
    run: RunTarget | None = None

    def layer_names(self, names: Sequence[str] | None) -> list[str] | None:
        """``--layers`` names in this model's naming: the stripped :attr:`prefix` removed."""
        if names is None:
            return None
        if not self.prefix:
            return list(names)
        return [name.removeprefix(self.prefix) for name in names]


def load_source(
    source: str | SourceRef,
    *,
    trust_pickle: bool = False,
    tracking_uri: str | None = None,
    max_memory: int | None = None,
) -> LoadedModel:
    """Read the weights of a model source (see the module docstring).

    Args:
        source: a local path or a ``runs:/``, ``models:/`` or ``wandb-artifact://`` URI.
        trust_pickle: unpickle pickled models for real, running code from the file (only for
            files the user trusts). Without it nothing from the file is imported or called.
        tracking_uri: the MLflow tracking server or store of ``runs:/`` and ``models:/``
            sources; ``None``: ``MLFLOW_TRACKING_URI``, else MLflow's default.
        max_memory: bytes the readers may hold (what the file declares is checked against it
            before it is allocated); ``None``: the limit in force
            (:func:`~cluster_tracking.resources.limits.current_memory_limit`).

    Returns:
        The weights, how they were read, and the run they came from.

    Raises:
        SourceError: the source does not exist, cannot be read, holds no weights, or would need
            unpickling without ``trust_pickle``.
        LimitError: reading it would pass the memory limit.
        GraphError: its weights cannot be measured (empty, all zero, bool or integer).
        PlatformError: MLflow or W&B cannot be reached, or refuses.
    """
    ref = source if isinstance(source, SourceRef) else parse_source(source)
    with memory_limit(max_memory):
        if ref.kind == "file":
            assert ref.path is not None
            return load_file(ref.path, trust_pickle=trust_pickle, source=ref.uri)
        if ref.kind == "wandb-artifact":
            return _load_wandb(ref, trust_pickle=trust_pickle)
        with mlflow_client(tracking_uri) as (client, uri):
            if ref.kind == "mlflow-run":
                return _load_mlflow_run(client, uri, ref, trust_pickle=trust_pickle)
            return _load_mlflow_model(client, uri, ref, trust_pickle=trust_pickle)


def load_file(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    source: str | None = None,
    max_memory: int | None = None,
) -> LoadedModel:
    """Read a local weight file or folder (see the module docstring).

    Raises:
        SourceError: missing, unreadable, not a regular file or folder, corrupt, no weights in
            it, or a pickle that would need ``trust_pickle``.
        LimitError: reading it would pass the memory limit (``max_memory``).
        GraphError: its weights cannot be measured (empty, all zero, bool or integer).
    """
    target = Path(path)
    shown = source or str(path)
    with memory_limit(max_memory):
        mode = _file_mode(target, shown)
        try:
            if stat.S_ISDIR(mode):
                loaded = _load_directory(target, trust_pickle=trust_pickle, source=shown)
            else:
                weights, what, prefix, notes = _read_weight_file(target, trust_pickle=trust_pickle)
                loaded = LoadedModel(
                    source=shown,
                    label=target.name,
                    weights=weights,
                    format=what,
                    prefix=prefix,
                    notes=notes,
                )
        except PermissionError as error:
            raise SourceError(f"{shown}: cannot read it ({error.strerror}).") from error
        except MemoryError as error:
            raise LimitError(
                f"{shown}: ran out of memory while reading it; raise --max-memory only if the "
                "machine has more, or audit it on a larger machine."
            ) from error
    loaded.weights, more = _checked_weights(loaded.weights, shown)
    loaded.notes.extend(more)
    return loaded


def _is_weight(name: str, value: Any) -> bool:
    """A tensor the weight graph reads as edges: a ``weight`` of two or more dimensions."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() >= 2
        and name.rsplit(".", 1)[-1] in ("weight", "weight_orig")
    )


def _all_zero(value: torch.Tensor) -> bool:
    """Whether every value of ``value`` is zero, without materialising a view larger than its
    storage (a weight expanded from one stored element: its values are its storage's)."""
    storage = value.untyped_storage()
    if value.numel() * value.element_size() > storage.nbytes():
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        return not bool(raw.any())
    if not value.numel():
        return True
    # A slab of rows at a time: ``value.any()`` would hold a bool copy of the whole weight.
    rows = max(1, (1 << 20) // max(1, value.numel() // value.shape[0]))
    return not any(bool(part.any()) for part in value.split(rows, 0))


def _checked_weights(
    weights: nn.Module | dict[str, Any], shown: str
) -> tuple[nn.Module | dict[str, Any], list[str]]:
    """The weights a reader returned, checked before they reach the weight graph.

    PyTorch's quantized tensors are dequantized (their scales are stored with them). Refused
    with a :class:`~cluster_tracking.errors.GraphError` (exit 4): bool weights (a mask's 0/1
    would be measured as a graph), integer weights (quantized values whose scales are stored
    elsewhere: their magnitudes mean nothing alone), a layer without neurons (a dimension of
    size 0), and a model whose weights are all zero (a graph without edges).
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    notes: list[str] = []
    dequantized = [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_quantized
    ]
    if dequantized and isinstance(weights, dict):
        weights = copy.copy(weights)  # keeps its type (a name-ordered state_dict stays one)
        for key in dequantized:
            weights[key] = weights[key].dequantize()
        state = weights
        notes.append(
            f"PyTorch-quantized tensors {_list_names(dequantized, 4)} were dequantized with their "
            "stored scales before measuring."
        )
    graph_weights = {key: value for key, value in state.items() if _is_weight(key, value)}
    for key, value in graph_weights.items():
        shape = list(value.shape)
        if value.dtype == torch.bool:
            raise GraphError(
                f"{shown}: {key} holds bool values (shape {shape}): a mask, not weights; a 0/1 "
                "graph says nothing about clusterability. Audit the weights the mask applies to "
                "(e.g. weight_orig * weight_mask of a pruned layer)."
            )
        if value.is_quantized:
            raise GraphError(
                f"{shown}: {key} is a quantized tensor inside a pickled module; save "
                "model.dequantize().state_dict() or audit the float model."
            )
        if not (value.is_floating_point() or value.is_complex()):
            raise GraphError(
                f"{shown}: {key} holds integer values ({str(value.dtype).removeprefix('torch.')}, "
                f"shape {shape}): quantized weights, whose magnitudes mean nothing without the "
                "scales and zero points stored beside them, which this reader does not know. "
                "Dequantize the model and audit its float weights."
            )
        if value.numel() == 0:
            raise GraphError(
                f"{shown}: {key} has shape {shape}: a layer without neurons, so there is no "
                "weight graph to measure."
            )
    if graph_weights and all(_all_zero(value) for value in graph_weights.values()):
        raise GraphError(
            f"{shown}: every weight is zero ({len(graph_weights)} weight tensors): the weight "
            "graph has no edges, so it has no clusters to measure (an untrained or wiped model?)."
        )
    return weights, notes


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_mode(path: Path, shown: str) -> int:
    """The mode of ``path`` (symlinks followed); only regular files and folders pass.

    Nothing is opened: a FIFO without a writer or ``/dev/zero`` would block or never end.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        dangling = path.is_symlink()
        raise SourceError(
            f"{shown}: " + ("a symlink to nothing." if dangling else "no such file or folder.")
        ) from None
    except PermissionError as error:
        raise SourceError(f"{shown}: cannot read it ({error.strerror}).") from None
    except (OSError, ValueError) as error:
        raise SourceError(f"{shown}: cannot read it ({_first_line(error)}).") from None
    if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
        return info.st_mode
    kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
    via = " (through a symlink)" if path.is_symlink() else ""
    raise SourceError(
        f"{shown} is {kind}{via}, not a regular file; audit reads weight files and folders only."
    )


def _load_directory(folder: Path, *, trust_pickle: bool, source: str) -> LoadedModel:
    """A folder: an MLflow model (``MLmodel``), or a folder with exactly one weight file."""
    if (folder / "MLmodel").is_file():
        weights, what, prefix, notes = _read_mlflow_model_dir(folder, trust_pickle=trust_pickle)
        return LoadedModel(
            source=source,
            label=folder.name,
            weights=weights,
            format=what,
            prefix=prefix,
            notes=notes,
        )
    from cluster_tracking.audit.pretrained import is_model_folder, load_model_folder

    if is_model_folder(folder):
        # transformers reads the shards itself: check what they declare against the limit first.
        budget = MemoryBudget(source)
        for shard in sorted(folder.glob("*.safetensors")):
            _file_mode(shard, str(shard))
            _check_safetensors_header(shard, budget)
        model = load_model_folder(folder)
        return LoadedModel(
            source=source,
            label=folder.name,
            weights=model,
            format=f"Hugging Face model folder ({type(model).__name__}, safetensors)",
        )
    scan = _scan_folder(folder, source)
    files = scan.weight_files()
    if not files:
        listed = _list_names([p.relative_to(folder).as_posix() for p in scan.entries])
        raise SourceError(
            f"{source} holds no model: no MLmodel file and no weight file "
            f"({', '.join(WEIGHT_SUFFIXES)}); it holds {listed}."
        )
    if len(files) > 1:
        listed = _list_names([p.relative_to(folder).as_posix() for p in files])
        raise SourceError(
            f"{source} holds several weight files ({listed}); audit one of them by its path."
        )
    weights, what, prefix, notes = _read_weight_file(files[0], trust_pickle=trust_pickle)
    return LoadedModel(
        source=source,
        label=f"{folder.name}/{files[0].relative_to(folder).as_posix()}",
        weights=weights,
        format=what,
        prefix=prefix,
        notes=notes,
    )


@dataclass
class _FolderScan:
    """What a bounded search of a folder found: every entry (sorted), and the regular files."""

    entries: list[Path]
    files: list[Path]

    def weight_files(self) -> list[Path]:
        """Weight files; a ``log_state_dict`` folder's ``state_dict.pth`` wins."""
        found = [p for p in self.files if p.name.lower().endswith(WEIGHT_SUFFIXES)]
        preferred = [p for p in found if p.name == "state_dict.pth"]
        return preferred if len(preferred) == 1 else found


def _scan_folder(folder: Path, source: str) -> _FolderScan:
    """Search ``folder`` breadth-first, :data:`MAX_FOLDER_DEPTH` levels and
    :data:`MAX_FOLDER_ENTRIES` entries at most, without following symlinked folders; regular
    files only (a symlink counts when it leads to one).

    Raises:
        SourceError: the folder holds more entries than that (a home folder, ``/usr``...).
    """
    entries: list[Path] = []
    files: list[Path] = []
    pending: list[tuple[Path, int]] = [(folder, 0)]
    while pending:
        current, depth = pending.pop(0)
        try:
            with os.scandir(current) as listing:
                children = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in children:
            entries.append(Path(entry.path))
            if len(entries) > MAX_FOLDER_ENTRIES:
                weights = [
                    p.relative_to(folder).as_posix()
                    for p in files
                    if p.name.lower().endswith(WEIGHT_SUFFIXES)
                ]
                raise SourceError(
                    f"{source} is a folder of more than {MAX_FOLDER_ENTRIES} entries (searched "
                    f"{MAX_FOLDER_DEPTH} levels deep at most), not a model folder; weight files "
                    f"among the first {MAX_FOLDER_ENTRIES}: {_list_names(weights, 5)}. Audit the "
                    "weight file or the model's own folder."
                )
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < MAX_FOLDER_DEPTH:
                        pending.append((Path(entry.path), depth + 1))
                elif entry.is_file(follow_symlinks=True):
                    files.append(Path(entry.path))
            except OSError:
                continue
    return _FolderScan(entries=sorted(entries), files=sorted(files))


def _weight_files(folder: Path) -> list[Path]:
    """Weight files under ``folder`` (a bounded search); ``state_dict.pth`` wins."""
    return _scan_folder(folder, str(folder)).weight_files()


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------

_Read = tuple["nn.Module | dict[str, Any]", str, str, list[str]]


def _read_weight_file(path: Path, *, trust_pickle: bool) -> _Read:
    """``(weights, format, prefix, notes)`` of one file, chosen by its content.

    The file must be regular (checked again here: a folder search may name a symlink), and its
    size and every size it declares are budgeted
    (:class:`~cluster_tracking.resources.limits.MemoryBudget`)
    before anything is read into memory.
    """
    _file_mode(path, str(path))
    if not path.is_file():
        raise SourceError(f"{path} is a folder where a weight file was expected.")
    size = path.stat().st_size
    if not size:
        raise SourceError(f"{path}: the file is empty.")
    budget = MemoryBudget(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    name = path.name.lower()
    if name.endswith(".safetensors") or _looks_like_safetensors(head):
        note = (
            "a safetensors file does not keep the layer order: the layers were ordered by name "
            "(natural order); pass --layers to give the data-flow order if it differs."
        )
        return _read_safetensors(path, budget), "state_dict (safetensors)", "", [note]
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as error:
        raise SourceError(f"{path}: cannot read it ({_first_line(error)}).") from error
    if not is_zip:
        if head[:1] == b"\x80" or name.endswith((".pt", ".pth", ".bin", ".ckpt")):
            # torch.save's legacy (pre-1.6) format: its storages' declared sizes are checked
            # against the file and budgeted before torch.load allocates them.
            _check_legacy_torch_file(path, size, budget)
            return _read_torch_file(path, trust_pickle=trust_pickle)
        raise SourceError(
            f"{path}: not a weight file PyTorch or safetensors can read (neither a torch.save "
            "zip archive nor a safetensors file)."
        )
    names = _check_zip(path, budget)
    if any(n.endswith("/models/model.json") or "/data/weights/" in n for n in names) and not any(
        n.endswith("/data.pkl") for n in names
    ):
        return _read_pt2(path), "torch.export archive (.pt2)", "", []
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return _read_torchscript(path, trust_pickle=trust_pickle)
    return _read_torch_file(path, trust_pickle=trust_pickle)


def _check_zip(path: Path, budget: MemoryBudget) -> list[str]:
    """The member names of a zip archive, after its declared sizes were budgeted and every
    compressed member was inflated as a stream (never trusted: a member that inflates past its
    declared size fails its CRC check here, before PyTorch allocates it).

    Raises:
        SourceError: not a readable zip archive, or a member that does not match its size.
        LimitError: the members together pass the memory limit.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            declared = sum(info.file_size for info in infos)
            budget.take(declared, f"{len(infos)} archive members of {format_size(declared)}")
            for info in infos:
                if info.compress_type == zipfile.ZIP_STORED or info.is_dir():
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 20):
                        pass
            return [info.filename for info in infos]
    except LimitError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as error:
        raise SourceError(
            f"{path}: a damaged zip archive ({_first_line(error)}); the file may be truncated or "
            "corrupt."
        ) from error
    except NotImplementedError as error:
        raise SourceError(
            f"{path}: a zip archive compressed in a way PyTorch cannot read ({_first_line(error)})."
        ) from error


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


# Bytes per element of each safetensors dtype.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _check_safetensors_header(path: Path, budget: MemoryBudget) -> None:
    """Check what a safetensors header declares against the file, before safetensors reads it.

    The header (8-byte little-endian length, then JSON) must fit in the file; each tensor's
    ``data_offsets`` must lie inside the data that follows and hold exactly ``prod(shape)``
    elements of its dtype; the tensors together are budgeted.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SourceError(f"{path}: not a safetensors file (shorter than its 8-byte header).")
        length = int.from_bytes(prefix, "little")
        if length > size - 8 or length > MAX_HEADER_BYTES:
            raise SourceError(
                f"{path}: the safetensors header declares {length} bytes, but the file holds "
                f"{size - 8} after its length; the file is truncated or not safetensors."
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SourceError(
            f"{path}: the safetensors header is not JSON ({_first_line(error)})."
        ) from error
    if not isinstance(header, dict):
        raise SourceError(f"{path}: the safetensors header is not a JSON object.")
    data_size = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        bad = f"{path}: the safetensors entry {str(key)[:80]!r}"
        if not isinstance(entry, dict):
            raise SourceError(f"{bad} is not an object.")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise SourceError(f"{bad} has an unknown dtype {str(dtype)[:20]!r}.")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise SourceError(f"{bad} has a malformed shape.")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise SourceError(
                f"{bad} has data offsets {str(offsets)[:60]} outside the {data_size} bytes of "
                "data in the file; the file is truncated or corrupt."
            )
        numel = 1
        for n in shape:
            numel *= n
        needed = numel * _SAFETENSORS_ITEMSIZE[dtype]
        if needed != offsets[1] - offsets[0]:
            raise SourceError(
                f"{bad} declares shape {shape} ({format_size(needed)}) but its record holds "
                f"{offsets[1] - offsets[0]} bytes; the file is corrupt."
            )
        budget.take(needed, f"tensor {str(key)[:80]!r} of shape {shape}")


def _read_safetensors(path: Path, budget: MemoryBudget | None = None) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    _check_safetensors_header(path, budget or MemoryBudget(path))
    try:
        tensors = load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as error:
        raise SourceError(
            f"{path}: not a readable safetensors file ({_first_line(error)})."
        ) from error
    if not tensors:
        raise SourceError(f"{path}: the safetensors file holds no tensors.")
    # A safetensors file does not keep the tensors' order: put the layers back in natural order
    # of their names ("2.weight" before "10.weight"), the declaration order of most models.
    from cluster_tracking.graph.chain import NameOrderedStateDict

    return NameOrderedStateDict((key, tensors[key]) for key in sorted(tensors, key=_natural_key))


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a dotted name: numbers compare as numbers (``layer2`` < ``layer10``)."""
    parts: list[tuple[int, int | str]] = []
    for component in name.split(".")[:-1]:
        for piece in re.split(r"(\d+)", component):
            if piece:
                parts.append((0, int(piece)) if piece.isdigit() else (1, piece))
        parts.append((-1, ""))  # end of a component: "layer1.x" before "layer10"
    return tuple(parts)


def _read_torch_file(path: Path, *, trust_pickle: bool) -> _Read:
    """A ``torch.save`` file: weights-only first, then stand-ins, or (trusted) a real unpickling."""
    notes: list[str] = []
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return _from_checkpoint(loaded, path, False, notes)
    except pickle.UnpicklingError as error:
        refused: Exception = error
    except Exception as error:  # torch raises many kinds on a damaged file
        raise SourceError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(error)}); the file may be "
            "truncated or corrupt."
        ) from error
    if trust_pickle:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as error:
            notes.append(
                f"--trust-pickle: the pickled model's class cannot be imported here "
                f"({_first_line(error)}); its weights were read without it."
            )
        except Exception as error:
            raise SourceError(f"{path}: unpickling failed ({_first_line(error)}).") from error
        else:
            return _from_checkpoint(loaded, path, True, notes)
    loaded = _load_with_stand_ins(path, refused)
    return _from_checkpoint(loaded, path, False, notes)


def _read_torchscript(path: Path, *, trust_pickle: bool) -> _Read:
    if not trust_pickle:
        raise SourceError(
            f"{path} is a TorchScript archive (torch.jit.save), whose loading compiles the code "
            f"in it; {_TRUST_HINT}."
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise SourceError(f"{path}: torch.jit.load failed ({_first_line(error)}).") from error
    # A ScriptModule cannot be traced by torch.fx: read its weights as a chain.
    state = {key: value for key, value in module.state_dict().items()}
    return state, "TorchScript archive (state_dict)", "", ["loaded with torch.jit.load."]


# ---------------------------------------------------------------------------------------------
# Pickles read with stand-ins
# ---------------------------------------------------------------------------------------------


class _StandIn:
    """An inert stand-in for a class or function that a pickle names.

    The weights-only unpickler may *create* one (in place of the class), *call* one (in place
    of the function) and *set its state*: each only records its arguments. Nothing of the real
    class or function is imported or run.
    """

    qualified_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
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


def _stand_in(name: str) -> type[_StandIn]:
    short = re.sub(r"\W", "_", name.rsplit(".", 1)[-1]) or "StandIn"
    return type(short, (_StandIn,), {"qualified_name": name})


#: ``torch.save``'s legacy (pre-1.6) format: the first pickle of the file holds this number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

#: Bytes per element of the storage classes a legacy file names (``torch.FloatStorage``...).
_LEGACY_ITEMSIZE = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "QInt8Storage": 1,
    "QUInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
}


class _LegacyStandIn(_StandIn):
    """A stand-in that also takes the items and elements a pickle adds to it (an
    ``OrderedDict`` rebuilt by the scan below gets ``SETITEMS``/``APPENDS``)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        """Items are ignored: only the storages matter to the scan."""

    def append(self, value: Any) -> None:
        """Elements are ignored, as items are."""

    def extend(self, values: Any) -> None:
        """Elements are ignored, as items are."""


class _LegacyScan(pickle.Unpickler):
    """Reads a legacy file's main pickle for the storages it declares, and nothing else: every
    global it names becomes an inert stand-in (nothing is imported or run), and every persistent
    id ``("storage", type, key, location, numel, view)`` is recorded as ``key -> (type, numel)``.
    """

    def __init__(self, handle: Any) -> None:
        super().__init__(handle)
        self.storages: dict[str, tuple[str, int]] = {}
        self.classes: dict[str, type[_StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self.classes:
            short = re.sub(r"\W", "_", name) or "StandIn"
            self.classes[qualified] = type(short, (_LegacyStandIn,), {"qualified_name": qualified})
        return self.classes[qualified]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage"):
            storage_type, key, numel = pid[1], str(pid[2]), pid[4]
            if not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"storage {key!r} declares {numel!r} elements")
            name = getattr(storage_type, "qualified_name", "?").rsplit(".", 1)[-1]
            self.storages.setdefault(key, (name, numel))
        return None


def _check_legacy_torch_file(path: Path, size: int, budget: MemoryBudget) -> None:
    """Check the storages a legacy ``torch.save`` file declares against the bytes it holds, and
    budget them, before ``torch.load`` allocates them (it allocates each storage at its declared
    size while unpickling, then fills it from the file).

    The file is four pickles (magic number, protocol, system info, the object, whose persistent
    ids name each storage's type, key and element count), the list of storage keys, then per
    key an 8-byte element count and the storage's bytes. The pickles are read without running
    anything (:class:`_LegacyScan`); a file that is not in this format (a bare pickle, the older
    tar format) is left to ``torch.load``, which refuses a bare pickle and reads a tar's
    storages from its own members (at most as large as the file).

    Raises:
        SourceError: a storage that the file does not hold (truncated or corrupt).
        LimitError: the storages and the unpickled objects pass the memory limit.
    """
    with open(path, "rb") as handle:
        try:
            magic = _LegacyScan(handle).load()
        except Exception:
            magic = None
        if magic != _LEGACY_MAGIC:
            budget.take(2 * size, f"a {format_size(size)} file, read and unpickled")
            return
        try:
            _LegacyScan(handle).load()  # protocol version
            _LegacyScan(handle).load()  # system info
            scan = _LegacyScan(handle)
            scan.load()
            keys = _LegacyScan(handle).load()
        except Exception as error:
            raise SourceError(
                f"{path}: not a readable PyTorch checkpoint ({_first_line(error)}); the file may "
                "be truncated or corrupt."
            ) from error
        pickled = handle.tell()
        if not isinstance(keys, list):
            raise SourceError(f"{path}: a legacy PyTorch checkpoint without its storage list.")
        needed = 0
        offset = pickled
        for key in keys:
            kind, numel = scan.storages.get(str(key), ("?", -1))
            itemsize = _LEGACY_ITEMSIZE.get(kind)
            if numel < 0 or itemsize is None:
                raise SourceError(
                    f"{path}: storage {str(key)[:40]!r} is listed but not declared with a known "
                    f"type ({kind}); the file is corrupt."
                )
            handle.seek(offset)
            stored = handle.read(8)
            held = int.from_bytes(stored, "little", signed=True) if len(stored) == 8 else -1
            nbytes = numel * itemsize
            if offset + 8 + nbytes > size:
                raise SourceError(
                    f"{path}: storage {str(key)[:40]!r} declares {numel} elements "
                    f"({format_size(nbytes)}) but the file holds only "
                    f"{format_size(max(size - offset - 8, 0))} from there; the file is truncated "
                    "or corrupt."
                )
            if held != numel:
                raise SourceError(
                    f"{path}: storage {str(key)[:40]!r} declares {numel} elements but its record "
                    f"in the file says {held}; the file is corrupt."
                )
            needed += nbytes
            offset += 8 + nbytes
    budget.take(
        needed + 2 * pickled,
        f"{len(keys)} storages of {format_size(needed)} and a {format_size(pickled)} pickle",
    )


def _load_with_stand_ins(path: Path, refused: Exception) -> Any:
    """Load a pickle whose globals the weights-only unpickler refused, with inert stand-ins."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        names = []
    if not names:
        raise SourceError(
            f"{path}: PyTorch's weights-only loader refused it ({_first_line(refused)}); "
            f"{_TRUST_HINT}."
        ) from refused
    stand_ins = [(_stand_in(name), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):  # type: ignore[arg-type]
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", str(error))
        what = f"calls {blocked.group(1)}" if blocked else f"names {_list_names(names, 5)}"
        raise SourceError(
            f"refusing to unpickle {path}: the pickle {what}, which would run code when "
            f"loaded; {_TRUST_HINT}."
        ) from error
    except Exception as error:
        raise SourceError(
            f"{path}: cannot read its weights without running code from it "
            f"({_first_line(error)}); {_TRUST_HINT}."
        ) from error


def _stand_in_state_dict(root: _StandIn) -> dict[str, Any]:
    """The ``state_dict()`` of a pickled ``nn.Module`` read with stand-ins, in declaration order:
    each module's parameters, then its persistent buffers, then its children."""
    found: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(node: _StandIn, prefix: str, depth: int) -> None:
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
                if isinstance(child, _StandIn):
                    visit(child, f"{prefix}{name}.", depth + 1)

    visit(root, "", 0)
    return found


def _is_stand_in_module(value: Any) -> bool:
    state = value.__dict__.get("_state") if isinstance(value, _StandIn) else None
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]
    return isinstance(state, Mapping) and "_parameters" in state and "_modules" in state


# ---------------------------------------------------------------------------------------------
# Checkpoint contents
# ---------------------------------------------------------------------------------------------


def _from_checkpoint(loaded: Any, path: Path, trusted: bool, notes: list[str]) -> _Read:
    """Find the weights in what a file held: a state_dict, a checkpoint dict, a module."""
    weights, where = _find_weights(loaded, path)
    prefix = ""
    lightning = isinstance(loaded, Mapping) and (
        "pytorch-lightning_version" in loaded
        or (path.name.lower().endswith(".ckpt") and "state_dict" in loaded)
    )
    if isinstance(weights, nn.Module):
        kind = f"pickled module {type(weights).__name__} (unpickled with --trust-pickle)"
    elif lightning:
        weights, prefix = _strip_common_prefix(weights)
        kind = "Lightning checkpoint, state_dict"
        if prefix:
            notes.append(
                f"the LightningModule attribute prefix {prefix!r} was removed from the layer "
                "names (--layers takes names with or without it)."
            )
    else:
        kind = where
    stand_ins = sorted(
        {type(value).qualified_name for value in _walk(loaded) if isinstance(value, _StandIn)}
    )
    if stand_ins:
        notes.append(
            "read without running code from the file: "
            f"{_list_names(stand_ins, 4)} {'was' if len(stand_ins) == 1 else 'were'} neither "
            "imported nor called (--trust-pickle would unpickle it for real)."
        )
    elif trusted and not isinstance(weights, nn.Module):
        notes.append("unpickled with --trust-pickle.")
    return weights, kind, prefix, notes


def _find_weights(value: Any, path: Path, where: str = "", depth: int = 0) -> tuple[Any, str]:
    """``(weights, description)``: a module, or a state_dict of string keys and tensors."""
    label = f"{path}{where}"
    inside = f", under {where}" if where else ""
    if depth > 8:
        raise SourceError(f"{path}: checkpoint dicts nested too deep to hold a model's weights.")
    if isinstance(value, nn.Module):
        return value, "module"
    if isinstance(value, _StandIn):
        short = value.qualified_name.rsplit(".", 1)[-1]
        if _is_stand_in_module(value):
            state = _stand_in_state_dict(value)
            if state:
                return state, f"pickled module {short}{inside}, weights read without its code"
            raise SourceError(f"{label} is a pickled module without weights.")
        raise SourceError(
            f"{label} is a pickle of {value.qualified_name}, not weights that can be read "
            f"without running code from it; {_TRUST_HINT}."
        )
    if isinstance(value, Mapping):
        tensors = {str(k): v for k, v in value.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors, f"checkpoint, state_dict{inside}" if where else "state_dict"
        for key in CHECKPOINT_KEYS:
            inner = value.get(key)
            if isinstance(inner, (Mapping, nn.Module, _StandIn)):
                return _find_weights(inner, path, f"{where}[{key!r}]", depth + 1)
        nested = [
            key
            for key, inner in value.items()
            if isinstance(inner, Mapping)
            and any(isinstance(v, torch.Tensor) for v in inner.values())
        ]
        if len(nested) == 1:
            return _find_weights(value[nested[0]], path, f"{where}[{nested[0]!r}]", depth + 1)
        keys = _list_names([str(key) for key in value.keys()], 12)
        raise SourceError(
            f"{label} is a dict without a model's weights (keys: {keys}); audit a state_dict or "
            f"a checkpoint holding one under {' / '.join(repr(k) for k in CHECKPOINT_KEYS[:3])}."
        )
    raise SourceError(
        f"{label} holds a {type(value).__name__}, not a model's weights; save "
        "model.state_dict() (torch.save or safetensors) and audit that."
    )


def _walk(value: Any, max_depth: int = 16, max_visits: int = MAX_WALK_VISITS) -> Iterator[Any]:
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
        if isinstance(item, (Mapping, list, tuple, _StandIn)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        elif isinstance(item, _StandIn):
            children = [item.__dict__.get("_state")]
        else:
            continue
        stack.extend((child, depth + 1) for child in reversed(children))


def _strip_common_prefix(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove the dotted prefix every layer name shares (``model.`` of ``self.model``), keeping
    at least one component of each layer's own name."""
    modules = [key.split(".")[:-1] for key in state]
    if not modules or any(not parts for parts in modules):
        return state, ""
    common: list[str] = []
    for components in zip(*modules, strict=False):
        if len(set(components)) != 1:
            break
        common.append(components[0])
    common = common[: min(len(parts) for parts in modules) - 1]
    if not common:
        return state, ""
    prefix = ".".join(common) + "."
    return {key.removeprefix(prefix): value for key, value in state.items()}, prefix


# ---------------------------------------------------------------------------------------------
# torch.export archives (.pt2)
# ---------------------------------------------------------------------------------------------

# torch._export.serde.schema.ScalarType, by value.
_PT2_DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}


def _read_pt2(path: Path) -> dict[str, Any]:
    """The weights of a ``torch.export`` archive, without ``torch.export.load``.

    The archive's ``<model>/data/weights/<model>_weights_config.json`` lists each weight (its
    state_dict name, record, dtype, sizes, strides, storage offset); the records are raw tensor
    bytes (``use_pickle: false``) or ``torch.save`` payloads, read with ``weights_only=True``.
    What a config declares is checked against its record's real length and budgeted
    (:class:`~cluster_tracking.resources.limits.MemoryBudget`) before the record is read.
    """
    budget = MemoryBudget(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            configs = sorted(n for n in names if re.search(r"data/weights/[^/]+_config\.json$", n))
            if not configs:
                raise SourceError(f"{path}: a torch.export archive without weights.")
            byteorder = [n for n in names if n.endswith("/byteorder")]
            if byteorder and _read_member(archive, byteorder[0], path, 64).strip() not in (
                b"",
                b"little",
            ):
                raise SourceError(f"{path}: a big-endian torch.export archive; re-export it here.")
            state: dict[str, Any] = {}
            for config_name in configs:
                folder = config_name.rsplit("/", 1)[0]
                config = json.loads(_read_member(archive, config_name, path, MAX_HEADER_BYTES))
                entries = config["config"] if isinstance(config, Mapping) else None
                if not isinstance(entries, Mapping):
                    raise SourceError(f"{path}: {config_name} has no 'config' object.")
                for fqn, entry in entries.items():
                    if not isinstance(entry, Mapping):
                        raise SourceError(f"{path}: the entry of {str(fqn)[:80]!r} is malformed.")
                    state[str(fqn)] = _pt2_tensor(
                        archive, f"{folder}/{entry['path_name']}", entry, path, budget
                    )
    except ClusterTrackingError:
        raise
    except MemoryError as error:
        raise LimitError(f"{path}: ran out of memory reading the torch.export archive.") from error
    except Exception as error:  # a damaged archive or config raises many kinds
        raise SourceError(
            f"{path}: a torch.export archive this version cannot read ({_first_line(error)})."
        ) from error
    if not state:
        raise SourceError(f"{path}: the torch.export archive holds no weights.")
    return _group_by_module(state)


def _read_member(archive: zipfile.ZipFile, name: str, path: Path, limit: int) -> bytes:
    """A small archive member (a config), refused when it declares more than ``limit`` bytes."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise SourceError(
            f"{path}: {name} declares {format_size(info.file_size)}, more than a config holds."
        )
    return archive.read(info)


def _group_by_module(state: dict[str, Any]) -> dict[str, Any]:
    """The entries of each module together, modules in order of first appearance.

    A ``torch.export`` archive lists all parameters before all buffers; a state_dict read as a
    chain needs a BatchNorm's ``running_var`` next to its weight, before the next layer.
    """
    order: dict[str, list[str]] = {}
    for key in state:
        order.setdefault(key.rpartition(".")[0], []).append(key)
    return {key: state[key] for keys in order.values() for key in keys}


def _pt2_tensor(
    archive: zipfile.ZipFile,
    name: str,
    entry: Mapping[str, Any],
    path: Path,
    budget: MemoryBudget,
) -> torch.Tensor:
    """One weight of a ``.pt2`` archive: its declared layout checked against its record."""
    info = archive.getinfo(name)
    record_size = info.file_size
    if entry.get("use_pickle", True):
        budget.take(2 * record_size, f"record {name!r} of {format_size(record_size)}, unpickled")
        value = torch.load(io.BytesIO(archive.read(info)), map_location="cpu", weights_only=True)
        if not isinstance(value, torch.Tensor):
            raise SourceError(f"{path}: weight {entry.get('path_name')!r} is not a tensor.")
        return value
    meta = entry["tensor_meta"]
    dtype = _PT2_DTYPES.get(int(meta["dtype"]))
    if dtype is None:
        raise SourceError(f"{path}: weight dtype code {meta['dtype']} is not supported.")
    sizes = [int(size["as_int"]) for size in meta["sizes"]]
    strides = [int(stride["as_int"]) for stride in meta["strides"]]
    offset = int((meta.get("storage_offset") or {}).get("as_int", 0))
    if len(sizes) != len(strides) or min([*sizes, *strides, offset, 0]) < 0 or len(sizes) > 8:
        raise SourceError(
            f"{path}: weight record {name!r} declares an impossible layout (sizes {sizes}, "
            f"strides {strides}, offset {offset})."
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Elements the view reaches: offset + sum((size - 1) * stride) + 1 (none for an empty one).
    elements = (
        0
        if 0 in sizes
        else offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) + 1
    )
    numel = math.prod(sizes)
    if elements * itemsize > record_size:
        raise SourceError(
            f"{path}: weight record {name!r} holds {record_size} bytes, shorter than the "
            f"{format_size(elements * itemsize)} its declared shape {sizes} needs; the archive is "
            "truncated or corrupt."
        )
    if not numel:
        return torch.empty(sizes, dtype=dtype)
    # One copy: the bytes the view reaches are inflated straight into the tensor's storage, in
    # chunks (a whole-member read would hold a second copy); only a view that skips elements
    # (strides with gaps) is compacted, by a second copy of its own size.
    reach = elements - offset
    held = reach + (numel if numel < reach else 0)
    budget.take(held * itemsize, f"record {name!r} of shape {sizes}, inflated")
    storage = torch.empty(reach, dtype=dtype)
    target = memoryview(storage.view(torch.uint8).numpy())  # type: ignore[arg-type]
    with archive.open(info) as member:
        _skip(member, offset * itemsize, path, name)
        filled = 0
        while filled < len(target):
            count = member.readinto(target[filled : filled + _CHUNK])  # type: ignore[attr-defined]
            if not count:
                raise SourceError(f"{path}: weight record {name!r} ends early.")
            filled += count
    tensor = torch.as_strided(storage, sizes, strides, 0)
    return tensor.clone() if numel < reach else tensor


#: Bytes inflated at a time from an archive member.
_CHUNK = 1 << 20


def _skip(member: Any, nbytes: int, path: Path, name: str) -> None:
    """Inflate and drop the first ``nbytes`` of an archive member, a chunk at a time."""
    while nbytes > 0:
        count = len(member.read(min(nbytes, _CHUNK)))
        if not count:
            raise SourceError(f"{path}: weight record {name!r} ends early.")
        nbytes -= count


# ---------------------------------------------------------------------------------------------
# MLflow models (a folder with an MLmodel file)
# ---------------------------------------------------------------------------------------------


def _read_mlflow_model_dir(folder: Path, *, trust_pickle: bool) -> _Read:
    import yaml

    spec_file = folder / "MLmodel"
    _file_mode(spec_file, f"{folder}/MLmodel")
    if spec_file.stat().st_size > MAX_HEADER_BYTES:
        raise SourceError(f"{folder}/MLmodel is larger than any MLmodel file; is it one?")
    try:
        spec = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as error:
        raise SourceError(f"{folder}/MLmodel cannot be read ({_first_line(error)}).") from error
    if spec is None:
        spec = {}
    flavors = spec.get("flavors") if isinstance(spec, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(flavors, (Mapping, type(None))):
        raise SourceError(
            f"{folder}/MLmodel is not an MLflow model file (a YAML mapping with 'flavors'); the "
            "folder may not hold an MLflow model."
        )
    flavors = flavors or {}
    pytorch = flavors.get("pytorch")
    if not isinstance(pytorch, Mapping):
        raise SourceError(
            f"the MLflow model in {folder.name!r} is not a PyTorch model (flavors: "
            f"{_list_names(sorted(str(name) for name in flavors))}); audit models logged with "
            "mlflow.pytorch or a state_dict."
        )
    for flavor in flavors.values():
        for key in _MLMODEL_PATH_KEYS:
            if isinstance(flavor, Mapping) and flavor.get(key) is not None:
                _inside(folder, flavor[key], f"its {key!r} path")
    data = _inside(folder, pytorch.get("model_data", "data"), "its 'model_data' path")
    exported, pickled = data / "model.pt2", data / "model.pth"
    if exported.is_file():
        _inside(folder, exported, "its data/model.pt2")
        return _read_pt2(exported), "MLflow PyTorch model (torch.export archive)", "", []
    if not pickled.is_file():
        files = _weight_files(data) if data.is_dir() else []
        if len(files) == 1:
            return _read_weight_file(
                _inside(folder, files[0], "its weight file"), trust_pickle=trust_pickle
            )
        raise SourceError(
            f"the MLflow model in {folder.name!r} has neither data/model.pt2 nor data/model.pth."
        )
    if trust_pickle:
        module = _mlflow_load_trusted(folder)
        if module is not None:
            return (
                module,
                f"MLflow PyTorch model (pickled {type(module).__name__})",
                "",
                ["unpickled with --trust-pickle (code from the model was run)."],
            )
    weights, what, prefix, notes = _read_torch_file(
        _inside(folder, pickled, "its data/model.pth"), trust_pickle=False
    )
    return weights, f"MLflow PyTorch model ({what})", prefix, notes


#: Keys of an MLmodel flavor that name a path inside the model's folder.
_MLMODEL_PATH_KEYS = ("model_data", "data", "code", "model_path", "artifacts_path")


def _inside(folder: Path, named: Any, what: str) -> Path:
    """``folder / named``, refused unless it resolves (symlinks followed) inside ``folder``.

    An ``MLmodel`` file names paths; one that is absolute, climbs out with ``..`` or leads out
    through a symlink would make the audit read a file the source does not hold.
    """
    if not isinstance(named, (str, os.PathLike)) or not str(named).strip():
        raise SourceError(f"{folder}/MLmodel: {what} is not a path ({str(named)[:80]!r}).")
    root = folder.resolve()
    try:
        target = (folder / named).resolve()
    except (OSError, RuntimeError, ValueError) as error:
        raise SourceError(f"{folder}/MLmodel: {what} cannot be resolved ({error}).") from error
    if target != root and root not in target.parents:
        raise SourceError(
            f"{folder}/MLmodel: {what} {str(named)[:120]!r} leads outside the model's folder "
            f"(to {target}); refusing to read a file the source does not hold."
        )
    return folder / named


def _mlflow_load_trusted(folder: Path) -> nn.Module | None:
    """``mlflow.pytorch.load_model`` with pickle allowed; ``None`` if the class is missing."""
    import mlflow.pytorch

    with _environment(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="true"):
        try:
            model = mlflow.pytorch.load_model(str(folder), map_location="cpu")
        except (ImportError, AttributeError):
            return None
        except Exception as error:
            raise SourceError(
                f"mlflow.pytorch.load_model failed on {folder.name!r} ({_first_line(error)})."
            ) from error
    return model if isinstance(model, nn.Module) else None


# ---------------------------------------------------------------------------------------------
# MLflow runs and registered models
# ---------------------------------------------------------------------------------------------


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def mlflow_client(tracking_uri: str | None = None) -> Iterator[tuple[Any, str]]:
    """``(MlflowClient, tracking URI)`` on ``tracking_uri``, failing fast when the server is down.

    MLflow retries an unanswered request for minutes by default; inside this context it retries
    once (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``, backoff 1 s, 10 s timeout, unless the user set
    them), the artifact progress bars are off, and an HTTP server's ``/health`` is checked
    first (a few seconds at most). A local store (``sqlite:///...``, a folder) must exist: an
    audit never creates one.

    Raises:
        PlatformError: mlflow is not installed, the server does not answer, or the store does
            not exist.
    """
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError as error:
        raise PlatformError(
            f"runs:/ and models:/ sources need the mlflow package: {_MLFLOW_HINT}"
        ) from error
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": os.environ.get(
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"
        ),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    with _environment(**settings):
        check_tracking_uri(uri)
        with _mlflow_uris(mlflow, uri):
            yield MlflowClient(tracking_uri=uri, registry_uri=uri), uri


@contextmanager
def _mlflow_uris(mlflow: Any, uri: str) -> Iterator[None]:
    """MLflow's current tracking and registry URIs set to ``uri`` for the duration: some of its
    downloads (``models:/`` URIs) ask the current registry, whatever URI they were given, and
    would otherwise open (and create) the default local store."""
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)


def _mlflow_error(error: BaseException, what: str, uri: str) -> SourceError:
    """An MLflow exception as a SourceError (not found) or PlatformError (anything else)."""
    code = getattr(error, "error_code", "")
    message = _first_line(getattr(error, "message", None) or error)
    if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
        return SourceError(f"{what} not found at {uri} ({message}).")
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return PlatformError(f"MLflow at {uri} refused access to {what} ({message}).")
    if isinstance(error, (ConnectionError, socket.timeout)) or "Max retries" in message:
        return PlatformError(f"lost the MLflow server at {uri} while reading {what} ({message}).")
    return PlatformError(f"MLflow at {uri} failed to read {what} ({message}).")


def _load_mlflow_run(client: Any, uri: str, ref: SourceRef, *, trust_pickle: bool) -> LoadedModel:
    run = _get_run(client, str(ref.run_id), uri)
    run_label = _run_label(run)
    artifact_path = ref.artifact_path.strip("/")
    notes: list[str] = []
    model_id = None
    if not artifact_path:
        found = run_model_uris(client, run)
        if not found:
            raise SourceError(
                f"MLflow run {run_label} has no logged model and no weight file artifact "
                f"({', '.join(WEIGHT_SUFFIXES)}); log one with mlflow.pytorch.log_model or "
                "mlflow.pytorch.log_state_dict, or name the artifact: runs:/<run_id>/<path>."
            )
        download_uri = found[0]
        if len(found) > 1:
            notes.append(f"the run has {len(found)} models; audited {download_uri}.")
        if download_uri.startswith("models:/"):
            model_id = download_uri.removeprefix("models:/")
        shown = f"{run_label}"
    else:
        download_uri = f"runs:/{run.info.run_id}/{artifact_path}"
        shown = f"{run_label}/{artifact_path}"
    with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
        local = _download(download_uri, scratch, uri, lambda: _run_contents(client, run))
        loaded = load_file(local, trust_pickle=trust_pickle, source=ref.uri)
    loaded.label = shown
    loaded.notes = notes + loaded.notes
    loaded.run = RunTarget(
        platform="mlflow",
        run_id=run.info.run_id,
        tracking_uri=uri,
        model_id=model_id,
        label=run_label,
    )
    return loaded


def _load_mlflow_model(client: Any, uri: str, ref: SourceRef, *, trust_pickle: bool) -> LoadedModel:
    run_id: str | None
    if ref.model_id is not None:
        try:
            logged = client.get_logged_model(ref.model_id)
        except Exception as error:
            raise _mlflow_error(error, f"logged model {ref.model_id!r}", uri) from error
        run_id, model_id = logged.source_run_id, logged.model_id
        download_uri = f"models:/{logged.model_id}"
        label = f"{logged.name} ({logged.model_id})"
    else:
        version = _model_version(client, ref, uri)
        run_id, model_id = version.run_id, getattr(version, "model_id", None)
        source = str(getattr(version, "source", "") or "")
        if model_id is None and re.fullmatch(r"models:/m-[0-9a-f]+", source):
            model_id = source.removeprefix("models:/")  # MLflow 3: registered from a logged model
        download_uri = f"models:/{version.name}/{version.version}"
        label = f"{version.name} v{version.version}"
    with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
        local = _download(download_uri, scratch, uri, None)
        loaded = load_file(local, trust_pickle=trust_pickle, source=ref.uri)
    loaded.label = label
    if run_id:
        loaded.run = RunTarget(
            platform="mlflow", run_id=run_id, tracking_uri=uri, model_id=model_id, label=label
        )
    return loaded


def _model_version(client: Any, ref: SourceRef, uri: str) -> Any:
    what = f"registered model {ref.model_name!r}"
    try:
        if ref.version is not None:
            what += f" version {ref.version}"
            return client.get_model_version(ref.model_name, ref.version)
        if ref.alias is not None:
            what += f" alias {ref.alias!r}"
            return client.get_model_version_by_alias(ref.model_name, ref.alias)
        stages = None if ref.stage == "latest" else [ref.stage]
        what += " (latest version)" if stages is None else f" stage {ref.stage!r}"
        versions = client.get_latest_versions(ref.model_name, stages)
    except Exception as error:
        raise _mlflow_error(error, what, uri) from error
    if not versions:
        raise SourceError(f"{what} has no versions at {uri}.")
    return max(versions, key=lambda v: int(v.version))


def _get_run(client: Any, run_id: str, uri: str) -> Any:
    try:
        return client.get_run(run_id)
    except Exception as error:
        raise _mlflow_error(error, f"MLflow run {run_id!r}", uri) from error


def _run_label(run: Any) -> str:
    name = getattr(run.info, "run_name", None)
    return f"{name} ({run.info.run_id[:8]})" if name else run.info.run_id


def _download(uri: str, scratch: str, tracking_uri: str, contents: Any) -> Path:
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=scratch, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
    except Exception as error:
        code = getattr(error, "error_code", "")
        missing = code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or isinstance(
            error, (FileNotFoundError, OSError)
        )
        if missing and contents is not None:
            raise SourceError(
                f"{uri}: no such artifact or logged model; the run has {contents()}."
            ) from error
        raise _mlflow_error(error, uri, tracking_uri) from error
    path = Path(local)
    if not path.exists():
        raise SourceError(f"{uri}: nothing was downloaded.")
    return path


def _run_contents(client: Any, run: Any) -> str:
    """What a run holds, for messages: its top-level artifacts and logged models."""
    try:
        artifacts = [item.path for item in client.list_artifacts(run.info.run_id)]
    except Exception:
        artifacts = []
    models = [m.name for m in _logged_models(client, run)]
    return (
        f"artifacts {_list_names(artifacts)} and logged models {_list_names(models)}"
        if models
        else f"artifacts {_list_names(artifacts)}"
    )


def _logged_models(client: Any, run: Any) -> list[Any]:
    """MLflow 3 logged models whose source is ``run``, newest first (none on MLflow 2)."""
    search = getattr(client, "search_logged_models", None)
    if search is None:
        return []
    try:
        found = list(
            search(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run.info.run_id}'",
            )
        )
    except Exception:
        return []
    return sorted(found, key=lambda m: getattr(m, "creation_timestamp", 0) or 0, reverse=True)


def _model_status(model: Any) -> str:
    """A logged model's status as text (``READY``, ``FAILED``, ``PENDING``...)."""
    status = getattr(model, "status", None)
    return str(getattr(status, "value", status) or "UNSPECIFIED").upper()


def run_model_uris(
    client: Any,
    run: Any,
    *,
    max_depth: int = 4,
    max_items: int = 2000,
    notes: list[str] | None = None,
) -> list[str]:
    """The models an MLflow run holds, as URIs, best first.

    In this order: the MLflow 3 logged models of the run (``models:/<model_id>``, newest first)
    whose status is READY, MLflow models among its artifacts (folders with an ``MLmodel`` file),
    then weight files (:data:`WEIGHT_SUFFIXES`) among its artifacts (``runs:/<run_id>/<path>``).
    A logged model that is not READY (FAILED: its ``log_model`` raised; PENDING: still being
    written or abandoned) has no complete files, so it is left out, with one line in ``notes``
    when a list is given. The artifacts under ``clusterability/`` (written by the tracker and by
    audits) are not searched.
    """
    uris: list[str] = []
    for model in _logged_models(client, run):
        status = _model_status(model)
        if status == "READY":
            uris.append(f"models:/{model.model_id}")
        elif notes is not None:
            notes.append(
                f"run {_run_label(run)}: logged model {getattr(model, 'name', '')!r} "
                f"({model.model_id}) is {status}, not READY; skipped."
            )
    model_dirs: list[str] = []
    files: list[str] = []
    seen = 0
    pending: list[tuple[str | None, int]] = [(None, 0)]
    while pending and seen < max_items:
        folder, depth = pending.pop(0)
        try:
            items = client.list_artifacts(run.info.run_id, folder)
        except Exception:
            continue
        names = {item.path.rsplit("/", 1)[-1] for item in items}
        if folder is not None and "MLmodel" in names:
            model_dirs.append(folder)
            continue
        for item in items:
            seen += 1
            if item.is_dir:
                if item.path.split("/")[0] != "clusterability" and depth < max_depth:
                    pending.append((item.path, depth + 1))
            elif item.path.lower().endswith(WEIGHT_SUFFIXES):
                files.append(item.path)
    preferred = [f for f in files if f.endswith("state_dict.pth")]
    others = [f for f in files if f not in preferred]
    run_id = run.info.run_id
    return uris + [f"runs:/{run_id}/{path}" for path in (*model_dirs, *preferred, *others)]


def experiment_sources(
    experiments: Sequence[str],
    *,
    tracking_uri: str | None = None,
    notes: list[str] | None = None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """Every run of MLflow experiments that holds a model: ``([(uri, run label)], skipped)``.

    Each run gives its best model (:func:`run_model_uris`): its newest READY logged model, else
    an MLflow model or weight file among its artifacts. Deleted runs are left out; ``skipped``
    names the runs without any model; logged models left out because they are not READY are
    described in ``notes``, one line each, when a list is given.

    Raises:
        SourceError: an experiment does not exist.
        PlatformError: MLflow cannot be reached.
    """
    from mlflow.entities import ViewType

    found: list[tuple[str, str]] = []
    skipped: list[str] = []
    with mlflow_client(tracking_uri) as (client, uri):
        for name in experiments:
            experiment = _experiment(client, name, uri)
            runs: list[Any] = []
            token = None
            try:
                while True:
                    page = client.search_runs(
                        [experiment.experiment_id],
                        run_view_type=ViewType.ACTIVE_ONLY,
                        max_results=1000,
                        order_by=["attributes.start_time ASC"],
                        page_token=token,
                    )
                    runs.extend(page)
                    token = page.token
                    if not token:
                        break
            except Exception as error:
                raise _mlflow_error(error, f"the runs of experiment {name!r}", uri) from error
            for run in runs:
                uris = run_model_uris(client, run, notes=notes)
                if uris:
                    found.append((uris[0], _run_label(run)))
                else:
                    skipped.append(_run_label(run))
    return found, skipped


def _experiment(client: Any, name: str, uri: str) -> Any:
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None and name.isdigit():
            experiment = client.get_experiment(name)
    except Exception as error:
        code = getattr(error, "error_code", "")
        if code == "RESOURCE_DOES_NOT_EXIST":
            experiment = None
        else:
            raise _mlflow_error(error, f"experiment {name!r}", uri) from error
    if experiment is None:
        try:
            names = [e.name for e in client.search_experiments(max_results=50)]
        except Exception:
            names = []
        raise SourceError(
            f"no MLflow experiment named {name!r} at {uri}; experiments there: "
            f"{_list_names(names)}."
        )
    return experiment


# ---------------------------------------------------------------------------------------------
# W&B artifacts
# ---------------------------------------------------------------------------------------------


def _load_wandb(ref: SourceRef, *, trust_pickle: bool) -> LoadedModel:
    """Download a W&B artifact with the public API and read it like a local folder.

    Needs a W&B server (wandb.ai or a local one at ``WANDB_BASE_URL``) and an API key. Every
    request has a short timeout, so an unreachable server fails in seconds.
    """
    api = wandb_api()
    name = f"{ref.entity}/{ref.project}/{ref.name}:{ref.alias}"
    try:
        artifact = api.artifact(name)
    except Exception as error:
        raise _wandb_error(error, f"artifact {name!r}") from error
    with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
        try:
            local = Path(artifact.download(root=scratch))
        except Exception as error:
            raise _wandb_error(error, f"the files of artifact {name!r}") from error
        loaded = load_file(local, trust_pickle=trust_pickle, source=ref.uri)
    loaded.label = name
    try:
        producer = artifact.logged_by()
    except Exception:
        producer = None
    if producer is not None:
        loaded.run = RunTarget(
            platform="wandb",
            run_id=producer.id,
            entity=producer.entity,
            project=producer.project,
            label=f"{producer.entity}/{producer.project}/{producer.id}",
        )
    return loaded


def wandb_api() -> Any:
    """``wandb.Api`` with a short timeout, its failures as :class:`PlatformError`.

    The W&B server is probed first: ``wandb.Api`` starts a background ``wandb-core`` service that
    keeps retrying an unreachable server, and the process then waits for it at exit.
    """
    try:
        import wandb
    except ImportError as error:
        raise PlatformError(
            f"wandb-artifact:// sources need the wandb package: {_WANDB_HINT}"
        ) from error
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not _reachable(base):
        raise PlatformError(
            f"cannot reach W&B at {base}: check the network, or WANDB_BASE_URL for a local server."
        )
    silent = _silent(base)
    if silent:
        raise PlatformError(
            f"W&B at {base} accepts connections but does not answer HTTP ({silent}); check the "
            "server, or WANDB_BASE_URL."
        )
    try:
        return wandb.Api(timeout=int(PROBE_TIMEOUT))
    except Exception as error:
        raise _wandb_error(error, "the W&B API") from error


def _wandb_error(error: BaseException, what: str) -> SourceError:
    message = _first_line(error)
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    name = type(error).__name__
    if name == "UsageError" and "api key" in message.lower():
        return PlatformError(
            f"W&B needs an API key to read {what}: run `wandb login` or set WANDB_API_KEY."
        )
    if "not found" in message.lower() or "does not exist" in message.lower():
        return SourceError(f"W&B has no {what} ({message}).")
    if not _reachable(base):
        return PlatformError(f"cannot reach W&B at {base} to read {what} ({message}).")
    return PlatformError(f"W&B at {base} failed to give {what} ({message}).")


def _silent(url: str) -> str | None:
    """Why ``url`` gives no HTTP answer within :data:`PROBE_TIMEOUT` seconds (connect and
    read), or ``None`` when it answers (any status: an error page is an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as error:
        return _first_line(getattr(error, "reason", error))


def _reachable(url: str) -> bool:
    """Whether anything answers at ``url``'s host and port (a TCP connection, 2 s at most)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=2.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _first_line(error: object) -> str:
    """The first line of an error message; its first sentence when that line is long."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    if len(line) > 160 and ". " in line[:300]:
        line = line[: line.index(". ") + 1]
    if len(line) < 12 or isinstance(error, KeyError):
        line = f"{type(error).__name__}: {line}"
    return line[:300]


def _list_names(names: Sequence[str], limit: int = 20) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
