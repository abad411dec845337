"""Property-based fuzzing of the file readers: any bytes end in weights or in our own error.

Hypothesis generates safetensors headers, torch zip archives with damaged members, ``.pt2``
weights configs, ``MLmodel`` YAML, pickled structures and legacy (pre-1.6) ``torch.save`` files
(at least 500 inputs per reader), and each is read in-process by
:func:`~cluster_tracking.audit.sources.load_file`. Each must end in a
:class:`~cluster_tracking.audit.sources.LoadedModel` or a
:class:`~cluster_tracking.errors.ClusterTrackingError` (what the CLI maps to exit 3 or 4), never
another exception, and within a memory ceiling: the process's address space is limited
(``RLIMIT_AS``) while the readers run, so an allocation a file talked them into fails the test.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _hostile import mlp_arrays, pt2_archive, safetensors_bytes, write_legacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_tracking.audit.sources import LoadedModel, load_file
from cluster_tracking.errors import ClusterTrackingError, GraphError, LimitError, SourceError

EXAMPLES = 500
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
#: Address space the readers may add to what the process already maps.
HEADROOM = 2 * 2**30


@pytest.fixture(scope="module", autouse=True)
def memory_ceiling() -> Iterator[None]:
    """Limit this process's address space to what it maps now plus :data:`HEADROOM`."""
    with open("/proc/self/status", encoding="ascii") as handle:
        mapped = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    ceiling = mapped + HEADROOM
    if hard != resource.RLIM_INFINITY:
        ceiling = min(ceiling, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


COUNTS: dict[str, dict[str, int]] = {}


def read(path: Path, reader: str) -> None:
    """Read ``path``; anything but weights or our own error fails the test."""
    tally = COUNTS.setdefault(reader, {"examples": 0, "weights": 0, "refused": 0})
    tally["examples"] += 1
    try:
        loaded = load_file(path)
    except ClusterTrackingError as error:
        assert isinstance(error, (SourceError, GraphError, LimitError)), type(error)
        assert str(error).strip(), "an error without a message"
        tally["refused"] += 1
        return
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.weights, dict) and loaded.weights
    assert all(isinstance(value, torch.Tensor) for value in loaded.weights.values())
    tally["weights"] += 1


ARRAYS = mlp_arrays()
SMALL_INTS = st.integers(min_value=-3, max_value=40)
ANY_INTS = st.one_of(SMALL_INTS, st.integers(min_value=-(2**70), max_value=2**70))
JSON = st.recursive(
    st.none() | st.booleans() | ANY_INTS | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


# ------------------------------------------------------------------------------- safetensors


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["entry", "raw-header", "length", "truncate", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "raw-header":
        text = draw(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
        tail = draw(st.binary(max_size=600))
        return struct.pack("<Q", len(text)) + text + tail
    if kind == "length":
        return safetensors_bytes(ARRAYS, length_delta=draw(st.integers(-50, 2**40)))
    if kind == "truncate":
        return safetensors_bytes(ARRAYS, truncate=draw(st.integers(0, 700)))
    key = draw(st.sampled_from([*ARRAYS, "2.weight.extra", "__metadata__"]))
    entry = draw(
        st.one_of(
            JSON,
            st.fixed_dictionaries(
                {
                    "dtype": st.sampled_from(["F32", "F64", "I8", "BOOL", "F16", "U8", "X", 7]),
                    "shape": st.one_of(st.lists(ANY_INTS, max_size=4), JSON),
                    "data_offsets": st.one_of(st.lists(ANY_INTS, max_size=3), JSON),
                }
            ),
        )
    )
    return safetensors_bytes(ARRAYS, header_patch={key: entry})


@FUZZ
@given(blob=safetensors_files())
def test_any_safetensors_file_ends_in_weights_or_our_error(scratch: Path, blob: bytes) -> None:
    path = scratch / "fuzz.safetensors"
    path.write_bytes(blob)
    read(path, "safetensors")


# ---------------------------------------------------------------------------- torch zip files


def _saved(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


GOOD_ZIP = _saved({key: torch.from_numpy(array) for key, array in ARRAYS.items()})
with zipfile.ZipFile(io.BytesIO(GOOD_ZIP)) as _archive:
    GOOD_MEMBERS = {info.filename: _archive.read(info) for info in _archive.infolist()}


@st.composite
def torch_zips(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["member", "drop", "compress", "truncate", "flip"]))
    if kind == "truncate":
        return GOOD_ZIP[: draw(st.integers(0, len(GOOD_ZIP)))]
    if kind == "flip":
        blob = bytearray(GOOD_ZIP)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(blob) - 1))
            blob[at] = draw(st.integers(0, 255))
        return bytes(blob)
    members = dict(GOOD_MEMBERS)
    name = draw(st.sampled_from(sorted(members)))
    if kind == "drop":
        del members[name]
    elif kind == "member":
        members[name] = draw(
            st.one_of(
                st.binary(max_size=400),
                st.just(pickle.dumps(draw(JSON), protocol=2)),
                st.just(members[name][: draw(st.integers(0, len(members[name])))]),
            )
        )
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if kind == "compress" else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for member, raw in members.items():
            archive.writestr(member, raw)
    return buffer.getvalue()


@FUZZ
@given(blob=torch_zips())
def test_any_torch_zip_ends_in_weights_or_our_error(scratch: Path, blob: bytes) -> None:
    path = scratch / "fuzz.pt"
    path.write_bytes(blob)
    read(path, "torch zip")


# ------------------------------------------------------------------------------ .pt2 configs


@st.composite
def pt2_configs(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["meta", "config", "record"]))
    key = draw(st.sampled_from(sorted(ARRAYS)))
    if kind == "config":
        return {"config_text": draw(st.one_of(JSON.map(json.dumps), st.text(max_size=60)))}
    if kind == "record":
        return {"record_patch": {key: draw(st.binary(max_size=700))}}
    dims = st.lists(ANY_INTS.map(lambda n: {"as_int": n}), max_size=4)
    meta = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "dtype": st.one_of(st.integers(-2, 20), JSON),
                "sizes": st.one_of(dims, JSON),
                "strides": st.one_of(dims, JSON),
                "storage_offset": st.one_of(ANY_INTS.map(lambda n: {"as_int": n}), JSON),
            },
        )
    )
    return {"meta_patch": {key: meta}}


