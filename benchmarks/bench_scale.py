"""Scale: Llama-style models of 0.1B to 1B (3B) parameters audited in bounded memory.

    python -m benchmarks.bench_scale                       # 0.1B, 0.3B, 1B; in-memory check at 0.1B
    python -m benchmarks.bench_scale --sizes 0.1B,0.3B,1B,3B --compare 0.1B
    python -m benchmarks.bench_scale --sizes 0.1B,1B --compare "" --dask 0.1B,1B
    python -m benchmarks.bench_scale --graph residual --sizes 0.1B,0.3B,1B --compare 0.1B

Each model is a Llama-style decoder (embeddings, attention with grouped KV heads, gated MLP,
RMSNorm weights) with random bf16 weights, written to a safetensors file on the fly, one tensor
at a time (no downloads, no whole model in memory). Its MLP graph, the chain of every block's
``up_proj`` then ``down_proj`` (the issue's measurement), is then audited with ``shuffles=0`` by
:func:`cluster_tracking.graph.lazy.safetensors_graph` and :func:`cluster_tracking.measure` in a
fresh process, which prints the time to read the graph and to partition it, its peak resident
memory (``ru_maxrss``, which also counts the file's pages while they are mapped) and the bytes
per edge above the process's memory before reading (torch, which the chain builder imports,
included in that base). With ``--compare`` the in-memory path
(``weight_graph`` on the loaded state_dict, float64 and a sparse adjacency) measures the same
graph in another fresh process, and the two n-cuts are compared (target: equal to 1e-6
relative). With ``--dask`` the same graph is measured with its weight blocks kept on a local
``dask.distributed`` cluster of 2 worker processes (``safetensors_graph(..., scheduler=...)``:
each worker maps its half of the layers from the file's path), printing the time, this
process's peak and each worker's, and whether labels and n-cut equal the bounded local path's.
On one machine this shows what travels and what each side holds, not a speed-up: the two
workers share the machine's cores and memory. With ``--graph residual`` each model is written as
a Hugging Face folder instead (``config.json`` for ``LlamaForCausalLM``; RMSNorm weights drawn in
[0.5, 1.5] so that folding them matters) and its whole graph (the residual stream, attention and
gated MLPs of every block) is read by
:func:`cluster_tracking.graph.model_folder.model_folder_graph`; ``--compare`` then loads the
folder with transformers and traces the model in memory. The files are deleted afterwards.

Wall-clock numbers are for people to read; no test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Llama-style configurations: hidden size, MLP size, blocks, attention heads, KV heads, vocab.
CONFIGS: dict[str, dict[str, int]] = {
    # BERT-base-sized MLPs (the issue's 57M edges)
    "0.1B": {"hidden": 768, "intermediate": 3072, "layers": 12, "heads": 12, "kv": 12},
    # GPT-2-medium-sized MLPs (201M edges)
    "0.3B": {"hidden": 1024, "intermediate": 4096, "layers": 24, "heads": 16, "kv": 16},
    # Llama 3.2 1B's shapes (537M edges)
    "1B": {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv": 8},
    # Llama 3.2 3B's shapes (1.4G edges)
    "3B": {"hidden": 3072, "intermediate": 8192, "layers": 28, "heads": 24, "kv": 8},
}
VOCAB = 32_000


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensor_shapes(config: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the Llama-style model, in the order a Hugging Face model declares them."""
    hidden, inter = config["hidden"], config["intermediate"]
    head_dim = hidden // config["heads"]
    kv = config["kv"] * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, hidden))]
    for i in range(config["layers"]):
        prefix = f"model.layers.{i}"
        shapes += [
            (f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{prefix}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{prefix}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{prefix}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.up_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, inter)),
            (f"{prefix}.input_layernorm.weight", (hidden,)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]
    return shapes


