"""The clusterability hook under load: a long run on a busy machine, into a real MLflow server.

Scenarios, each with a real ``mlflow server`` on 127.0.0.1 (SQLite store, served artifacts) and,
where a slow server is wanted, a TCP proxy started here that delays every request:

1. **Training.** An MLP 64-256-256-10 trained for ``--steps`` steps with torch's default threads,
   bare, then with ``ClusterabilityTracker(every_n_steps=50, shuffles=10)`` (every other
   setting at its default) logging to the server, then bare again (after a warm-up loop; the
   machine's load drifts: the ratio is against the two bare loops' mean, and against the
   tracked loop's own steps taken while the child was idle, which time the bare loop at the
   same moments; the CPU the rest of the machine spent meanwhile is printed beside). ``--repeats``
   runs it again. Prints how many due steps were measured
   *during* training (before ``close()``), which, and when their reports came, the largest gap
   between measured steps as a share of the run, the loop's wall time against the bare loop's,
   the child's CPU time against the time it was allowed to run, the growth of this process's RSS
   (a least-squares slope over samples every 1,000 steps) and of the spool and the tracker's
   working files per 1,000 steps and per measurement, and the time of ``close()``. The budget is
   a share of the run's wall time, so what it buys depends on how long the run is: ``--batch
   960`` makes the 20,000 steps last about a minute here, as the issue's run of batch 64 did on
   its machine.
2. **Memory.** The RSS growth per measurement, from a tracker measuring back to back
   (``max_overhead=None``) after a warm-up tracker: a one-minute run has too few measurements
   to tell its RSS noise from growth per measurement, and the default 60,000 steps (a few
   hundred) resolve a few KB; ``--memory-steps 400000`` (about 2,000) resolves 0.1 KB.
3. **Slow server.** Shorter runs through the proxy at 0, 1, 2 and 5 s per request, measuring
   without a CPU budget (``max_overhead=None``, as many reports as the machine can make): metrics
   delivered, lost and duplicated (read back from the server), requests (``/health`` probes
   among them), and ``close()`` time.
4. **Backlog at close.** 19 measurements spooled while the server was unreachable, then the
   server back behind a proxy answering in 1 s: ``close()`` time and what was delivered.

Wall-clock numbers are for people to read; no test asserts on them.

    python -m benchmarks.bench_load [--steps 20000] [--delay-steps 2000] [--batch 64]
    python -m benchmarks.bench_load --skip memory,slow,backlog --batch 960 --repeats 2
    python -m benchmarks.bench_load --skip training,slow,backlog --memory-steps 400000
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _servers import DelayingProxy, MlflowServer, free_port

from cluster_tracking.report import METRIC_KEYS
from cluster_tracking.tracking.measuring import PACE_MARGIN
from cluster_tracking.tracking.tracker import ClusterabilityTracker

EVERY = 50
SHUFFLES = 10
WARM_UP_STEPS = 2000
#: A step counts as taken while the child was idle after this long without a measurement.
IDLE_AFTER_SECONDS = 0.1


def rss_kb() -> int:
    """This process's resident set size in KB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def machine_cpu() -> tuple[float, float]:
    """CPU seconds this machine has spent busy (every core, steal included) and stolen by its
    host, so far (Linux ``/proc/stat``)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy / tick, fields[7] / tick


def tree_cpu() -> float:
    """CPU seconds of this process and its descendants alive now (the measuring child, the
    ``mlflow server`` and its workers), so far (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(fields[1])
        seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    ours = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return sum(seconds.get(pid, 0.0) for pid in ours)


class Others:
    """CPU seconds the rest of the machine spent (busy minus this process tree) and the host
    stole, from its creation to :meth:`stop`: what makes a loop's wall time move between runs
    that this benchmark does not control. Stop it while the process tree is whole (a child
    that exits takes its CPU seconds out of the tree's)."""

    def __init__(self) -> None:
        self._busy, self._steal = machine_cpu()
        self._tree = tree_cpu()
        self.seconds = self.steal = 0.0

    def stop(self) -> Others:
        busy, steal = machine_cpu()
        self.seconds = max(0.0, (busy - self._busy) - (tree_cpu() - self._tree))
        self.steal = steal - self._steal
        return self

    def __str__(self) -> str:
        return f"others {self.seconds:.1f} s CPU, stolen {self.steal:.1f} s"


def folder_bytes(*folders: Path | None) -> int:
    total = 0
    for folder in folders:
        if folder is None or not folder.exists():
            continue
        for path in folder.rglob("*"):
            try:
                if path.is_file():
                    total += path.stat().st_size
            except OSError:  # deleted while we looked
                pass
    return total


class Loop:
    """The MLP 64-256-256-10 on a fixed random batch."""

    def __init__(self, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        self.optimiser = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.x = torch.randn(batch, 64)
        self.y = torch.randint(0, 10, (batch,))

    def step(self) -> None:
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()


class IdleSteps:
    """The training steps of a tracked loop taken while the measuring child was idle: not
    measuring (its throttle not cycling, the child started) for :data:`IDLE_AFTER_SECONDS`
    before the step and during it, and no snapshot at the step. They come every few seconds
    between measurements all through the run, so their mean is the bare loop's speed at the
    same moments as the tracked steps', which a bare loop before or after cannot be: the
    loop's speed here moved by up to 18% between runs a minute apart."""

    def __init__(self, tracker: ClusterabilityTracker) -> None:
        self._tracker = tracker
        self.count = 0
        self.seconds = 0.0
        self._busy_at = time.perf_counter()
        self._started: float | None = None

    def _busy_now(self) -> bool:
        worker = self._tracker._worker
        if worker is None or worker._throttle is None or not worker.start_run_seconds:
            return True  # not started, starting at full speed, or not throttled
        return worker._throttle._cycling

    def before(self, step: int) -> None:
        now = time.perf_counter()
        if self._busy_now():
            self._busy_at = now
        quiet = now - self._busy_at >= IDLE_AFTER_SECONDS and step % EVERY != 0
        self._started = now if quiet else None

    def after(self) -> None:
        if self._started is not None and not self._busy_now():
            self.count += 1
            self.seconds += time.perf_counter() - self._started

    @property
    def mean(self) -> float:
        return self.seconds / self.count


def bare_loop(steps: int, batch: int) -> tuple[float, Others]:
    """Seconds of ``steps`` steps of the loop without a tracker, and the CPU the rest of the
    machine spent meanwhile."""
    loop = Loop(batch)
    others = Others()
    started = time.perf_counter()
    for _ in range(steps):
        loop.step()
    seconds = time.perf_counter() - started
    return seconds, others.stop()


def counts_on_server(client: Any, run_id: str) -> dict[str, Counter[int]]:
    return {
        key: Counter(m.step for m in client.get_metric_history(run_id, key)) for key in METRIC_KEYS
    }


def delivery(client: Any, run_id: str, measured: list[int]) -> tuple[int, int, int]:
    """Metrics delivered, lost and duplicated: (key, step) pairs, against the measured steps."""
    delivered = lost = duplicated = 0
    for counts in counts_on_server(client, run_id).values():
        for step in measured:
            if counts[step] == 0:
                lost += 1
            else:
                delivered += 1
                duplicated += counts[step] - 1
        duplicated += sum(n for step, n in counts.items() if step not in measured)
    return delivered, lost, duplicated


def training(server: MlflowServer, steps: int, batch: int, root: Path) -> None:
    from mlflow import MlflowClient

    from cluster_tracking.integrations.mlflow import MlflowSink

    bare_loop(WARM_UP_STEPS, batch)  # the first loop of a process runs slower
    bare_before, others_before = bare_loop(steps, batch)

    client = MlflowClient(server.uri)
    run_id = client.create_run("0", run_name="bench-load").info.run_id
    spool = root / "spool"
    sink = MlflowSink(run_id, tracking_uri=server.uri, spool_dir=spool)
    tracker = ClusterabilityTracker([sink], every_n_steps=EVERY, shuffles=SHUFFLES)
    loop = Loop(batch)
    samples: list[tuple[int, int, int, int]] = []  # step, measured, rss KB, spool+work bytes
    arrivals: list[float] = []  # seconds into the loop at which each report was seen
    idle = IdleSteps(tracker)
    others_during = Others()
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            idle.before(step)
            loop.step()
            idle.after()
            tracker.step(loop.model, step)
            if step % 100 == 99 and len(tracker._reports) > len(arrivals):
                arrivals.append(time.perf_counter() - started)
            if step % 1000 == 999:
                samples.append(
                    (
                        step + 1,
                        len(tracker._reports),
                        rss_kb(),
                        folder_bytes(spool / run_id, tracker._workdir),
                    )
                )
        loop_seconds = time.perf_counter() - started
        others_during.stop()
        during = len(tracker._reports)
        closing = time.perf_counter()
        tracker.close()
        close_seconds = time.perf_counter() - closing
    # the machine's load drifts: a bare loop on each side
    bare_after, others_after = bare_loop(steps, batch)
    bare_seconds = (bare_before + bare_after) / 2
    measured = [report.step for report in tracker.reports]
    assert measured == sorted(measured)
    edges = [*measured, steps]
    gap = max((b - a for a, b in itertools.pairwise(edges)), default=steps)
    due = len(range(0, steps, EVERY))
    delivered, lost, duplicated = delivery(client, run_id, measured)

    print(
        f"== training: MLP 64-256-256-10, {steps} steps, batch {batch}, torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores, every_n_steps={EVERY}, "
        f"shuffles={SHUFFLES}, max_overhead={tracker.max_overhead}"
    )
    print(
        f"bare loop {bare_before:.1f} s before and {bare_after:.1f} s after; with the tracker "
        f"{loop_seconds:.1f} s: wall-time ratio {loop_seconds / bare_seconds:.3f} (against "
        f"their mean; {loop_seconds / max(bare_before, bare_after):.3f}-"
        f"{loop_seconds / min(bare_before, bare_after):.3f} against either)"
    )
    paired = (loop_seconds / steps) / idle.mean if idle.count else float("nan")
    print(
        f"in the same run, the mean step against the mean of the {idle.count} steps "
        f"({idle.seconds:.1f} s) taken while the child was idle (no measurement for "
        f"{IDLE_AFTER_SECONDS:g} s, no snapshot): {paired:.3f} (the loop's speed drifts, "
        "between the bare loops, less within a run)"
    )
    print(
        f"the rest of the machine (not this process, its child or the mlflow server) "
        f"meanwhile: {others_before} before, {others_during} with the tracker, {others_after} "
        "after"
    )
    print(
        f"measured during training: {during} of {due} due steps; after close(): "
        f"{len(measured)} (skipped {len(tracker.skipped_steps)}, failed "
        f"{len(tracker.failed_steps)})"
    )
    seen = ", ".join(f"{t:.1f}" for t in arrivals)
    print(f"steps measured: {measured}; reports seen at {seen} s into the loop")
    child = tracker._worker
    if child is not None:
        print(
            f"measuring child: {child.cpu_seconds:.2f} s of CPU, {child.start_cpu_seconds:.2f} "
            f"s of it to start (in {child.start_run_seconds:.2f} s at full speed, repaid over "
            f"a minute) and the rest in the {child.run_seconds:.2f} s it was allowed to run"
        )
    print(
        f"budget spent: {tracker._spent():.2f} s: {tracker._busy_seconds:.2f} s measuring (time "
        f"the child could run), {tracker._thread_cpu:.2f} s of the measuring thread's CPU "
        f"around the measurements, {tracker._log_cpu:.2f} s of the logging thread's, "
        f"{child.throttle_cpu_seconds if child is not None else 0.0:.2f} s of the throttling "
        f"thread's, {sink.cpu_seconds:.2f} s of the sink's sender thread's, "
        f"{tracker._start_debt():.2f} s of the child's start"
    )
    costs = [report.timings.get("total", 0.0) for report in tracker.reports]
    share = tracker._share() or 0.0
    plotted = [r.step for r in tracker.reports if r.timings.get("plots", 0.0) > 0]
    print(
        f"child's time per measurement (its own wall clock, paused time included): median "
        f"{sorted(costs)[len(costs) // 2]:.2f} s; plots drawn at steps {plotted}; budget "
        f"during training m / (1 + m) x {loop_seconds:.1f} s = {share * loop_seconds:.1f} s, "
        f"paced to {PACE_MARGIN:g} of it (the figures above include close(), which measures at "
        "full speed)"
    )
    print(
        f"largest gap between measured steps: {gap} steps = {gap / steps:.1%} of the run; "
        f"before the first one (from step 0): {edges[0]} steps = {edges[0] / steps:.1%}"
    )
    print(f"close(): {close_seconds:.1f} s")
    steady = [sample for sample in samples if sample[0] > steps // 4] or samples
    if len(steady) >= 2:
        (s0, m0, r0, _), (s1, m1, r1, _) = steady[0], steady[-1]
        per_k = (r1 - r0) / ((s1 - s0) / 1000)
        counts = np.array([sample[1] for sample in steady], dtype=float)
        rss = np.array([sample[2] for sample in steady], dtype=float)
        # least squares over every sample, not two: one sample is at the allocator's mercy
        per_m = _slope(counts, rss)[0]
        print(
            f"RSS: {r0 / 1024:.0f} -> {r1 / 1024:.0f} MB over steps {s0}-{s1}: "
            f"{per_k:+.1f} KB per 1,000 steps; {per_m:+.2f} KB per measurement (slope over "
            f"{len(steady)} samples, {m1 - m0} measurements: too few to tell noise from growth "
            "per measurement, which the memory scenario measures)"
        )
    spools = [sample[3] for sample in steady]
    print(
        f"spool + working files at steady state: max {max(spools) / 1e6:.2f} MB, last "
        f"{spools[-1] / 1e6:.2f} MB (samples every 1,000 steps); after close(): "
        f"{folder_bytes(spool / run_id) / 1e6:.2f} MB"
    )
    print(f"server: {delivered} metrics delivered, {lost} lost, {duplicated} duplicated")
    for warning in caught:
        print(f"  warning: {str(warning.message)[:240]}")


def memory(server: MlflowServer, steps: int, batch: int) -> None:
    """RSS growth per measurement: a tracker measuring back to back (``max_overhead=None``, a
    few hundred measurements) into the server, after a first tracker that warms the process up.

    A one-minute run makes 15-25 measurements, and over a minute this process's RSS moves by
    1-3 MB in ways that do not follow the number of measurements (in one process, 20,000 steps
    with a tracker: +2.8 MB with 211 measurements, +2.6 MB with 15, -0.3 MB with 215; a bare
    loop: under 0.1 MB): divided by 15, that reads as 50-150 KB per measurement whatever the
    tracker does. Hundreds of measurements resolve a few KB per measurement, thousands 0.1 KB.
    """
    from mlflow import MlflowClient

    from cluster_tracking.integrations.mlflow import MlflowSink

    client = MlflowClient(server.uri)
    with tempfile.TemporaryDirectory() as spool:
        for phase in ("warm-up", "measured"):
            run_id = client.create_run("0", run_name=f"bench-memory-{phase}").info.run_id
            sink = MlflowSink(run_id, tracking_uri=server.uri, spool_dir=spool)
            tracker = ClusterabilityTracker(
                [sink], every_n_steps=EVERY, shuffles=SHUFFLES, max_overhead=None
            )
            loop = Loop(batch)
            # per 1,000 steps: measurements so far and the least RSS of 10 samples (in-flight
            # buffers, a 350 KB weight frame or an HTTP request, come and go between samples)
            samples: list[tuple[int, int]] = []
            least = sys.maxsize
            length = steps if phase == "measured" else steps // 4
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for step in range(length):
                    loop.step()
                    tracker.step(loop.model, step)
                    if step % 100 == 99:
                        least = min(least, rss_kb())
                    if step % 1000 == 999:
                        samples.append((len(tracker._reports), least))
                        least = sys.maxsize
                tracker.close()
    steady = samples[len(samples) // 4 :]
    counts = np.array([sample[0] for sample in steady], dtype=float)
    rss = np.array([sample[1] for sample in steady], dtype=float)
    slope, error = _slope(counts, rss)
    print(
        f"== memory: MLP 64-256-256-10, {steps} steps, batch {batch}, every_n_steps={EVERY}, "
        f"shuffles={SHUFFLES}, max_overhead=None, after a warm-up tracker of {steps // 4} steps"
    )
    print(
        f"RSS {rss[0] / 1024:.1f} -> {rss[-1] / 1024:.1f} MB over measurements "
        f"{int(counts[0])}-{int(counts[-1])}: {slope:+.2f} ± {error:.2f} KB per measurement (least "
        f"squares, ± its standard error; "
        f"{len(steady)} samples, each the least of 10 in 1,000 steps; between samples it "
        f"moved by up to {np.abs(np.diff(rss)).max():.0f} KB)"
    )


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` and its standard error (nan with too few points)."""
    if len(x) < 3 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    spread = float(np.sqrt((residuals**2).sum() / (len(x) - 2)))
    return float(slope), spread / float(np.sqrt(((x - x.mean()) ** 2).sum()))


def slow_server(server: MlflowServer, steps: int, batch: int, delays: list[float]) -> None:
    from mlflow import MlflowClient

    from cluster_tracking.integrations.mlflow import MlflowSink

    print(f"== slow server: {steps} steps through a proxy delaying every request")
    client = MlflowClient(server.uri)
    for delay in delays:
        run_id = client.create_run("0", run_name=f"bench-delay-{delay}").info.run_id
        with DelayingProxy(server.port, delay) as proxy, tempfile.TemporaryDirectory() as spool:
            sink = MlflowSink(run_id, tracking_uri=proxy.uri, spool_dir=spool)
            # no CPU budget here: as many reports as the machine can measure, to load the sink
            tracker = ClusterabilityTracker(
                [sink], every_n_steps=EVERY, shuffles=SHUFFLES, max_overhead=None
            )
            loop = Loop(batch)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                started = time.perf_counter()
                for step in range(steps):
                    loop.step()
                    tracker.step(loop.model, step)
                loop_seconds = time.perf_counter() - started
                closing = time.perf_counter()
                tracker.close()
                close_seconds = time.perf_counter() - closing
            measured = [report.step for report in tracker.reports]
            delivered, lost, duplicated = delivery(client, run_id, measured)
            params = len(client.get_run(run_id).data.params)
            health = sum("/health" in line for line in proxy.request_lines)
            print(
                f"delay {delay:g} s: {len(measured)} measured; metrics {delivered} delivered, "
                f"{lost} lost, {duplicated} duplicated; {params} params; {proxy.requests} "
                f"requests ({health} /health); loop {loop_seconds:.1f} s, close() "
                f"{close_seconds:.1f} s; {len(caught)} warning(s)"
            )
            for warning in caught:
                print(f"  warning: {str(warning.message)[:200]}")


def backlog_at_close(server: MlflowServer, batch: int, reports: int, delay: float) -> None:
    """``reports`` measurements spooled while the server was unreachable, then ``close()``
    with the server back behind a proxy that answers in ``delay`` seconds."""
    from mlflow import MlflowClient

    from cluster_tracking.integrations.mlflow import MlflowSink

    client = MlflowClient(server.uri)
    run_id = client.create_run("0", run_name="bench-backlog").info.run_id
    port = free_port()  # nothing listens there yet: the server is unreachable
    with tempfile.TemporaryDirectory() as spool:
        sink = MlflowSink(run_id, tracking_uri=f"http://127.0.0.1:{port}", spool_dir=spool)
        tracker = ClusterabilityTracker(
            [sink], shuffles=SHUFFLES, on_backlog="queue", max_pending=reports, max_overhead=None
        )
        loop = Loop(batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(reports):
                loop.step()
                tracker.checkpoint(loop.model, step)
            tracker.flush()  # all measured and handed to the sink, which could not deliver
            queued = sink.pending
            with DelayingProxy(server.port, delay, port=port) as proxy:
                closing = time.perf_counter()
                tracker.close()
                close_seconds = time.perf_counter() - closing
        measured = [report.step for report in tracker.reports]
        delivered, lost, duplicated = delivery(client, run_id, measured)
        artifacts = client.list_artifacts(run_id, "clusterability")
    with_files = sum(1 for info in artifacts if info.is_dir)
    print(
        f"== backlog: {reports} reports measured while the server was unreachable, {queued} "
        f"items spooled; then the server answers in {delay:g} s: close() {close_seconds:.1f} s, "
        f"{proxy.requests} requests; metrics {delivered} delivered, {lost} lost, "
        f"{duplicated} duplicated; {with_files} step folders of artifacts (the rest thinned)"
    )
    for warning in caught:
        print(f"  warning: {str(warning.message)[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--delay-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="training runs, one by one")
    parser.add_argument("--delays", default="0,1,2,5")
    parser.add_argument("--memory-steps", type=int, default=60000)
    parser.add_argument("--skip", default="", help="comma-separated: training,memory,slow,backlog")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        server = MlflowServer(root / "server")
        server.start()
        try:
            if "training" not in skip:
                for _ in range(args.repeats):
                    training(server, args.steps, args.batch, root)
            if "memory" not in skip:
                memory(server, args.memory_steps, args.batch)
            if "slow" not in skip:
                delays = [float(d) for d in args.delays.split(",")]
                slow_server(server, args.delay_steps, args.batch, delays)
            if "backlog" not in skip:
                backlog_at_close(server, args.batch, 19, 1.0)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
