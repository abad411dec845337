"""Speed, quality and scale of cluster-tracking against the scikit-learn reference, side by side.

    python -m benchmarks.run            # the full suite (about 15 minutes on 2 cores)
    python -m benchmarks.run --quick    # fewer repeats and sizes (about 6 minutes)

Every ratio is measured in the same run, as the median of several repeats, each in a fresh
subprocess (cold imports and worker pools included where the target says so):

* **paper MLP end to end**: ours is ``measure(model, k=12, shuffles=100, n_jobs=2)`` (its graph,
  partition, 100 ``layer`` shuffles, z-score; thread pool started inside); the reference runs
  scikit-learn's ``SpectralClustering`` (arpack, k-means, n_init=25) on the same 101 graphs
  (observed + the same shuffles) with joblib on 2 fresh ``loky`` workers, one thread each, then
  the n-cut with ``cluster_tracking.ncut``. The reference is given its graphs pre-built (not
  timed), so the ratio is conservative. The n-cut each reaches on the same graphs is compared.
* **one n-cut**: ``spectral_partition(graph, k=12)`` against the reference on one graph, both on
  one thread, for the planted-modules MLP, a CNN, a ResNet and wide MLPs of 2,000 and 8,000 nodes.
* **scale**: wide MLPs up to 30,000 nodes (29 million edges): the time to build the graph from
  the model and partition it, and the peak resident memory of the process, with log-log growth
  exponents against nodes and edges.
* **hooks**: ``benchmarks/bench_hooks.py`` (the tracker's training-loop overhead), when present.

Wall-clock numbers are for people to read; no test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
K = 12


# ---------------------------------------------------------------------------------------------
# Tasks, each run in a fresh subprocess (``--child TASK JSON``); they print one JSON line.
# ---------------------------------------------------------------------------------------------


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def task_ours_measure(net: str, shuffles: int, seed: int) -> dict[str, Any]:
    import cluster_tracking as ct
    from benchmarks.networks import build

    model = build(net)
    started = time.perf_counter()
    report = ct.measure(model, k=K, shuffles=shuffles, n_jobs=2, seed=seed)
    seconds = time.perf_counter() - started
    assert report.baseline is not None
    return {
        "seconds": seconds,
        "ncuts": [report.ncut, *report.baseline.ncuts],
        "z": report.baseline.z_score,
        "backend": report.config["backend"],
    }


def task_ref_measure(net: str, shuffles: int, seed: int) -> dict[str, Any]:
    import joblib
    import numpy as np

    import cluster_tracking as ct
    from benchmarks.networks import build
    from benchmarks.reference import as_int32_csr, reference_labels
    from cluster_tracking import nulls
    from cluster_tracking.spectral.partition import child_seed

    graph = ct.weight_graph(build(net))
    root = np.random.SeedSequence(seed)
    graphs = [graph]
    for index in range(shuffles):  # the very shuffles measure() draws for this seed
        rng = np.random.default_rng(child_seed(root, 1, index))
        graphs.append(graph.with_weights(nulls.shuffle_weights(graph.weights(), "layer", rng)))
    matrices = [as_int32_csr(g.adjacency) for g in graphs]
    started = time.perf_counter()
    with joblib.parallel_config(backend="loky"):
        labels = joblib.Parallel(n_jobs=2)(
            joblib.delayed(reference_labels)(m, K, seed + i) for i, m in enumerate(matrices)
        )
    ncuts = [ct.ncut(g, lab) for g, lab in zip(graphs, labels, strict=True)]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "ncuts": ncuts}


def task_single(net: str, repeats: int, ref_repeats: int) -> dict[str, Any]:
    import cluster_tracking as ct
    from benchmarks.networks import build
    from benchmarks.reference import as_int32_csr, reference_labels
    from cluster_tracking.spectral.partition import spectral_partition

    graph = ct.weight_graph(build(net))
    ours_times, ours_ncuts = [], []
    for r in range(repeats):
        started = time.perf_counter()
        ours_ncuts.append(spectral_partition(graph, K, seed=r).ncut)
        ours_times.append(time.perf_counter() - started)
    matrix = as_int32_csr(graph.adjacency)
    ref_times, ref_ncuts = [], []
    for r in range(ref_repeats):
        started = time.perf_counter()
        labels = reference_labels(matrix, K, r)
        ref_ncuts.append(ct.ncut(graph, labels))
        ref_times.append(time.perf_counter() - started)
    return {
        "nodes": graph.n_nodes,
        "edges": graph.adjacency.nnz // 2,
        "ours": ours_times,
        "ours_ncuts": ours_ncuts,
        "ref": ref_times,
        "ref_ncuts": ref_ncuts,
    }


def task_scale(net: str) -> dict[str, Any]:
    import cluster_tracking as ct
    from benchmarks.networks import build
    from cluster_tracking.spectral.partition import spectral_partition

    model = build(net)
    before = _peak_rss_gb()
    started = time.perf_counter()
    graph = ct.weight_graph(model)
    built = time.perf_counter()
    part = spectral_partition(graph, K, seed=0)
    done = time.perf_counter()
    return {
        "nodes": graph.n_nodes,
        "edges": graph.adjacency.nnz // 2,
        "graph_s": built - started,
        "partition_s": done - built,
        "total_s": done - started,
        "rss_before_gb": before,
        "peak_rss_gb": _peak_rss_gb(),
        "ncut": part.ncut,
    }


TASKS = {
    "ours_measure": task_ours_measure,
    "ref_measure": task_ref_measure,
    "single": task_single,
    "scale": task_scale,
}


def _run_child(task: str, **params: Any) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.run", "--child", task, json.dumps(params)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{task} {params} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def _status(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-hooks", action="store_true", help="do not run bench_hooks.py")
    args = parser.parse_args(argv)
    if args.child:
        task, params = args.child
        print(json.dumps(TASKS[task](**json.loads(params))))
        return

    quick = args.quick
    load_before = os.getloadavg()
    rows: list[tuple[str, str, str, str, str]] = []
    notes: list[str] = []

    # 1. The paper MLP end to end, 2 processes each, cold.
    shuffles = 100
    ours_repeats, ref_repeats = (3, 1) if quick else (5, 3)
    print(f"paper MLP, n-cut + {shuffles} shuffles + z, 2 workers ...", flush=True)
    ours_runs = [
        _run_child("ours_measure", net="paper_mlp", shuffles=shuffles, seed=s)
        for s in range(ours_repeats)
    ]
    ref_runs = [
        _run_child("ref_measure", net="paper_mlp", shuffles=shuffles, seed=s)
        for s in range(ref_repeats)
    ]
    ours_s = _median([r["seconds"] for r in ours_runs])
    ref_s = _median([r["seconds"] for r in ref_runs])
    ratio = ref_s / ours_s
    rows.append(
        (
            f"paper MLP: n-cut + {shuffles} shuffles + z (2 procs, cold)",
            f"{ours_s:.2f} s",
            f"{ref_s:.2f} s",
            f"{ratio:.1f}x",
            f">= 15x: {_status(ratio >= 15)}",
        )
    )
    # Quality on the same graphs (observed + shuffles), per seed present in both.
    diffs20, diffs_all = [], []
    for ours, ref in zip(ours_runs, ref_runs, strict=False):
        pairs = list(zip(ours["ncuts"], ref["ncuts"], strict=True))
        diffs20 += [a - b for a, b in pairs[:20]]
        diffs_all += [a - b for a, b in pairs]
    mean20, se20 = _mean_se(diffs20)
    mean_all, se_all = _mean_se(diffs_all)
    ours20 = statistics.fmean(ours_runs[0]["ncuts"][:20])
    ref20 = statistics.fmean(ref_runs[0]["ncuts"][:20])
    rows.append(
        (
            "paper MLP: mean n-cut, 20 graphs (observed + 19 shuffles)",
            f"{ours20:.4f}",
            f"{ref20:.4f}",
            f"diff {mean20:+.4f} +- {se20:.4f}",
            f"diff <= 0: {_status(mean20 <= 2 * se20)}",
        )
    )
    notes.append(
        f"paper MLP n-cut, ours - reference over all {len(diffs_all)} graphs: "
        f"{mean_all:+.4f} +- {se_all:.4f} (standard error); "
        f"ours worse on {sum(d > 0 for d in diffs_all)} of them. "
        f"Null backend: {ours_runs[0]['backend']}; z-score (seed 0): {ours_runs[0]['z']:.2f}."
    )

    # 2. One n-cut on other networks, one thread each.
    singles = ["planted_mlp", "cnn", "resnet", "mlp_2k", "mlp_8k"]
    for net in singles:
        print(f"one n-cut: {net} ...", flush=True)
        big = net == "mlp_8k"
        repeats = 3 if quick else 5
        ref_rep = 1 if (quick and big) else (2 if big else 3)
        result = _run_child("single", net=net, repeats=repeats, ref_repeats=ref_rep)
        ours_t, ref_t = _median(result["ours"]), _median(result["ref"])
        ratio = ref_t / ours_t
        target = f">= 20x: {_status(ratio >= 20)}" if big else ""
        label = f"{net} ({result['nodes']:,} nodes, {result['edges']:,} edges): one n-cut"
        rows.append((label, f"{ours_t:.3f} s", f"{ref_t:.3f} s", f"{ratio:.1f}x", target))
        ours_nc = statistics.fmean(result["ours_ncuts"])
        ref_nc = statistics.fmean(result["ref_ncuts"])
        rows.append(
            (
                f"{net}: mean n-cut",
                f"{ours_nc:.4f}",
                f"{ref_nc:.4f}",
                f"diff {ours_nc - ref_nc:+.4f}",
                "",
            )
        )

    # 3. Scale: build + partition, peak memory, growth exponents.
    depth = ["mlp_4k", "mlp_8k", "mlp_30k"] if quick else ["mlp_4k", "mlp_8k", "mlp_16k", "mlp_30k"]
    width = [] if quick else ["mlp_8x500", "mlp_8k", "mlp_8x1500"]
    scale: dict[str, dict[str, Any]] = {}
    for net in dict.fromkeys(depth + width):
        print(f"scale: {net} ...", flush=True)
        scale[net] = _run_child("scale", net=net)
    big = scale["mlp_30k"]
    rows.append(
        (
            f"30k-node MLP ({big['nodes']:,} nodes, {big['edges']:,} edges): graph + n-cut",
            f"{big['total_s']:.1f} s",
            "",
            "",
            f"< 20 s: {_status(big['total_s'] < 20)}",
        )
    )
    rows.append(
        (
            "30k-node MLP: peak RSS of the process",
            f"{big['peak_rss_gb']:.2f} GB",
            "",
            "",
            f"< 3 GB: {_status(big['peak_rss_gb'] < 3)}",
        )
    )

    _print_table(rows)
    print()
    cores = os.cpu_count()
    print(
        f"{cores} cores; load average (1 min) {load_before[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end: other work on the machine slows both sides."
    )
    for note in notes:
        print(note)
    print()
    print("Scale (ours, one thread; graph = weight_graph(model), partition = spectral_partition):")
    print(
        f"{'network':<12} {'nodes':>7} {'edges':>12} {'graph s':>8} {'part. s':>8} "
        f"{'total s':>8} {'peak GB':>8} {'base GB':>8}"
    )
    for net, r in scale.items():
        print(
            f"{net:<12} {r['nodes']:>7,} {r['edges']:>12,} {r['graph_s']:>8.2f} "
            f"{r['partition_s']:>8.2f} {r['total_s']:>8.2f} {r['peak_rss_gb']:>8.2f} "
            f"{r['rss_before_gb']:>8.2f}"
        )
    print()
    print("Growth exponents (log-log least-squares slopes; memory = peak minus the model's base):")
    series = [("depth (width 1000)", depth, "nodes"), ("depth (width 1000)", depth, "edges")]
    if width:
        series += [("width (8 layers)", width, "nodes"), ("width (8 layers)", width, "edges")]
    print(
        f"{'series':<20} {'against':<8} {'graph':>7} {'partition':>10} {'total':>7} {'memory':>7}"
    )
    for name, nets, axis in series:
        xs = [float(scale[n][axis]) for n in nets]
        cells = [
            _slope(xs, [scale[n][key] for n in nets])
            for key in ("graph_s", "partition_s", "total_s")
        ]
        memory = _slope(xs, [scale[n]["peak_rss_gb"] - scale[n]["rss_before_gb"] for n in nets])
        print(
            f"{name:<20} {axis:<8} {cells[0]:>7.2f} {cells[1]:>10.2f} {cells[2]:>7.2f} "
            f"{memory:>7.2f}"
        )

    hooks = ROOT / "benchmarks" / "bench_hooks.py"
    if hooks.exists() and not args.skip_hooks:
        print()
        print("Hooks (benchmarks/bench_hooks.py):", flush=True)
        extra = ["--repeats", "1"] if quick else []
        command = [sys.executable, "-m", "benchmarks.bench_hooks", *extra]
        subprocess.run(command, cwd=ROOT, check=False)


def _print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    header = ("benchmark", "ours", "reference", "ratio", "target")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