def mlp_layers(config: dict[str, int]) -> list[str]:
    """The MLP chain, in data-flow order: each block's up_proj, then its down_proj."""
    return [
        f"model.layers.{i}.mlp.{name}"
        for i in range(config["layers"])
        for name in ("up_proj", "down_proj")
    ]


def write_model(config: dict[str, int], path: Path, seed: int = 0) -> int:
    """Write the model as bf16 safetensors, one tensor at a time; returns its parameter count."""
    import torch

    shapes = tensor_shapes(config)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        size = 2 * math.prod(shape)
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    norms = torch.Generator().manual_seed(seed + 1)  # the weights' draws stay as they were
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for _name, shape in shapes:
            if len(shape) == 1:  # RMSNorm weights, folded into the layers that read them
                tensor = (0.5 + torch.rand(shape, generator=norms)).to(torch.bfloat16)
            else:
                std = 1.0 / math.sqrt(shape[1])
                tensor = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
            handle.write(tensor.view(torch.int16).numpy().tobytes())
    return sum(math.prod(shape) for _, shape in shapes)


def write_folder(config: dict[str, int], folder: Path) -> int:
    """The model as a Hugging Face ``save_pretrained`` folder (``config.json`` for
    ``LlamaForCausalLM`` and :func:`write_model`'s file); returns its parameter count."""
    folder.mkdir()
    hidden = config["hidden"]
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": config["intermediate"],
                "num_hidden_layers": config["layers"],
                "num_attention_heads": config["heads"],
                "num_key_value_heads": config["kv"],
                "head_dim": hidden // config["heads"],
                "vocab_size": VOCAB,
                "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
            }
        ),
        encoding="utf-8",
    )
    return write_model(config, folder / "model.safetensors")


def task_bounded_folder(path: str, layers: list[str]) -> dict[str, Any]:
    """Audit the whole model's graph (residual stream, attention, MLPs) from its folder in
    bounded memory (``shuffles=0``)."""
    import transformers  # noqa: F401  # the architecture's library: in the base, as torch is

    import cluster_tracking as ct
    import cluster_tracking.graph.chain  # torch: before the base, as for the chain
    from cluster_tracking.graph.model_folder import model_folder_graph

    del layers
    base = _current_rss()
    started = time.perf_counter()
    graph = model_folder_graph(path)
    read = time.perf_counter() - started
    report = ct.measure(graph, k=12, shuffles=0, seed=0)
    return _bounded_result(graph, report, base, started, read)


def _bounded_result(
    graph: Any, report: Any, base: int, started: float, read: float
) -> dict[str, Any]:
    """What a bounded task reports: the graph's size, times from ``started``, peak and base."""
    return {
        "nodes": graph.n_nodes,
        "edges": sum(block.weight.size for block in graph.blocks),
        "read_s": read,
        "partition_s": report.timings["partition"],
        "total_s": time.perf_counter() - started,
        "peak": _peak_rss(),
        "base": base,
        "ncut": report.ncut,
        "labels": report.partition.labels,
    }


def task_in_memory_folder(path: str, layers: list[str]) -> dict[str, Any]:
    """The same graph as transformers loads the folder and ``weight_graph`` traces the model."""
    import transformers  # noqa: F401  # in the base, as for the bounded path

    import cluster_tracking as ct
    from cluster_tracking.audit.pretrained import load_model_folder

    del layers
    base = _current_rss()
    started = time.perf_counter()
    graph = ct.weight_graph(load_model_folder(Path(path)))
    report = ct.measure(graph, k=12, shuffles=0, seed=0)
    return {
        "total_s": time.perf_counter() - started,
        "peak": _peak_rss(),
        "base": base,
        "ncut": report.ncut,
        "labels": report.partition.labels,
    }


