"""Hostile and careless input to the real CLI: one clear line, the documented exit code, bounded.

Every input of :data:`CASES` (corrupt, truncated and oversized files, devices, FIFOs, sockets and
symlinks to them, malicious pickles and archives, metadata paths leading out of the source, bad
options, unreachable and silent servers, signals) is run through the installed
``cluster-tracking`` in its own subprocess, in a session of its own, under a memory ceiling
(``RLIMIT_AS``), with its own working folder, ``HOME`` and ``TMPDIR``. Each must:

* exit with its documented code;
* print exactly one line on stderr naming the problem (a note, for the inputs that succeed), and
  never a traceback;
* write nothing outside its working folder (the inputs are unchanged; its ``TMPDIR`` is empty
  again), and leave no process of its session behind;
* stay under the memory ceiling: a blow-up is killed by it and fails the test, not the machine.

A hang fails through the subprocess timeout, never through a timing assert.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _hostile import (
    legacy_torch_file,
    lie_about_size,
    mlp_arrays,
    pt2_archive,
    safetensors_bytes,
    zip_with_a_deflated_member,
)
from _servers import free_port
from torch import nn

from cluster_tracking.errors import EXIT_CODES

#: Address space each CLI process may map: a reader that trusts a declared size dies here.
MEMORY_CEILING = 3 * 2**30
#: Seconds a case may run: far above the few seconds each takes, so only a hang reaches it.
HANG_TIMEOUT = 120
FAST = ["--k", "3", "--shuffles", "4", "--jobs", "1"]


@dataclass(frozen=True)
class Case:
    """One input: the command line (``{in}`` is the inputs folder, ``{closed}`` a port nothing
    listens on, ``{silent}`` one that accepts and never answers), its exit code, and a phrase
    its one stderr line must hold."""

    arguments: tuple[str, ...]
    code: int
    says: str
    env: dict[str, str] = field(default_factory=dict)
    signal: int | None = None


def case(*arguments: str, code: int, says: str, **options: Any) -> Case:
    return Case(tuple(arguments), code, says, **options)


def audit(source: str, *options: str, code: int, says: str, **extra: Any) -> Case:
    return case("audit", source, *FAST, *options, code=code, says=says, **extra)


WANDB = {"WANDB_API_KEY": "x" * 40}

CASES: dict[str, Case] = {
    # ---- files that are not regular files (exit 3, refused before they are opened)
    "missing file": audit("{in}/missing.pt", code=3, says="no such file"),
    "fifo without a writer": audit("{in}/fifo.pt", code=3, says="FIFO"),
    "/dev/zero": audit("/dev/zero", code=3, says="character device"),
    "/dev/urandom": audit("/dev/urandom", code=3, says="character device"),
    "/dev/null": audit("/dev/null", code=3, says="character device"),
    ".pt symlink to /dev/zero": audit("{in}/zero.pt", code=3, says="through a symlink"),
    ".pt symlink to /dev/urandom": audit("{in}/random.pt", code=3, says="character device"),
    ".safetensors symlink to a fifo": audit("{in}/fifo.safetensors", code=3, says="FIFO"),
    "unix socket": audit("{in}/socket.pt", code=3, says="socket"),
    "dangling symlink": audit("{in}/dangling.pt", code=3, says="symlink to nothing"),
    "symlink loop": audit("{in}/loop.pt", code=3, says="cannot read"),
    # ---- corrupt and truncated files (exit 3)
    "empty file": audit("{in}/empty.pt", code=3, says="empty"),
    "random bytes": audit("{in}/random-bytes.pt", code=3, says="random-bytes.pt"),
    "text file": audit("{in}/notes.pt", code=3, says="notes.pt"),
    "unknown extension, random bytes": audit("{in}/blob.xyz", code=3, says="not a weight file"),
    "truncated torch zip": audit("{in}/truncated.pt", code=3, says="truncated.pt"),
    "zip of junk": audit("{in}/junk-zip.pt", code=3, says="junk-zip.pt"),
    "zip with a path-traversal member": audit("{in}/traversal.pt", code=3, says="traversal.pt"),
    "deflated member lying about its size": audit(
        "{in}/lying-zip.pt", code=3, says="damaged zip"
    ),
    "torch zip declaring 3.9 GiB": audit("{in}/declares-huge.pt", code=3, says="memory limit"),
    "deflated zip over --max-memory": audit(
        "{in}/bomb.pt", "--max-memory", "32MiB", code=3, says="memory limit of 32.0 MiB"
    ),
    "deflated zip of zeros within the limit": audit(
        "{in}/bomb.pt", code=4, says="every weight is zero"
    ),
    "state_dict over --max-memory": audit(
        "{in}/big.pt", "--max-memory", "16MiB", code=3, says="--max-memory"
    ),
    "a dict nested in itself": audit("{in}/self-nested.pt", code=3, says="nested too deep"),
    "legacy torch file declaring a 372 GiB storage": audit(
        "{in}/legacy-huge.pt", code=3, says="declares 100000000000 elements"
    ),
    "legacy torch file, storage count rewritten": audit(
        "{in}/legacy-count.pt", code=3, says="its record in the file says"
    ),
    "legacy torch file truncated": audit("{in}/legacy-cut.pt", code=3, says="truncated"),
    "legacy torch file over --max-memory": audit(
        "{in}/legacy-big.pt", "--max-memory", "16MiB", code=3, says="memory limit of 16.0 MiB"
    ),
    "a list, not weights": audit("{in}/a-list.pt", code=3, says="holds a list"),
    # ---- safetensors (exit 3)
    "safetensors header longer than the file": audit(
        "{in}/long-header.safetensors", code=3, says="header declares"
    ),
    "safetensors header not JSON": audit("{in}/bad-json.safetensors", code=3, says="not JSON"),
    "safetensors header a JSON list": audit(
        "{in}/list-header.safetensors", code=3, says="not a JSON object"
    ),
    "safetensors offsets past the data": audit(
        "{in}/offsets.safetensors", code=3, says="outside the"
    ),
    "safetensors shape larger than its record": audit(
        "{in}/shape.safetensors", code=3, says="declares shape"
    ),
    "safetensors truncated": audit("{in}/cut.safetensors", code=3, says="truncated"),
    "safetensors unknown dtype": audit("{in}/dtype.safetensors", code=3, says="unknown dtype"),
    # ---- torch.export archives (exit 3)
    ".pt2 record shorter than its shape": audit("{in}/short.pt2", code=3, says="shorter than"),
    ".pt2 declaring a 640 GB tensor": audit("{in}/huge.pt2", code=3, says="shorter than"),
    ".pt2 record inflating past --max-memory": audit(
        "{in}/inflating.pt2", "--max-memory", "32MiB", code=3, says="memory limit"
    ),
    ".pt2 record declaring 3.9 GiB": audit("{in}/declares-huge.pt2", code=3, says="memory limit"),
    "1.5 MiB .pt2 inflating to 1.5 GiB, default limit": audit(
        "{in}/inflating-1.5G.pt2", code=3, says="memory limit"
    ),
    ".pt2 inflating to 768 MiB, read in one copy": audit(
        "{in}/inflating-768M.pt2", "--max-memory", "1GiB", code=4, says="every weight is zero"
    ),
    ".pt2 negative stride": audit("{in}/stride.pt2", code=3, says="impossible layout"),
    ".pt2 config not JSON": audit("{in}/config.pt2", code=3, says="cannot read"),
    ".pt2 config a list": audit("{in}/config-list.pt2", code=3, says="no 'config'"),
    ".pt2 unknown dtype code": audit("{in}/dtype.pt2", code=3, says="dtype code"),
    # ---- pickles: nothing runs without --trust-pickle (exit 3)
    "pickle calling os.system": audit("{in}/system.pt", code=3, says="--trust-pickle"),
    "pickle calling eval": audit("{in}/eval.pt", code=3, says="--trust-pickle"),
    "pickle calling subprocess": audit("{in}/subprocess.pt", code=3, says="--trust-pickle"),
    "TorchScript archive": audit("{in}/script.pt", code=3, says="TorchScript"),
    # ---- weights that cannot be measured (exit 4)
    "all-zero weights": audit("{in}/zeros.pt", code=4, says="every weight is zero"),
    "a layer of shape [0, 8]": audit("{in}/empty-layer.pt", code=4, says="[0, 8]"),
    "bool weights (a mask)": audit("{in}/mask.pt", code=4, says="bool"),
    "bool weights in safetensors": audit("{in}/mask.safetensors", code=4, says="bool"),
    "int8 weights (quantized, no scales)": audit("{in}/int8.pt", code=4, says="integer"),
    "int8 weights in a .pt2": audit("{in}/int8.pt2", code=4, says="integer"),
    "NaN weights": audit("{in}/nan.pt", code=4, says="NaN"),
    # ---- MLflow model folders (exit 3)
    "MLmodel a YAML list": audit("{in}/mlmodel-list", code=3, says="not an MLflow model file"),
    "MLmodel model_data absolute": audit("{in}/mlmodel-absolute", code=3, says="outside"),
    "MLmodel model_data ../": audit("{in}/mlmodel-parent", code=3, says="outside"),
    "MLmodel data symlinked out": audit("{in}/mlmodel-symlink", code=3, says="outside"),
    "MLmodel binary garbage": audit("{in}/mlmodel-binary", code=3, says="MLmodel"),
    "MLmodel without pytorch": audit("{in}/mlmodel-sklearn", code=3, says="not a PyTorch"),
    # ---- folders (exit 3)
    "folder of 2100 files": audit("{in}/crowded", code=3, says="more than 2000 entries"),
    "weight file too deep": audit("{in}/deep", code=3, says="holds no model"),
    "folder of two weight files": audit("{in}/two", code=3, says="several weight files"),
    "folder with a symlink to /dev/zero": audit("{in}/devices", code=3, says="holds no model"),
    "/usr": audit("/usr", code=3, says="more than 2000 entries"),
    # ---- options (exit 2), checked before any work
    "--shuffles 10^9": audit("{in}/good.pt", "--shuffles", "1000000000", code=2, says="limit"),
    "--shuffles -1": audit("{in}/good.pt", "--shuffles", "-1", code=2, says="--shuffles -1"),
    "--jobs 0": audit("{in}/good.pt", "--jobs", "0", code=2, says="--jobs 0"),
    "--jobs -7": audit("{in}/good.pt", "--jobs", "-7", code=2, says="--jobs -7"),
    "--k 0": audit("{in}/good.pt", "--k", "0", code=2, says="at least 2"),
    "--k twelve": audit("{in}/good.pt", "--k", "twelve", code=2, says="--k"),
    "--max-memory lots": audit("{in}/good.pt", "--max-memory", "lots", code=2, says="not a size"),
    "--max-memory 1KiB": audit("{in}/good.pt", "--max-memory", "1KiB", code=2, says="below"),
    "run estimated above --max-memory": audit(
        "{in}/wide.pt", "--max-memory", "40MiB", code=2, says="would need about"
    ),
    "--shuffles 10000 on a 2-million-edge model (hours)": audit(
        "{in}/wide-1000.pt", "--preset", "filan2021", "--shuffles", "10000", code=2,
        says="--allow-long-run",
    ),
    "2 KB file declaring a 30000 x 30000 weight": audit(
        "{in}/expanded.pt", code=2, says="would need about"
    ),
    "unknown option": audit("{in}/good.pt", "--bogus", code=2, says="No such option"),
    "option without its value": case("audit", "{in}/good.pt", "--k", code=2, says="--k"),
    "missing source": case("audit", code=2, says="Missing argument"),
    "--shuffles many": audit("{in}/good.pt", "--shuffles", "many", code=2, says="--shuffles"),
    "--backend spark": audit("{in}/good.pt", "--backend", "spark", code=2, says="--backend"),
    "--scheduler without dask": audit(
        "{in}/good.pt", "--scheduler", "tcp://127.0.0.1:1", code=2, says="--backend dask"
    ),
    "--scheduler not an address": audit(
        "{in}/good.pt", "--backend", "dask", "--scheduler", "nowhere", code=2, says="tcp://"
    ),
    "compare --plot rank.xyz": case(
        "compare", "{in}/good.pt", *FAST, "--plot", "rank.xyz", code=2, says=".png"
    ),
    "compare --csv rank.txt": case(
        "compare", "{in}/good.pt", *FAST, "--csv", "rank.txt", code=2, says=".csv"
    ),
    "demo --epochs 0": case("demo", "--epochs", "0", code=2, says="--epochs"),
    "demo --shuffles 10^9": case("demo", "--shuffles", "1000000000", code=2, says="--shuffles"),
    "--log-to-run on a file": audit("{in}/good.pt", "--log-to-run", code=2, says="--log-to-run"),
    "unknown source scheme": audit("nonsense://x/y", code=3, says="unknown source scheme"),
    # ---- servers: every network step fails within seconds (exit 5; 2 for a malformed URI)
    "dask scheduler: closed port": audit(
        "{in}/good.pt", "--backend", "dask", "--scheduler", "tcp://127.0.0.1:{closed}",
        code=5, says="Dask scheduler",
    ),
    "dask scheduler: silent port": audit(
        "{in}/good.pt", "--backend", "dask", "--scheduler", "tcp://127.0.0.1:{silent}",
        code=5, says="did not answer",
    ),
    "mlflow: closed port": audit(
        "runs:/0a1b2c/model", "--tracking-uri", "http://127.0.0.1:{closed}", code=5,
        says="cannot reach",
    ),
    "mlflow: silent port": audit(
        "runs:/0a1b2c/model", "--tracking-uri", "http://127.0.0.1:{silent}", code=5,
        says="cannot reach",
    ),
    "mlflow: nonsense:// URI": audit(
        "runs:/0a1b2c/model", "--tracking-uri", "nonsense://x", code=2, says="unknown scheme"
    ),
    "mlflow: file store": audit(
        "runs:/0a1b2c/model", "--tracking-uri", "file:{in}/mlruns", code=5,
        says="MLFLOW_ALLOW_FILE_STORE=true",
    ),
    "demo: closed tracking server": case(
        "demo", "--tracking-uri", "http://127.0.0.1:{closed}", code=5, says="cannot reach"
    ),
    "demo: silent tracking server": case(
        "demo", "--tracking-uri", "http://127.0.0.1:{silent}", code=5, says="cannot reach"
    ),
    "demo: nonsense:// URI": case(
        "demo", "--tracking-uri", "nonsense://x", code=2, says="unknown scheme"
    ),
    "demo: file store": case(
        "demo", "--tracking-uri", "file:./mlruns", code=5, says="migrate-filestore"
    ),
    "wandb: closed server": audit(
        "wandb-artifact://team/project/model:v0", code=5, says="cannot reach W&B",
        env={**WANDB, "WANDB_BASE_URL": "http://127.0.0.1:{closed}"},
    ),
    "wandb: silent server": audit(
        "wandb-artifact://team/project/model:v0", code=5, says="does not answer",
        env={**WANDB, "WANDB_BASE_URL": "http://127.0.0.1:{silent}"},
    ),
    # ---- inputs that are measured, with a note at most
    "a DAG of shared lists beside the weights": audit("{in}/dag.pt", code=0, says=""),
    "legacy (pre-1.6) torch file": audit("{in}/legacy.pt", code=0, says=""),
    "--jobs 40 on this machine": audit(
        "{in}/good.pt", "--jobs", "40", code=0, says="CPUs this process may use"
    ),
    # ---- signals during a measurement: workers stopped, one line
    "SIGINT": case(
        "audit", "{in}/good.pt", "--k", "3", "--shuffles", "10000", "--jobs", "2",
        code=130, says="interrupted", signal=signal.SIGINT,
    ),
    "SIGTERM": case(
        "audit", "{in}/good.pt", "--k", "3", "--shuffles", "10000", "--jobs", "2",
        code=143, says="terminated", signal=signal.SIGTERM,
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------- the inputs


def _linear_state(widths: tuple[int, ...] = (8, 16, 4), seed: int = 0) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(array) for key, array in mlp_arrays(widths, seed).items()}


class _Payload:
    def __init__(self, function: Callable[..., Any], *arguments: Any) -> None:
        self.call = (function, arguments)

    def __reduce__(self) -> tuple[Any, ...]:
        return self.call


def _dag(width: int = 10, depth: int = 18) -> list[Any]:
    """Lists shared ``width`` times per level: 2 KB pickled, ``width ** depth`` paths."""
    node: list[Any] = [1.0]
    for _ in range(depth):
        node = [node] * width
    return node


def _mlmodel(folder: Path, text: str, weights: bool = True) -> Path:
    folder.mkdir()
    (folder / "MLmodel").write_text(text)
    if weights:
        (folder / "data").mkdir()
        torch.save(_linear_state(), folder / "data" / "model.pth")
    return folder


def make_inputs(folder: Path, outside: Path) -> None:
    """Write every input of :data:`CASES` into ``folder`` (``outside``: a model that the
    metadata cases point at, outside the source folder)."""
    good = _linear_state()
    torch.save(good, folder / "good.pt")
    os.mkfifo(folder / "fifo.pt")
    os.symlink("/dev/zero", folder / "zero.pt")
    os.symlink("/dev/urandom", folder / "random.pt")
    os.symlink(folder / "fifo.pt", folder / "fifo.safetensors")
    os.symlink(folder / "nowhere.pt", folder / "dangling.pt")
    os.symlink(folder / "loop.pt", folder / "loop.pt")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(folder / "socket.pt"))
    listener.close()
    (folder / "empty.pt").write_bytes(b"")
    (folder / "random-bytes.pt").write_bytes(np.random.default_rng(1).bytes(1024))
    (folder / "notes.pt").write_text("these are not weights\n")
    (folder / "blob.xyz").write_bytes(np.random.default_rng(2).bytes(512))
    saved = (folder / "good.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(saved[: len(saved) // 2])
    (folder / "junk-zip.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with (
        zipfile.ZipFile(folder / "good.pt") as source,
        zipfile.ZipFile(folder / "traversal.pt", "w") as target,
    ):
        for info in source.infolist():
            target.writestr("../../" + info.filename, source.read(info))
    # A torch zip whose data record is deflated and declares fewer bytes than it inflates to.
    with zipfile.ZipFile(folder / "good.pt") as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    record = next(name for name in members if name.endswith("/data/0"))
    with zipfile.ZipFile(folder / "lying-zip.pt", "w") as target:
        for name, raw in members.items():
            method = zipfile.ZIP_DEFLATED if name == record else zipfile.ZIP_STORED
            target.writestr(name, raw, compress_type=method)
    lie_about_size(folder / "lying-zip.pt", record, 16)
    shutil.copy(folder / "good.pt", folder / "declares-huge.pt")
    lie_about_size(folder / "declares-huge.pt", record, 0xF0000000)
    # 64 MiB of zero weights, deflated to about 64 KiB.
    buffer = io.BytesIO()
    torch.save({"0.weight": torch.zeros(4096, 4096)}, buffer)
    with (
        zipfile.ZipFile(buffer) as source,
        zipfile.ZipFile(folder / "bomb.pt", "w", compression=zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    torch.save({"0.weight": torch.randn(2048, 2048) + 1.0}, folder / "big.pt")  # 16 MiB
    nested: dict[str, Any] = {}
    nested["state_dict"] = nested
    torch.save(nested, folder / "self-nested.pt")
    torch.save([1, 2, 3], folder / "a-list.pt")
    # torch.save's legacy (pre-1.6) format, written field by field
    legacy_torch_file(folder / "legacy.pt", mlp_arrays())
    legacy_torch_file(folder / "legacy-huge.pt", mlp_arrays(), declare={"0.weight": 10**11})
    legacy_torch_file(folder / "legacy-count.pt", mlp_arrays(), declare={"0.weight": 100})
    raw = (folder / "legacy.pt").read_bytes()
    (folder / "legacy-cut.pt").write_bytes(raw[:-100])
    big = {"0.weight": np.random.default_rng(3).random((2048, 2048), dtype=np.float32) + 1}
    legacy_torch_file(folder / "legacy-big.pt", big)  # 16 MiB
    # One stored element, viewed as 900 million (stride 0): tiny on disk, huge as a graph.
    torch.save({"0.weight": torch.ones(1, 1).expand(30000, 30000)}, folder / "expanded.pt")
    torch.save({"state_dict": good, "history": _dag()}, folder / "dag.pt")
    torch.save(
        {"0.weight": torch.rand(600, 600) + 0.1, "2.weight": torch.rand(8, 600)}, folder / "wide.pt"
    )
    generator = torch.Generator().manual_seed(4)
    torch.save(
        {f"{i}.weight": torch.randn(1000, 1000, generator=generator) for i in (0, 2)},
        folder / "wide-1000.pt",
    )
    # safetensors
    arrays = mlp_arrays()
    (folder / "long-header.safetensors").write_bytes(safetensors_bytes(arrays, length_delta=10**6))
    (folder / "bad-json.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(16)
    )
    (folder / "list-header.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    first = next(iter(arrays))
    entry = {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, 10**9]}
    (folder / "offsets.safetensors").write_bytes(
        safetensors_bytes(arrays, header_patch={first: entry})
    )
    entry = {"dtype": "F32", "shape": [16000, 8000], "data_offsets": [0, 512]}
    (folder / "shape.safetensors").write_bytes(
        safetensors_bytes(arrays, header_patch={first: entry})
    )
    (folder / "cut.safetensors").write_bytes(safetensors_bytes(arrays, truncate=100))
    entry = {"dtype": "X99", "shape": [16, 8], "data_offsets": [0, 512]}
    (folder / "dtype.safetensors").write_bytes(
        safetensors_bytes(arrays, header_patch={first: entry})
    )
    masks = {key: value > 0 for key, value in arrays.items()}
    (folder / "mask.safetensors").write_bytes(safetensors_bytes(masks))
    # torch.export archives
    pt2_archive(folder / "short.pt2", arrays, record_patch={first: b"\x00" * 100})
    pt2_archive(
        folder / "huge.pt2",
        arrays,
        meta_patch={
            first: {
                "sizes": [{"as_int": 400000}, {"as_int": 400000}],
                "strides": [{"as_int": 400000}, {"as_int": 1}],
            }
        },
    )
    inflating = {"0.weight": np.zeros((1, 1), np.float32)}
    zip_with_a_deflated_member(
        folder / "inflating.pt2",
        "archive/data/weights/weight_0",
        64 * 2**20,
        others={
            "archive/models/model.json": b"{}",
            "archive/data/weights/model_weights_config.json": json.dumps(
                {
                    "config": {
                        "0.weight": {
                            "path_name": "weight_0",
                            "use_pickle": False,
                            "tensor_meta": {
                                "dtype": 7,
                                "sizes": [{"as_int": 4096}, {"as_int": 4096}],
                                "strides": [{"as_int": 4096}, {"as_int": 1}],
                                "storage_offset": {"as_int": 0},
                            },
                        }
                    }
                }
            ).encode(),
        },
    )
    del inflating
    for name, rows in (("inflating-1.5G.pt2", 24576), ("inflating-768M.pt2", 12288)):
        # float32 [rows, 16384] of zeros, deflated about a thousandfold
        config = {
            "path_name": "weight_0",
            "use_pickle": False,
            "tensor_meta": {
                "dtype": 7,
                "sizes": [{"as_int": rows}, {"as_int": 16384}],
                "strides": [{"as_int": 16384}, {"as_int": 1}],
                "storage_offset": {"as_int": 0},
            },
        }
        zip_with_a_deflated_member(
            folder / name,
            "archive/data/weights/weight_0",
            rows * 16384 * 4,
            others={
                "archive/models/model.json": b"{}",
                "archive/data/weights/model_weights_config.json": json.dumps(
                    {"config": {"0.weight": config}}
                ).encode(),
            },
        )
    pt2_archive(folder / "declares-huge.pt2", arrays)
    lie_about_size(folder / "declares-huge.pt2", "archive/data/weights/weight_0", 0xF0000000)
    pt2_archive(
        folder / "stride.pt2",
        arrays,
        meta_patch={first: {"strides": [{"as_int": -8}, {"as_int": 1}]}},
    )
    pt2_archive(folder / "config.pt2", arrays, config_text="{not json")
    pt2_archive(folder / "config-list.pt2", arrays, config_text="[1, 2]")
    pt2_archive(folder / "dtype.pt2", arrays, meta_patch={first: {"dtype": 99}})
    pt2_archive(
        folder / "int8.pt2", {key: (value * 10).astype(np.int8) for key, value in arrays.items()}
    )
    # pickles
    marker = str(outside / "pwned")
    torch.save(_Payload(os.system, f"touch {marker}"), folder / "system.pt")
    torch.save(_Payload(eval, f"open({marker!r}, 'w').write('ran')"), folder / "eval.pt")
    torch.save(_Payload(subprocess.call, ["touch", marker]), folder / "subprocess.pt")
    torch.jit.save(torch.jit.script(nn.Linear(4, 3)), str(folder / "script.pt"))
    # weights that cannot be measured
    torch.save({key: torch.zeros_like(value) for key, value in good.items()}, folder / "zeros.pt")
    torch.save(
        {"0.weight": torch.zeros(0, 8), "2.weight": torch.randn(4, 0)}, folder / "empty-layer.pt"
    )
    torch.save({key: value > 0 for key, value in good.items()}, folder / "mask.pt")
    torch.save(
        {key: (value * 10).to(torch.int8) for key, value in good.items()}, folder / "int8.pt"
    )
    broken = dict(good)
    broken["2.weight"] = broken["2.weight"].clone()
    broken["2.weight"][0, 0] = float("nan")
    torch.save(broken, folder / "nan.pt")
    # MLflow model folders
    pytorch = "flavors:\n  pytorch:\n    model_data: {data}\n    pytorch_version: 2.0\n"
    _mlmodel(folder / "mlmodel-list", "- flavors\n- pytorch\n")
    _mlmodel(folder / "mlmodel-absolute", pytorch.format(data=outside), weights=False)
    _mlmodel(folder / "mlmodel-parent", pytorch.format(data="../../outside"), weights=False)
    _mlmodel(folder / "mlmodel-symlink", pytorch.format(data="data"), weights=False)
    os.symlink(outside, folder / "mlmodel-symlink" / "data")
    (folder / "mlmodel-binary").mkdir()
    (folder / "mlmodel-binary" / "MLmodel").write_bytes(b"\xff\xfe\x00\x01" * 64)
    _mlmodel(folder / "mlmodel-sklearn", "flavors:\n  sklearn:\n    pickled_model: m.pkl\n")
    # folders
    (folder / "crowded").mkdir()
    for index in range(2100):
        (folder / "crowded" / f"f{index:04d}.txt").touch()
    deep = folder / "deep" / "a" / "b" / "c" / "d" / "e" / "f"
    deep.mkdir(parents=True)
    torch.save(good, deep / "model.pt")
    (folder / "two").mkdir()
    torch.save(good, folder / "two" / "a.pt")
    torch.save(good, folder / "two" / "b.pt")
    (folder / "devices").mkdir()
    os.symlink("/dev/zero", folder / "devices" / "weights.pt")


# ------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A port of 127.0.0.1 that accepts connections and never says a word."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            held.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


# ------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    leftovers: list[str]  # processes of the case's session still alive after it exited
    tmp_left: list[str]  # files left in its TMPDIR
    work_left: list[str]  # files left in its working folder


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CEILING, MEMORY_CEILING))


def _session_members(session: int) -> list[str]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != b"Z":
            found.append(name)
    return found


def _has_workers(pid: int) -> bool:
    return any(member != str(pid) for member in _session_members(pid))


def _command() -> list[str]:
    script = Path(sys.executable).with_name("cluster-tracking")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cluster_tracking"]


def run_case(
    name: str, spec: Case, inputs: Path, work_root: Path, ports: dict[str, int]
) -> Outcome:
    work = work_root / name.replace("/", "_").replace(" ", "_")
    scratch = work / ".tmp"
    scratch.mkdir(parents=True)

    def fill(text: str) -> str:
        return (
            text.replace("{in}", str(inputs))
            .replace("{closed}", str(ports["closed"]))
            .replace("{silent}", str(ports["silent"]))
        )

    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "WANDB_", "PYTEST", "COV_"))
    }
    environment.update(
        HOME=str(work),
        TMPDIR=str(scratch),
        MPLCONFIGDIR=str(scratch / "mpl"),
        WANDB_DIR=str(scratch),
        WANDB_CONFIG_DIR=str(scratch),
        WANDB_CACHE_DIR=str(scratch),
        WANDB_DATA_DIR=str(scratch),
        COLUMNS="200",
        MLFLOW_DISABLE_TELEMETRY="true",  # nothing leaves 127.0.0.1, nothing lands in HOME
        DO_NOT_TRACK="true",
    )
    environment.update({key: fill(value) for key, value in spec.env.items()})
    process = subprocess.Popen(
        [*_command(), *(fill(argument) for argument in spec.arguments)],
        cwd=work,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_limit_memory,
    )
    try:
        if spec.signal is not None:
            # Signal it once the measurement runs: when its worker processes exist.
            for _ in range(HANG_TIMEOUT * 10):
                if _has_workers(process.pid) or process.poll() is not None:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            process.send_signal(spec.signal)
        stdout, stderr = process.communicate(timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return Outcome(-999, stdout, f"HUNG, killed after {HANG_TIMEOUT} s\n{stderr}", [], [], [])
    leftovers = _session_members(process.pid)
    for _ in range(100):  # workers told to stop may take a moment to be gone
        if not leftovers:
            break
        time.sleep(0.1)
        leftovers = _session_members(process.pid)
    for member in leftovers:
        try:
            os.kill(int(member), signal.SIGKILL)
        except OSError:
            pass
    tmp_left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file())
    tmp_left = [p for p in tmp_left if not p.startswith("mpl")]  # matplotlib's font cache
    work_left = sorted(
        str(p.relative_to(work)) for p in work.rglob("*") if ".tmp" not in p.relative_to(work).parts
    )
    return Outcome(process.returncode, stdout, stderr, leftovers, tmp_left, work_left)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for path in sorted(folder.rglob("*")):
        try:
            info = path.lstat()
        except OSError:
            continue
        found[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, silent_port: int) -> dict[str, Any]:
    """Every case of :data:`CASES`, run at once (three at a time)."""
    root = tmp_path_factory.mktemp("hostile")
    inputs, outside, work_root = root / "inputs", root / "outside", root / "work"
    for folder in (inputs, outside, work_root):
        folder.mkdir()
    torch.save(_linear_state(), outside / "model.pth")
    make_inputs(inputs, outside)
    before = (_snapshot(inputs), _snapshot(outside))
    ports = {"closed": free_port(), "silent": silent_port}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            name: pool.submit(run_case, name, spec, inputs, work_root, ports)
            for name, spec in CASES.items()
        }
        results = {name: future.result() for name, future in futures.items()}
    after = (_snapshot(inputs), _snapshot(outside))
    return {"results": results, "unchanged": before == after, "outside": outside}


def test_the_table_holds_more_than_sixty_inputs_with_documented_codes() -> None:
    assert len(CASES) >= 60
    assert {spec.code for spec in CASES.values()} <= set(EXIT_CODES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_input_gets_one_line_and_its_exit_code(
    outcomes: dict[str, Any], name: str
) -> None:
    spec, outcome = CASES[name], outcomes["results"][name]
    assert outcome.returncode == spec.code, (outcome.returncode, outcome.stderr[-3000:])
    assert "Traceback" not in outcome.stderr, outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if spec.code == 0:
        assert len(lines) <= 1 and all(spec.says in line for line in lines), lines
        assert not any(line.startswith("error:") for line in lines), lines
    else:
        assert len(lines) == 1, outcome.stderr
        assert lines[0].startswith("error: ") and spec.says in lines[0], lines[0]
        assert outcome.stdout.strip() == "" or spec.arguments[0] == "demo", outcome.stdout
    assert outcome.leftovers == [], f"processes left behind: {outcome.leftovers}"
    assert outcome.tmp_left == [], f"left in TMPDIR: {outcome.tmp_left}"
    assert outcome.work_left == [], f"written into the working folder: {outcome.work_left}"


@pytest.mark.slow
def test_no_input_changed_a_file_or_ran_a_payload(outcomes: dict[str, Any]) -> None:
    assert outcomes["unchanged"], "an input file or the folder outside the source was changed"
    assert not (outcomes["outside"] / "pwned").exists(), "a pickle payload ran"
