"""Hugging Face model folders (``save_pretrained``), and their weight graph read in bounded
memory: a transformer's residual stream, attention and MLP blocks without loading the model.

Loading a folder (transformers' ``from_pretrained``) and calling
:func:`~cluster_tracking.graph.weight_graph` holds every weight several times over (the model,
then a float64 copy and a sparse adjacency: about 60 bytes per edge). :func:`model_folder_graph`
builds the architecture that ``config.json`` names on PyTorch's meta device instead (no memory;
never code from the folder: ``trust_remote_code`` stays off), follows its data flow with
``torch.export`` as :func:`~cluster_tracking.graph.weight_graph` follows a live model (the same
rules, layers, nodes and order), and then reads each weight block from the folder's safetensors
files (one file or shards) through a memory map, one block at a time, as float32 magnitudes with
what the trace recorded applied: transposes, folded LayerNorm/RMSNorm weights, per-unit scales.
About 4 bytes per edge, and no sparse adjacency (``WeightGraph.assembled`` is ``False``):
degrees, the eigensolver's products and the n-cut work block by block.

The peak memory is estimated from the traced shapes and checked against the limit before any
weight block is read. A BatchNorm (whose statistics the trace would have to fold) is refused:
such models are small enough to audit in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cluster_tracking.errors import GraphError, SourceError, first_line
from cluster_tracking.graph.mapped import _read_header, _read_magnitudes, _Tensor
from cluster_tracking.graph.mapped_graph import (
    SafetensorsGraph,
    StageCallback,
    _as_safetensors_graph,
)
from cluster_tracking.graph.types import EdgeBlock, Preset, WeightGraph, WeightSource

__all__ = [
    "is_model_folder",
    "model_class_for",
    "model_folder_extent",
    "model_folder_graph",
    "model_folder_size",
]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like a Hugging Face ``save_pretrained`` folder."""
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in (*_WEIGHTS, "pytorch_model.bin")
    )


def model_class_for(folder: Path) -> Any:
    """The transformers class that builds the model of a ``save_pretrained`` folder: the one
    its ``config.json`` names in ``architectures`` (``AutoModel`` when it names none).

    Raises:
        SourceError: the config needs remote code or names an architecture this transformers
            does not have, the weights are not safetensors, or transformers is not installed.
    """
    config = _read_config(folder)
    if "auto_map" in config:
        raise SourceError(
            f"{folder}/config.json maps the model to code of its own (auto_map), which "
            "cluster-tracking never runs (trust_remote_code stays off); audit a state_dict of the "
            "model with --layers, or load the model in Python yourself and call measure(model)."
        )
    if not any((folder / name).is_file() for name in _WEIGHTS):
        raise SourceError(
            f"{folder} holds pytorch_model.bin but no model.safetensors: the audit reads model "
            "folders without unpickling; save the model with safe_serialization=True (the "
            "default of save_pretrained) and audit that folder."
        )
    try:
        import transformers
    except ImportError as error:
        raise SourceError(
            f"{folder} is a Hugging Face model folder; reading it needs transformers: "
            "pip install 'cluster-tracking[transformers]'."
        ) from error
    names = config.get("architectures") or []
    model_class = getattr(transformers, str(names[0]), None) if names else None
    if model_class is None and names:
        raise SourceError(
            f"{folder}/config.json names the architecture {names[0]!r}, which this version of "
            "transformers does not have; upgrade transformers, or audit a state_dict with --arch."
        )
    return transformers.AutoModel if model_class is None else model_class


#: Parameters of at most this many entries are read whole while the model is traced (the
#: normalisations' weights and other per-unit vectors folded into the layers); larger ones are
#: weight blocks, read after the trace one at a time.
SMALL_PARAMETER_ENTRIES = 1 << 20