def task_bounded(path: str, layers: list[str]) -> dict[str, Any]:
    """Audit the MLP graph in bounded memory (``shuffles=0``)."""
    import cluster_tracking as ct
    import cluster_tracking.graph.chain  # the chain builder imports torch: before the base
    from cluster_tracking.graph.lazy import safetensors_graph

    base = _current_rss()
    started = time.perf_counter()
    graph = safetensors_graph(path, layers=layers)
    read = time.perf_counter() - started
    report = ct.measure(graph, k=12, shuffles=0, seed=0)
    return _bounded_result(graph, report, base, started, read)


def task_in_memory(path: str, layers: list[str]) -> dict[str, Any]:
    """The same graph through ``weight_graph`` (float64 blocks and a sparse adjacency)."""
    from safetensors.torch import load_file

    import cluster_tracking as ct

    base = _current_rss()
    started = time.perf_counter()
    state = load_file(path)
    graph = ct.weight_graph(
        {name + ".weight": state[name + ".weight"] for name in layers}, layers=layers
    )
    del state
    report = ct.measure(graph, k=12, shuffles=0, seed=0)
    return {
        "total_s": time.perf_counter() - started,
        "peak": _peak_rss(),
        "base": base,
        "ncut": report.ncut,
        "labels": report.partition.labels,
    }


def task_dask(path: str, layers: list[str]) -> dict[str, Any]:
    """The same graph with its weight blocks kept on 2 local Dask workers."""
    from distributed import Client, LocalCluster

    import cluster_tracking as ct
    import cluster_tracking.graph.chain  # the chain builder imports torch: before the base
    from cluster_tracking.graph.lazy import safetensors_graph

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit=0,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        base = _current_rss()
        started = time.perf_counter()
        graph = safetensors_graph(path, layers=layers, scheduler=client)
        read = time.perf_counter() - started
        report = ct.measure(graph, k=12, shuffles=0, seed=0)
        total = time.perf_counter() - started
        workers = client.run(_peak_rss)
        graph.release()
    return {
        "read_s": read,
        "partition_s": report.timings["partition"],
        "total_s": total,
        "peak": _peak_rss(),
        "base": base,
        "worker_peaks": sorted(workers.values()),
        "ncut": report.ncut,
        "labels": report.partition.labels,
    }


TASKS = {
    "bounded": task_bounded,
    "in_memory": task_in_memory,
    "dask": task_dask,
    "bounded_folder": task_bounded_folder,
    "in_memory_folder": task_in_memory_folder,
}


