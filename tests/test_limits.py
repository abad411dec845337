"""The readers' memory limit and the bounds of the options, in-process.

What a user relies on: ``--max-memory`` takes the sizes people write; the default limit follows
the memory really there (half of it, and half of the address space left under ``ulimit -v``); a
budget refuses with the estimate and the limit, before anything is allocated; PyTorch's own
quantized tensors are measured after dequantizing, and the checks on weight values never
materialise a view larger than its storage. A run whose estimated time is absurd is refused
before it starts, with the estimate and the options that fit, unless the user insists.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest
import torch

from cluster_tracking.audit.settings import AuditSettings, capped_jobs
from cluster_tracking.audit.sizing import weight_extent
from cluster_tracking.audit.sources import load_file
from cluster_tracking.errors import ConfigError, GraphError, LimitError, PlatformError
from cluster_tracking.integrations.tracking_uri import check_tracking_uri
from cluster_tracking.resources.limits import (
    MAX_RUN_SECONDS,
    MAX_SHUFFLES,
    MemoryBudget,
    check_run_time,
    cpu_count,
    current_memory_limit,
    default_memory_limit,
    memory_limit,
    parse_size,
    partition_seconds,
    run_time_estimate,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 2**20),
        ("4GiB", 4 * 2**30),
        ("8G", 8 * 10**9),
        ("1.5 GB", 1_500_000_000),
        ("100000000", 100_000_000),
        (2**30, 2**30),
    ],
)
def test_max_memory_takes_the_sizes_people_write(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "says"), [("lots", "not a size"), ("1KiB", "below"), ("-1G", "not a size")]
)
def test_a_bad_max_memory_is_a_config_error(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_size(text)


def test_the_default_limit_is_half_the_address_space_left_under_ulimit_v() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status", encoding="ascii") as handle:
        mapped = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize"))
    ceiling = mapped + 2 * 2**30
    if hard != resource.RLIM_INFINITY:
        ceiling = min(ceiling, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        limited = default_memory_limit()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert limited <= (ceiling - mapped) // 2 + 2**20
    assert limited > 0


def test_a_budget_refuses_with_the_estimate_and_the_limit() -> None:
    budget = MemoryBudget("model.pt", limit=64 * 2**20)
    budget.take(60 * 2**20, "tensor a")
    with pytest.raises(LimitError) as refused:
        budget.take(10 * 2**20, "tensor b")
    message = str(refused.value)
    assert "70.0 MiB" in message and "64.0 MiB" in message and "--max-memory" in message


def test_memory_limit_scopes_the_limit_in_force() -> None:
    with memory_limit(100 * 2**20):
        assert current_memory_limit() == 100 * 2**20
        with memory_limit(50 * 2**20):
            assert current_memory_limit() == 50 * 2**20
        assert current_memory_limit() == 100 * 2**20


def test_options_have_upper_bounds_and_jobs_are_capped_with_a_note() -> None:
    with pytest.raises(ConfigError, match=re.escape(f"limit of {MAX_SHUFFLES}")):
        AuditSettings(shuffles=MAX_SHUFFLES + 1).check()
    for jobs in (0, -2):
        with pytest.raises(ConfigError, match="--jobs"):
            AuditSettings(jobs=jobs).check()
    capped, note = capped_jobs(AuditSettings(jobs=cpu_count() + 38))
    assert capped.jobs == cpu_count() and note is not None and "CPUs" in note
    same, none = capped_jobs(AuditSettings(jobs=1))
    assert same.jobs == 1 and none is None


def test_the_graph_extent_is_known_before_the_graph_is_built() -> None:
    state = {"0.weight": torch.ones(1, 1).expand(30000, 20), "0.bias": torch.zeros(30000)}
    assert weight_extent(state) == (30020, 600000)


def test_pytorch_quantized_weights_are_dequantized_with_a_note(tmp_path: Path) -> None:
    weight = torch.randn(16, 8)
    quantized = torch.quantize_per_tensor(weight, scale=0.05, zero_point=0, dtype=torch.qint8)
    torch.save({"0.weight": quantized, "2.weight": torch.randn(4, 16)}, tmp_path / "q.pt")
    loaded = load_file(tmp_path / "q.pt")
    assert isinstance(loaded.weights, dict)
    assert loaded.weights["0.weight"].dtype == torch.float32
    assert torch.allclose(loaded.weights["0.weight"], quantized.dequantize())
    assert any("dequantized" in note for note in loaded.notes)


def test_an_expanded_zero_weight_is_refused_without_materialising_it(tmp_path: Path) -> None:
    torch.save({"0.weight": torch.zeros(1, 1).expand(40000, 40000)}, tmp_path / "z.pt")
    # 1.6 billion values: materialising them (1.6 GB as bools) would pass the ceiling.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status", encoding="ascii") as handle:
        mapped = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize"))
    ceiling = mapped + 2**30
    if hard != resource.RLIM_INFINITY:
        ceiling = min(ceiling, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        with pytest.raises(GraphError, match="every weight is zero"):
            load_file(tmp_path / "z.pt")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize(
    ("uri", "error", "says"),
    [
        ("nonsense://x", ConfigError, "unknown scheme"),
        ("http://", ConfigError, "names no host"),
        ("file:/nowhere/mlruns", PlatformError, "MLFLOW_ALLOW_FILE_STORE=true"),
        ("/nowhere/mlruns", PlatformError, "mlflow migrate-filestore"),
        ("databricks", None, ""),
        ("sqlite:///new.db", None, ""),
        ("postgresql+psycopg2://user@host/db", None, ""),
    ],
)
def test_a_tracking_uri_is_checked_before_mlflow_gets_it(
    uri: str, error: type[Exception] | None, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if error is None:
        check_tracking_uri(uri, existing=False)  # a store the demo may create: no error
    else:
        with pytest.raises(error, match=re.escape(says)):
            check_tracking_uri(uri, existing=False)


# ------------------------------------------------------------------------ the time estimate


def test_the_time_estimate_grows_with_the_work_and_shrinks_with_the_workers() -> None:
    one = run_time_estimate(10**6, shuffles=0, ks=[12], jobs=1)
    assert one > 0
    assert run_time_estimate(10**6, shuffles=100, ks=[12], jobs=1) == pytest.approx(101 * one)
    assert run_time_estimate(10**6, shuffles=100, ks=[12], jobs=4) == pytest.approx(26 * one)
    # a list of k: each k partitions every network, a larger k costs more
    assert run_time_estimate(10**6, shuffles=0, ks=[8, 12], jobs=1) > one
    assert partition_seconds(10**6, [24]) > partition_seconds(10**6, [12])
    # more edges, more time; ARPACK (filan2021) grows faster than the default's solver
    for preset in ("default", "filan2021"):
        small, large = (partition_seconds(n, [12], preset) for n in (10**6, 10**7))
        assert large > small
    growth = {
        preset: partition_seconds(10**7, [12], preset) / partition_seconds(10**6, [12], preset)
        for preset in ("default", "filan2021")
    }
    assert growth["filan2021"] > growth["default"]


def test_an_absurd_run_is_refused_with_the_estimate_and_what_fits() -> None:
    # 4 million stored entries (a 1000-1000-1000 MLP), the preset, 10 000 shuffles on one core
    with pytest.raises(ConfigError) as caught:
        check_run_time(
            3000, 4_000_000, shuffles=10_000, ks=[12], jobs=1, preset="filan2021", label="wide.pt"
        )
    message = str(caught.value)
    assert message.startswith("wide.pt: ") and "\n" not in message
    assert re.search(r"would take about [\d.]+ (h|days), more than the 6\.0 h", message), message
    fitting = int(re.search(r"--shuffles (\d+) or fewer", message).group(1))  # type: ignore[union-attr]
    assert 2 <= fitting < 10_000
    assert "--allow-long-run" in message and "--preset default" in message
    # the number of shuffles it names does fit
    estimate = check_run_time(
        3000, 4_000_000, shuffles=fitting, ks=[12], jobs=1, preset="filan2021"
    )
    assert estimate <= MAX_RUN_SECONDS
    # the paper's 50-100 shuffles on the same graph are not refused
    check_run_time(3000, 4_000_000, shuffles=100, ks=[12], jobs=1, preset="filan2021")


def test_an_audit_estimated_too_long_is_refused_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster_tracking.audit.run import audit_source
    from cluster_tracking.resources import limits

    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save({"0.weight": torch.randn(16, 8), "2.weight": torch.randn(4, 16)}, path)
    monkeypatch.setattr(limits, "MAX_RUN_SECONDS", 1e-6)  # every run is "too long" now
    settings = AuditSettings(k=3, shuffles=4, jobs=1)
    with pytest.raises(ConfigError, match="--allow-long-run"):
        audit_source(str(path), settings)
    allowed = audit_source(str(path), AuditSettings(k=3, shuffles=4, jobs=1, allow_long_run=True))
    assert allowed.report.baseline is not None and allowed.report.baseline.n == 4


def test_the_bounded_safetensors_path_checks_the_time_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A safetensors file large enough for the bounded reader gets the same time check."""
    from safetensors.torch import save_file

    from cluster_tracking.audit import run as audit
    from cluster_tracking.audit.run import audit_source
    from cluster_tracking.resources import limits

    path = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    save_file({"fc1.weight": torch.randn(16, 8), "fc2.weight": torch.randn(4, 16)}, str(path))
    monkeypatch.setattr(audit, "BOUNDED_MIN_EDGES", 1)  # this small file takes the bounded path
    monkeypatch.setattr(limits, "MAX_RUN_SECONDS", 1e-6)  # every run is "too long" now
    with pytest.raises(ConfigError, match="--allow-long-run") as refused:
        audit_source(str(path), AuditSettings(k=3, shuffles=4, jobs=1))
    assert "model.safetensors" in str(refused.value)
    allowed = audit_source(str(path), AuditSettings(k=3, shuffles=4, jobs=1, allow_long_run=True))
    assert allowed.report.baseline is not None and allowed.report.baseline.n == 4
    assert "bounded memory" in allowed.report.config["source_format"]  # the path under test
