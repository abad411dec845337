"""Loading the weights of a model for an audit, without running code from the file.

An audit measures a model that was saved or logged before: a local checkpoint, an MLflow run's
artifact or logged model, or a W&B model artifact. :func:`load_source` reads any of them into what
:func:`~cluster_tracking.measure.measure` takes (a ``state_dict`` of a chain of layers, or a
``torch.nn.Module``) and remembers where it came from, so that ``--log-to-run`` can write the
result back into the run that produced the model.

Sources (:func:`parse_source`); the local readers are in :mod:`cluster_tracking.audit.files` and
:mod:`cluster_tracking.audit.formats`, the platform schemes are served by the integrations that
register with :mod:`cluster_tracking.audit.registry`
(:mod:`cluster_tracking.integrations.mlflow_source`,
:mod:`cluster_tracking.integrations.wandb_source`):

* a local file: ``.safetensors``; a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``,
  ...) holding a ``state_dict``, a checkpoint dict (``{"state_dict": ...}``,
  ``{"model_state_dict": ..., "optimizer_state_dict": ...}``, a Lightning ``.ckpt``) or a pickled
  module; a ``torch.export`` archive (``.pt2``); or a folder holding one of these or an MLflow model
  (a folder with an ``MLmodel`` file);
* ``runs:/<run_id>/<path>``: an artifact of an MLflow run (a weight file, a ``log_state_dict``
  folder, an MLflow model) or, in MLflow 3, a model the run logged under that name;
  ``runs:/<run_id>`` alone takes the run's model;
* ``models:/<name>/<version>``, ``models:/<name>@<alias>`` (also ``models:/<name>/<alias>``,
  ``.../latest``, ``.../<stage>``) and MLflow 3's ``models:/<model_id>``;
* ``wandb-artifact://<entity>/<project>/<name>[:<alias or version>]`` (default ``:latest``).

Safety. Loading never runs code from the file unless the user passes ``trust_pickle=True``:

* ``torch.save`` files are read with ``torch.load(..., weights_only=True)``, PyTorch's restricted
  unpickler, which only rebuilds tensors and plain containers;
* a pickle that names other classes or functions (a whole pickled module, a checkpoint whose
  hyper-parameters hold custom objects) is read again with an inert stand-in for each of them
  (:class:`~cluster_tracking.audit.formats.stand_ins.StandIn`): nothing named in the file is
  imported or called, the tensors are kept, and a pickled module's weights are collected from
  its ``_parameters``/``_buffers`` in declaration order, the order of its ``state_dict()``.
  Functions that PyTorch blocks outright (``os.system``...) stop the load;
* ``torch.export`` archives (``.pt2``, MLflow 3's default PyTorch format) are read as a zip of raw
  tensor bytes described by JSON; nothing is unpickled but through ``weights_only``;
* only ``trust_pickle=True`` unpickles for real (``torch.load(weights_only=False)``, or
  ``mlflow.pytorch.load_model`` for an MLflow model saved with pickle), which gives the model's
  own class and lets the weight graph follow its real data flow.

Hostile input. Only regular files are read (devices, FIFOs and sockets are refused before they
are opened; symlinks are followed only to regular files); a folder is searched to
:data:`~cluster_tracking.audit.files.MAX_FOLDER_DEPTH` levels and
:data:`~cluster_tracking.audit.files.MAX_FOLDER_ENTRIES` entries. Every size a file declares
(safetensors header and offsets, zip members, ``.pt2`` shapes) is checked against the bytes really
there and against the memory limit (:mod:`cluster_tracking.resources.limits`, ``--max-memory``)
before anything is allocated; deflated zip members are inflated as a stream against that limit
first.
Every path an ``MLmodel`` file names must stay inside the model's folder. Weights whose
magnitudes mean nothing alone (bool masks, integer tensors without their quantization scales),
empty layers and all-zero models are refused with a :class:`~cluster_tracking.errors.GraphError`;
PyTorch's own quantized tensors are dequantized first.

Errors are :class:`~cluster_tracking.errors.SourceError` (missing, unreadable or untrusted
source; :class:`~cluster_tracking.errors.LimitError` when it would pass the memory limit),
:class:`~cluster_tracking.errors.PlatformError` (MLflow or W&B cannot be reached or refuses),
:class:`~cluster_tracking.errors.GraphError` (weights that cannot be measured) and
:class:`~cluster_tracking.errors.ConfigError`.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from cluster_tracking.audit.checks import checked_weights
from cluster_tracking.audit.files import WEIGHT_SUFFIXES, file_mode, scan_folder
from cluster_tracking.audit.formats.detect import read_weight_file
from cluster_tracking.audit.formats.mlflow_model import read_mlflow_model_dir
from cluster_tracking.audit.registry import platform_for_kind, platform_for_scheme
from cluster_tracking.errors import LimitError, SourceError
from cluster_tracking.graph.safetensors_header import check_safetensors_header
from cluster_tracking.graph.selection import list_names
from cluster_tracking.resources.limits import MemoryBudget, memory_limit

__all__ = [
    "LoadedModel",
    "RunTarget",
    "SourceRef",
    "load_file",
    "load_source",
    "parse_source",
]


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
    platform = platform_for_scheme(scheme)
    if platform is not None:
        return platform.schemes[scheme](text, rest)
    raise SourceError(
        f"unknown source scheme {scheme + ':'!r} in {text!r}; audit reads local files and "
        "folders, runs:/<run_id>/<path>, models:/<name>/<version or alias> and "
        "wandb-artifact://<entity>/<project>/<name>:<alias>."
    )


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
        platform = platform_for_kind(ref.kind)
        if platform is None or platform.load is None:
            raise SourceError(f"{ref.uri}: no installed integration reads {ref.kind} sources.")
        return platform.load(ref, trust_pickle=trust_pickle, tracking_uri=tracking_uri)


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
        mode = file_mode(target, shown)
        try:
            if stat.S_ISDIR(mode):
                loaded = _load_directory(target, trust_pickle=trust_pickle, source=shown)
            else:
                weights, what, prefix, notes = read_weight_file(target, trust_pickle=trust_pickle)
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
    loaded.weights, more = checked_weights(loaded.weights, shown)
    loaded.notes.extend(more)
    return loaded


def _load_directory(folder: Path, *, trust_pickle: bool, source: str) -> LoadedModel:
    """A folder: an MLflow model (``MLmodel``), or a folder with exactly one weight file."""
    if (folder / "MLmodel").is_file():
        weights, what, prefix, notes = read_mlflow_model_dir(folder, trust_pickle=trust_pickle)
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
            file_mode(shard, str(shard))
            check_safetensors_header(shard, budget)
        model = load_model_folder(folder)
        return LoadedModel(
            source=source,
            label=folder.name,
            weights=model,
            format=f"Hugging Face model folder ({type(model).__name__}, safetensors)",
        )
    scan = scan_folder(folder, source)
    files = scan.weight_files()
    if not files:
        listed = list_names([p.relative_to(folder).as_posix() for p in scan.entries], 20)
        raise SourceError(
            f"{source} holds no model: no MLmodel file and no weight file "
            f"({', '.join(WEIGHT_SUFFIXES)}); it holds {listed}."
        )
    if len(files) > 1:
        listed = list_names([p.relative_to(folder).as_posix() for p in files], 20)
        raise SourceError(
            f"{source} holds several weight files ({listed}); audit one of them by its path."
        )
    weights, what, prefix, notes = read_weight_file(files[0], trust_pickle=trust_pickle)
    return LoadedModel(
        source=source,
        label=f"{folder.name}/{files[0].relative_to(folder).as_posix()}",
        weights=weights,
        format=what,
        prefix=prefix,
        notes=notes,
    )