@FUZZ
@given(change=pt2_configs())
def test_any_pt2_config_ends_in_weights_or_our_error(scratch: Path, change: dict[str, Any]) -> None:
    path = pt2_archive(scratch / "fuzz.pt2", ARRAYS, **change)
    read(path, ".pt2 config")


# ---------------------------------------------------------------------------------- MLmodel


@pytest.fixture(scope="module")
def model_folder(scratch: Path) -> Path:
    folder = scratch / "model"
    (folder / "data").mkdir(parents=True)
    torch.save(
        {key: torch.from_numpy(a) for key, a in ARRAYS.items()}, folder / "data" / "model.pth"
    )
    (scratch / "outside.pth").write_bytes((folder / "data" / "model.pth").read_bytes())
    return folder


PATHS = st.one_of(
    st.sampled_from(
        ["data", "data/", "./data", "/etc", "../outside.pth", "..", "/", "data/../..", ""]
    ),
    st.text(max_size=12),
)


@st.composite
def mlmodel_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["flavor", "yaml", "text"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "yaml":
        return json.dumps(draw(JSON))  # JSON is YAML
    flavor = draw(
        st.fixed_dictionaries(
            {"model_data": st.one_of(PATHS, JSON)},
            optional={"code": st.one_of(PATHS, JSON), "pytorch_version": st.text(max_size=5)},
        )
    )
    flavors = {draw(st.sampled_from(["pytorch", "python_function", "sklearn"])): flavor}
    if draw(st.booleans()):
        flavors["pytorch"] = flavor
    return json.dumps({"flavors": flavors})


@FUZZ
@given(text=mlmodel_texts())
def test_any_mlmodel_ends_in_weights_or_our_error(model_folder: Path, text: str) -> None:
    (model_folder / "MLmodel").write_text(text, encoding="utf-8")
    read(model_folder, "MLmodel")
    assert os.path.exists(model_folder / "data" / "model.pth")


# --------------------------------------------------------------------------- pickled structures

TENSORS = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    st.lists(st.integers(0, 5), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.int8, torch.bool, torch.float16]),
    st.sampled_from([0.0, 1.0, -2.5, float("nan")]),
)
KEYS = st.sampled_from(["0.weight", "0.bias", "2.weight", "state_dict", "model", "fc.weight", "x"])
STRUCTURES = st.recursive(
    st.none() | st.integers() | st.text(max_size=5) | TENSORS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(KEYS, inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def pickles(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["structure", "structure", "opcodes"]))
    if kind == "opcodes":
        body = draw(st.binary(max_size=200))
        return b"\x80\x02" + body + draw(st.sampled_from([b".", b""]))
    return _saved(draw(STRUCTURES))


@FUZZ
@given(blob=pickles())
def test_any_pickled_structure_ends_in_weights_or_our_error(scratch: Path, blob: bytes) -> None:
    path = scratch / "fuzz.pth"
    path.write_bytes(blob)
    read(path, "pickle")


# --------------------------------------------------------- legacy (pre-1.6) torch.save files


@st.composite
def legacy_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["declare", "truncate", "flip", "structure"]))
    if kind == "structure":
        buffer = io.BytesIO()
        torch.save(draw(STRUCTURES), buffer, _use_new_zipfile_serialization=False)
        return buffer.getvalue()
    buffer = io.BytesIO()
    declare = {}
    if kind == "declare":
        key = draw(st.sampled_from(sorted(ARRAYS)))
        declare[key] = draw(st.one_of(SMALL_INTS, st.integers(0, 2**62)))
    write_legacy(buffer, ARRAYS, declare=declare)
    blob = buffer.getvalue()
    if kind == "truncate":
        return blob[: draw(st.integers(0, len(blob)))]
    if kind == "flip":
        flipped = bytearray(blob)
        for _ in range(draw(st.integers(1, 8))):
            flipped[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        return bytes(flipped)
    return blob


@FUZZ
@given(blob=legacy_files())
def test_any_legacy_torch_file_ends_in_weights_or_our_error(scratch: Path, blob: bytes) -> None:
    path = scratch / "fuzz-legacy.pt"
    path.write_bytes(blob)
    read(path, "legacy torch file")


def test_every_reader_was_fuzzed_with_500_inputs_and_some_gave_weights() -> None:
    """Run last (file order): each reader saw its examples, and valid ones still load."""
    if len(COUNTS) < 6:
        pytest.skip("run with the fuzz tests above")
    for reader, tally in COUNTS.items():
        assert tally["examples"] >= EXAMPLES, (reader, tally)
        assert tally["refused"] > 0, (reader, tally)
        assert tally["weights"] > 0, (reader, tally)
