"""The readers' memory limit and the bounds of the options, in-process.

What a user relies on: ``--max-memory`` takes the sizes people write; the default limit follows
the memory really there (half of it, and half of the address space left under ``ulimit -v``); a
budget refuses with the estimate and the limit, before anything is allocated; PyTorch's own
quantized tensors are measured after dequantizing, and the checks on weight values never
materialise a view larger than its storage.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest
import torch

from cluster_tracking.audit import AuditSettings, capped_jobs, weight_extent
from cluster_tracking.errors import ConfigError, GraphError, LimitError
from cluster_tracking.limits import (
    MAX_SHUFFLES,
    MemoryBudget,
    cpu_count,
    current_memory_limit,
    default_memory_limit,
    memory_limit,
    parse_size,
)
from cluster_tracking.loading import PlatformError, check_tracking_uri, load_file


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