def model_folder_size(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """``(nodes, edges)`` at most of a model folder's weight graph, from its files' headers
    alone (every stored tensor of two or more dimensions a full block, embeddings included);
    :class:`SourceError` when it is not a model folder with safetensors weights."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise SourceError(f"{folder} is not a Hugging Face model folder (config.json and weights).")
    nodes = edges = 0
    for _, tensor in _weight_files(folder).values():
        if tensor.ndim >= 2:
            nodes += tensor.shape[0] + tensor.shape[1]
            edges += int(np.prod(tensor.shape, dtype=np.int64))
    return nodes, edges


def model_folder_extent(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """``(nodes, edges)`` of the graph :func:`model_folder_graph` builds, traced on the meta
    device (edges: the weight blocks' entries; nothing is read but the config, the files'
    headers and the per-unit vectors)."""
    topology, _ = _trace_folder(Path(folder), preset="default", include_embeddings=False)
    return _extent(topology)


def model_folder_graph(
    folder: str | os.PathLike[str],
    *,
    preset: Preset = "default",
    include_embeddings: bool = False,
    k: int = 12,
    shuffles: int = 0,
    workers: int = 1,
    max_memory: int | None = None,
    stage: StageCallback | None = None,
    norm: Literal["l1", "l2"] = "l1",
    before_reading: Callable[[int, int], None] | None = None,
) -> SafetensorsGraph:
    """The weight graph of a Hugging Face model folder, read in bounded memory (see the module).

    The same graph as ``weight_graph(model)`` gives for the model the folder loads (same layers,
    nodes, order and edge weights: the residual stream one set of nodes shared by every block,
    the attention value path carrying channels, gated MLPs merged), held as float32 magnitudes
    without a sparse adjacency. bf16, fp16 and float32 weights are read exactly; a folded
    normalisation weight is applied in float64 and rounded once to float32 (relative 6e-8).

    Args:
        folder: a ``save_pretrained`` folder: ``config.json`` and ``model.safetensors`` (or
            ``model.safetensors.index.json`` and its shards).
        preset, include_embeddings, norm: as for :func:`~cluster_tracking.graph.weight_graph`.
        k, shuffles, workers: what the measurement will do, for the memory estimate.
        max_memory: bytes the measurement may use here (``None``: the limit in force).
        stage: called as ``stage("tracing", done, 1)`` around the trace and
            ``stage("reading", done, total)`` as the blocks are read.
        before_reading: called as ``before_reading(nodes, edges)`` once the model is traced,
            before the memory check and any weight block is read (a caller's own checks).

    Raises:
        SourceError: the folder is not a model folder transformers can build without remote
            code, or its files do not match its config.
        GraphError: the data flow cannot be followed (as for a live model), it folds a
            BatchNorm, or a weight holds NaN/Inf.
        ConfigError: the estimated peak memory passes the limit (the message gives the
            estimate and the options).
    """
    from cluster_tracking.resources.estimate import check_fits, estimate_peak

    folder = Path(folder).absolute()
    if stage is not None:
        stage("tracing", 0, 1)
    topology, weights = _trace_folder(
        folder, preset=preset, include_embeddings=include_embeddings, norm=norm
    )
    if stage is not None:
        stage("tracing", 1, 1)
    nodes, edges = _extent(topology)
    if before_reading is not None:
        before_reading(nodes, edges)
    check_fits(
        estimate_peak(nodes, edges, k=k, shuffles=shuffles, workers=workers),
        str(folder),
        max_memory,
        dask=False,  # a folder's blocks are not kept on Dask workers (chains of one file are)
        fewer_layers=(
            "audit a chain of its layers from its safetensors file (cluster-tracking audit "
            "FILE.safetensors --layers ..., or safetensors_graph(file, layers=...))"
        ),
    )
    blocks = []
    for done, block in enumerate(topology.blocks, start=1):
        blocks.append(replace(block, weight=weights.block_weight(block), magnitude=True))
        if stage is not None:
            stage("reading", done, len(topology.blocks))
    graph = replace(topology, blocks=tuple(blocks))
    return _as_safetensors_graph(graph, None, None)


def _extent(topology: WeightGraph) -> tuple[int, int]:
    edges = sum(int(np.prod(block.weight.shape, dtype=np.int64)) for block in topology.blocks)
    return topology.n_nodes, edges


@dataclass
class _FolderWeights:
    """The weights of a model folder's files, named by the parameters of its architecture
    (``model``, on the meta device)."""

    folder: Path
    model: Any
    files: dict[str, tuple[Path, _Tensor]]  # file key -> (shard, tensor)
    keys: dict[str, str]  # parameter name -> file key, as transformers' loader renames them
    converted: set[str]  # parameters the loader makes by converting stored tensors
    small: dict[str, np.ndarray] = field(default_factory=dict)  # float64 per-unit vectors
    named: dict[str, Any] = field(init=False)  # the model's parameters and buffers by name

    def __post_init__(self) -> None:
        self.named = dict(
            [
                *self.model.named_parameters(remove_duplicate=False),
                *self.model.named_buffers(remove_duplicate=False),
            ]
        )

    def deferred(self, name: str) -> np.ndarray:
        """What the trace reads for a parameter: a small one's values, a zero-stride
        placeholder for a weight block's (read afterwards)."""
        shape = self._shape(name)
        if int(np.prod(shape, dtype=np.int64)) > SMALL_PARAMETER_ENTRIES:
            return np.broadcast_to(np.float64(1.0), shape)
        return self.values(name)

    def values(self, name: str) -> np.ndarray:
        """A parameter's float64 values (kept: the per-unit vectors are read by several
        layers)."""
        if name not in self.small:
            self.small[name] = self._read(name, absolute=False).astype(np.float64)
        return self.small[name]

    def block_weight(self, block: EdgeBlock) -> np.ndarray:
        """The float32 magnitudes of ``block``'s effective weight, read from the files."""
        from cluster_tracking.graph.weights import effective_weight

        source = block.source or WeightSource(self._block_parameter(block))
        label = f"layer {block.name!r}"
        weight = effective_weight(
            self._read(source.parameter, absolute=True), source, self.values, label
        )
        weight = weight.astype(np.float32, copy=False)
        if weight.shape != block.weight.shape:  # pragma: no cover - the trace read this shape
            raise GraphError(f"{label}: read {weight.shape}, traced {block.weight.shape}.")
        return weight

    def _read(self, name: str, *, absolute: bool) -> np.ndarray:
        key = self._file_key(name)
        path, tensor = self.files[key]
        expected = self._shape(name)
        if tuple(tensor.shape) != expected:
            raise SourceError(
                f"{path}: tensor {key!r} has shape {list(tensor.shape)}, but the architecture "
                f"its config.json names reads {name!r} as {list(expected)}; the folder does "
                "not match its config."
            )
        return _read_magnitudes(path, tensor, f"weight {key!r}", absolute=absolute)

    def _file_key(self, name: str) -> str:
        """The key in the files of the parameter ``name`` (or of another name of the same
        tensor: tied weights), as transformers' loader maps the keys."""
        for candidate in (name, *self._aliases(name)):
            if candidate in self.keys:
                return self.keys[candidate]
        if name in self.converted:
            raise SourceError(
                f"{self.folder}: the parameter {name!r} is not stored as the model holds it "
                "(transformers converts the stored tensors when it loads them: fused, split "
                "or permuted); the bounded-memory reader reads tensors as stored. Load the "
                "model in Python and call measure(model) where it fits."
            )
        raise SourceError(
            f"{self.folder}: the architecture its config.json names reads the parameter "
            f"{name!r}, which none of its safetensors files holds; the folder does not match "
            "its config (save the model again with save_pretrained)."
        )

    def _aliases(self, name: str) -> list[str]:
        target = self.named.get(name)
        return [other for other, t in self.named.items() if t is target and other != name]

    def _shape(self, name: str) -> tuple[int, ...]:
        tensor = self.named.get(name)
        if tensor is None:
            raise GraphError(f"parameter {name!r} of the weight graph is not in the model.")
        return tuple(tensor.shape)

    def _block_parameter(self, block: EdgeBlock) -> str:
        """The name of the parameter holding a block's plain weight."""
        from cluster_tracking.graph.weights import layer_weight

        tensor = layer_weight(self.model, block)
        return next(name for name, t in self.named.items() if t is tensor)


def _trace_folder(
    folder: Path, *, preset: Preset, include_embeddings: bool, norm: Literal["l1", "l2"] = "l1"
) -> tuple[WeightGraph, _FolderWeights]:
    """The folder's architecture built on the meta device and traced: its topology (weights:
    zero-stride placeholders) and its files' weights."""
    import torch

    from cluster_tracking.graph.api import _trace, check_graph_options

    check_graph_options(norm, preset)
    model_class = model_class_for(folder)
    files = _weight_files(folder)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
        with torch.device("meta"):
            if model_class is transformers.AutoModel:
                model = transformers.AutoModel.from_config(config, trust_remote_code=False)
            else:
                model = model_class(config)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError) as error:
        raise SourceError(
            f"{folder}: transformers cannot build the model from its config.json "
            f"({type(error).__name__}: {first_line(error)})."
        ) from error
    model.eval()
    keys, converted = _loader_keys(model, files, folder)
    weights = _FolderWeights(folder, model, files, keys, converted)
    builder = _trace(model, norm, None, include_embeddings, deferred=weights.deferred)
    return builder.finish(preset, f"the model of {folder}", assemble=False), weights


def _loader_keys(
    model: Any, files: Mapping[str, Any], folder: Path
) -> tuple[dict[str, str], set[str]]:
    """``(names, converted)``: the model's parameter name of each stored key that transformers'
    loader renames at most (its checkpoint conversion mapping, the base model's prefix added or
    dropped), and the parameters it makes by converting stored tensors."""
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    rename = _loader_renaming(model, meta, prefix)
    names, converted = {}, set()
    unused: list[str] = []
    for key in files:
        renamed, pattern = rename(key)
        if renamed in meta:
            if pattern is None:
                names[renamed] = key
            else:
                converted.add(renamed)
        else:
            unused.append(key)
    if unused:  # the model would not read them: never audit a part of a folder silently
        shown = ", ".join(repr(key) for key in unused[:5])
        raise SourceError(
            f"{folder}: {len(unused)} stored tensor(s) are not parameters of the architecture "
            f"its config.json names ({shown}); the folder does not match its config (save "
            "the model again with save_pretrained)."
        )
    return names, converted


def _loader_renaming(
    model: Any, meta: dict[str, Any], prefix: str | None
) -> Callable[[str], tuple[str, str | None]]:
    """``rename(key) -> (parameter name, converter pattern or None)`` for a stored key, as
    transformers' loader does (``core_model_loading``); a transformers without checkpoint
    conversions takes the key as stored, the base model's prefix added or dropped."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:

        def as_stored(key: str) -> tuple[str, str | None]:
            for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
                if name in meta:
                    return name, None
            return key, None

        return as_stored
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]

    def as_loaded(key: str) -> tuple[str, str | None]:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(
                key, [], [], base_model_prefix=prefix, meta_state_dict=meta
            )
        return renamed, pattern

    return as_loaded


def _weight_files(folder: Path) -> dict[str, tuple[Path, _Tensor]]:
    """Every tensor of the folder's safetensors weights (``model.safetensors``, or the shards
    that ``model.safetensors.index.json`` lists), by key."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted({str(shard) for shard in weight_map.values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(
                f"{index} cannot be read as a safetensors index ({type(e).__name__}: {e})."
            ) from e
        bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if bad or not names:
            raise SourceError(
                f"{index} lists no shards, or shard(s) {bad[:3]} that are not .safetensors "
                "files of the folder itself."
            )
        shards = [folder / name for name in names]
    else:
        raise SourceError(
            f"{folder} holds no model.safetensors nor model.safetensors.index.json; save the "
            "model with save_pretrained (safe_serialization=True, the default)."
        )
    files: dict[str, tuple[Path, _Tensor]] = {}
    for shard in shards:
        for key, tensor in _read_header(shard).items():
            files[key] = (shard, tensor)
    return files


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path} cannot be read as JSON ({error}).") from error
    if not isinstance(config, dict):
        raise SourceError(f"{path} is not a JSON object.")
    return config
