"""Builders of hand-made model files, well-formed or not, for the hostile-input tests.

Each writes the bytes of a format exactly as its reader expects them (a safetensors header, a
``torch.export`` archive's weights config, a zip whose declared sizes lie), so a test can change
one field and see the reader refuse it.
"""

from __future__ import annotations

import itertools
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# safetensors dtype -> numpy dtype; torch.export ScalarType codes of the same types.
SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "I8": np.int8, "BOOL": np.bool_}
PT2_DTYPES = {np.dtype(np.float32): 7, np.dtype(np.float64): 8, np.dtype(np.int8): 2}


def mlp_arrays(widths: tuple[int, ...] = (8, 16, 4), seed: int = 0) -> dict[str, np.ndarray]:
    """A Linear chain's state_dict as float32 arrays (``0.weight``, ``0.bias``, ``2.weight``...)."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for index, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        state[f"{2 * index}.weight"] = rng.normal(size=(n_out, n_in)).astype(np.float32)
        state[f"{2 * index}.bias"] = rng.normal(size=n_out).astype(np.float32)
    return state


def safetensors_bytes(
    arrays: dict[str, np.ndarray],
    *,
    header_patch: dict[str, Any] | None = None,
    length_delta: int = 0,
    truncate: int = 0,
) -> bytes:
    """A safetensors file of ``arrays``; ``header_patch`` replaces entries of its header,
    ``length_delta`` falsifies the header length, ``truncate`` cuts bytes off the end."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {}
    data = b""
    for key, array in arrays.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[key] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    header.update(header_patch or {})
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text) + length_delta) + text + data
    return blob[: len(blob) - truncate] if truncate else blob


def pt2_archive(
    path: Path,
    arrays: dict[str, np.ndarray],
    *,
    meta_patch: dict[str, dict[str, Any]] | None = None,
    config_text: str | None = None,
    record_patch: dict[str, bytes] | None = None,
    compress: bool = False,
) -> Path:
    """A ``torch.export`` archive (``.pt2``) holding ``arrays`` as raw records.

    ``meta_patch`` replaces fields of a weight's ``tensor_meta`` (by name), ``config_text``
    replaces the whole weights config, ``record_patch`` the bytes of a weight's record.
    """
    config: dict[str, Any] = {}
    records: dict[str, bytes] = {}
    for index, (key, array) in enumerate(arrays.items()):
        strides, step = [], 1
        for size in reversed(array.shape):
            strides.insert(0, step)
            step *= size
        meta: dict[str, Any] = {
            "dtype": PT2_DTYPES[array.dtype],
            "sizes": [{"as_int": int(n)} for n in array.shape],
            "strides": [{"as_int": int(n)} for n in strides],
            "storage_offset": {"as_int": 0},
        }
        meta.update((meta_patch or {}).get(key, {}))
        name = f"weight_{index}"
        config[key] = {"path_name": name, "use_pickle": False, "tensor_meta": meta}
        records[name] = (record_patch or {}).get(key, np.ascontiguousarray(array).tobytes())
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        archive.writestr("archive/archive_format", "pt2")
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/models/model.json", "{}")
        text = config_text if config_text is not None else json.dumps({"config": config})
        archive.writestr("archive/data/weights/model_weights_config.json", text)
        for name, raw in records.items():
            archive.writestr(f"archive/data/weights/{name}", raw)
    return path


def zip_with_a_deflated_member(
    path: Path, member: str, size: int, *, others: dict[str, bytes]
) -> Path:
    """A zip whose ``member`` is ``size`` zero bytes, deflated (a few KiB per MiB), streamed so
    that the test never holds it in memory; ``others`` are stored beside it."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in others.items():
            archive.writestr(name, raw)
        info = zipfile.ZipInfo(member)
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(1 << 20)
        with archive.open(info, "w", force_zip64=True) as handle:
            left = size
            while left > 0:
                handle.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    return path


def lie_about_size(path: Path, member: str, declared: int) -> Path:
    """Patch the uncompressed size that ``path``'s local and central headers declare for
    ``member`` (a 32-bit field: ``declared`` below 4 GiB) and keep everything else."""
    blob = bytearray(path.read_bytes())
    name = member.encode()
    for signature, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while True:
            at = blob.find(signature, start)
            if at < 0:
                break
            name_offset = at + (30 if signature == b"PK\x03\x04" else 46)
            if blob[name_offset : name_offset + len(name)] == name:
                blob[at + field : at + field + 4] = struct.pack("<I", declared)
            start = at + 4
    path.write_bytes(bytes(blob))
    return path


class _Storage:
    """A storage of a legacy file: ``numel`` is what its pickle declares, ``data`` what the file
    holds."""

    def __init__(self, key: str, numel: int, data: bytes) -> None:
        self.key, self.numel, self.data = key, numel, data


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self) -> tuple[Any, ...]:
        import collections

        import torch

        strides, step = [], 1
        for size in reversed(self.shape):
            strides.insert(0, step)
            step *= size
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.shape, tuple(strides), False, collections.OrderedDict()),
        )


def legacy_torch_file(
    path: Path, arrays: dict[str, np.ndarray], *, declare: dict[str, int] | None = None
) -> Path:
    """A ``torch.save`` file in the legacy (pre-1.6) format holding float32 ``arrays`` (see
    :func:`write_legacy`)."""
    with open(path, "wb") as handle:
        write_legacy(handle, arrays, declare=declare)
    return path


def write_legacy(
    handle: Any, arrays: dict[str, np.ndarray], *, declare: dict[str, int] | None = None
) -> None:
    """Write float32 ``arrays`` in ``torch.save``'s legacy (pre-1.6) format, field by field as
    ``torch.load`` reads it: four pickles (magic number, protocol, system info, the object with
    a persistent id per storage), the list of storage keys, then each storage's element count
    and bytes. ``declare`` makes the pickle declare another element count for a weight's
    storage than the file holds."""
    import pickle

    import torch

    storages = {
        key: _Storage(str(index), (declare or {}).get(key, array.size), array.tobytes())
        for index, (key, array) in enumerate(arrays.items())
    }

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel, None)
            return None

    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, handle, protocol=2)
    Pickler(handle, protocol=2).dump(
        {key: _Tensor(storages[key], arrays[key].shape) for key in arrays}
    )
    pickle.dump([storage.key for storage in storages.values()], handle, protocol=2)
    for key, storage in storages.items():
        handle.write(struct.pack("<q", arrays[key].size))
        handle.write(storage.data)