def _child(task: str, path: Path, layers: list[str], timeout: float) -> dict[str, Any]:
    """Run a task in a fresh process; its last stdout line is its JSON result."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_scale",
        "--child",
        task,
        str(path),
        json.dumps(layers),
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{task} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return (
        sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / den if den else float("nan")
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="0.1B,0.3B,1B", help="comma-separated: " + ",".join(CONFIGS)
    )
    parser.add_argument("--compare", default="0.1B", help="sizes also run in memory ('' for none)")
    parser.add_argument(
        "--dask", default="", help="sizes also run with the weights on 2 local Dask workers"
    )
    parser.add_argument(
        "--dir", default=None, help="where the safetensors files go (deleted after)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    parser.add_argument(
        "--graph",
        choices=("mlp", "residual"),
        default="mlp",
        help="mlp: the chain of every block's up_proj and down_proj from the safetensors file; "
        "residual: the whole traced model (residual stream, attention, gated MLPs) from a "
        "Hugging Face model folder",
    )
    args = parser.parse_args(argv)
    sizes = [size for size in args.sizes.split(",") if size]
    compare = {size for size in args.compare.split(",") if size}
    on_dask = {size for size in args.dask.split(",") if size}
    unknown = [size for size in sizes if size not in CONFIGS]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(CONFIGS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.dir) as folder:
        for size in sizes:
            config = CONFIGS[size]
            residual = args.graph == "residual"
            path = Path(folder) / (f"llama-{size}" if residual else f"llama-{size}.safetensors")
            print(f"{size}: writing {path.name} ...", flush=True)
            started = time.perf_counter()
            params = write_folder(config, path) if residual else write_model(config, path)
            written = time.perf_counter() - started
            layers = [] if residual else mlp_layers(config)
            on_disk = (
                sum(f.stat().st_size for f in path.iterdir()) if residual else path.stat().st_size
            )
            print(
                f"{size}: {params / 1e9:.2f}B parameters, {on_disk / 2**30:.2f} GiB written in "
                f"{written:.0f} s; auditing the {args.graph} graph ...",
                flush=True,
            )
            suffix = "_folder" if residual else ""
            row: dict[str, Any] = {
                "size": size,
                "params": params,
                **_child("bounded" + suffix, path, layers, args.timeout),
            }
            if size in compare:
                print(f"{size}: the in-memory path ...", flush=True)
                theirs = _child("in_memory" + suffix, path, layers, args.timeout)
                row["memory_total_s"] = theirs["total_s"]
                row["memory_peak"] = theirs["peak"]
                row["ncut_rel_diff"] = abs(row["ncut"] - theirs["ncut"]) / theirs["ncut"]
                row["labels_equal"] = row["labels"] == theirs["labels"]
            if size in on_dask and not residual:
                print(f"{size}: the weights on 2 Dask workers ...", flush=True)
                row["dask"] = _child("dask", path, layers, args.timeout)
            if residual:
                shutil.rmtree(path)
            else:
                path.unlink()
            rows.append(row)
            print(_line(row), flush=True)
    print()
    print(
        "size   params  nodes      edges          read s  part. s  total s  peak GB  "
        "bytes/edge  n-cut"
    )
    for row in rows:
        print(_line(row))
    for row in rows:
        if "ncut_rel_diff" in row:
            print(
                f"{row['size']} in memory: {row['memory_total_s']:.1f} s, peak "
                f"{row['memory_peak'] / 1e9:.2f} GB; n-cut relative difference "
                f"{row['ncut_rel_diff']:.1e}, labels equal: {row['labels_equal']}"
            )
    for row in rows:
        if "dask" in row:
            remote = row["dask"]
            print(
                f"{row['size']} on 2 Dask workers: read {remote['read_s']:.1f} s, partition "
                f"{remote['partition_s']:.1f} s, total {remote['total_s']:.1f} s; peak here "
                f"{remote['peak'] / 1e9:.2f} GB, workers "
                + ", ".join(f"{peak / 1e9:.2f}" for peak in remote["worker_peaks"])
                + f" GB; n-cut relative difference "
                f"{abs(remote['ncut'] - row['ncut']) / row['ncut']:.1e}, labels equal: "
                f"{remote['labels'] == row['labels']}"
            )
    if len(rows) >= 2:
        edges = [float(row["edges"]) for row in rows]
        print(
            "growth exponents against edges (log-log slopes): "
            f"time {_slope(edges, [row['total_s'] for row in rows]):.2f}, "
            f"read {_slope(edges, [row['read_s'] for row in rows]):.2f}, "
            f"partition {_slope(edges, [row['partition_s'] for row in rows]):.2f}, "
            "memory above base "
            f"{_slope(edges, [float(row['peak'] - row['base']) for row in rows]):.2f}"
        )


def _line(row: dict[str, Any]) -> str:
    per_edge = (row["peak"] - row["base"]) / row["edges"]
    return (
        f"{row['size']:<6} {row['params'] / 1e9:5.2f}B  {row['nodes']:<9,}  {row['edges']:<13,}  "
        f"{row['read_s']:6.1f}  {row['partition_s']:7.1f}  {row['total_s']:7.1f}  "
        f"{row['peak'] / 1e9:7.2f}  {per_edge:10.2f}  {row['ncut']:.6f}"
    )


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        result = TASKS[sys.argv[2]](sys.argv[3], json.loads(sys.argv[4]))
        print(json.dumps(result))
    else:
        main()
