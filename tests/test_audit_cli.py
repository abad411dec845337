"""``cluster-tracking audit`` and ``compare`` through the real CLI, in subprocesses.

What an auditor relies on: the numbers are those of ``measure`` on the saved weights, whatever
the format; ``--json`` is pure JSON; ``--out`` writes files a browser opens; ``--log-to-run`` adds
to an MLflow run (a real ``mlflow server`` on loopback) without touching what is there; every
mistake is one line on stderr with its documented exit code, never a traceback, never a hang;
and a malicious pickle is never run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from _pickles import pickled_net
from _servers import MlflowServer, free_port
from mlflow import MlflowClient
from safetensors.torch import save_file
from torch import nn

from cluster_tracking import measure
from cluster_tracking.audit.settings import AuditSettings, parse_k, parse_layers
from cluster_tracking.errors import (
    EXIT_CODES,
    ConfigError,
    GraphError,
    PlatformError,
    SinkError,
    SourceError,
    exit_code,
)
from cluster_tracking.report import METRIC_KEYS, ClusterabilityReport

BUNDLE = ("report.json", "adjacency.png", "cluster_matrix.png", "composition.png", "report.html")
FAST = ["--k", "3", "--shuffles", "6", "--seed", "0", "--jobs", "1"]
MEASURE: dict[str, Any] = {"k": 3, "shuffles": 6, "seed": 0, "n_jobs": 1}
PNG = b"\x89PNG\r\n\x1a\n"


def cli(
    *arguments: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``cluster-tracking`` script (or the module when not installed)."""
    script = Path(sys.executable).with_name("cluster-tracking")
    found = str(script) if script.exists() else shutil.which("cluster-tracking")
    command = [found] if found else [sys.executable, "-m", "cluster_tracking"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    environment["COLUMNS"] = "150"
    environment.update(env or {})
    return subprocess.run(
        [*command, *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``error:`` line a failed command printed on stderr."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def json_reports(stdout: str) -> list[ClusterabilityReport]:
    """``--json`` output: one report per line and nothing else."""
    return [ClusterabilityReport.from_json(line) for line in stdout.splitlines()]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()


def modular_mlp() -> nn.Sequential:
    """An MLP of 4 disconnected-ish modules: far more clusterable than its shuffles."""
    model = mlp(1)
    with torch.no_grad():
        for layer in model:
            if not isinstance(layer, nn.Linear):
                continue
            out_group = torch.arange(layer.out_features) * 4 // layer.out_features
            in_group = torch.arange(layer.in_features) * 4 // layer.in_features
            mask = out_group[:, None] == in_group[None, :]
            layer.weight.mul_(torch.where(mask, 1.0, 0.02))
    return model


def expected(state: dict[str, torch.Tensor]) -> ClusterabilityReport:
    return measure(state, **MEASURE)


# ----------------------------------------------------------------------- local checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One MLP saved in every local format an audit reads."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model = mlp()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    optimiser.step()  # an optimizer state with tensors of its own
    torch.save(model.state_dict(), folder / "state_dict.pt")
    torch.save(
        {
            "epoch": 7,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimiser.state_dict(),
        },
        folder / "checkpoint.pth",
    )
    save_file(model.state_dict(), str(folder / "weights.safetensors"))
    torch.save(
        {
            "epoch": 7,
            "global_step": 70,
            "pytorch-lightning_version": "2.6.0",
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [optimiser.state_dict()],
            "hyper_parameters": {"lr": 0.1},
        },
        folder / "epoch=7-step=70.ckpt",
    )
    return {
        "state_dict": folder / "state_dict.pt",
        "checkpoint": folder / "checkpoint.pth",
        "safetensors": folder / "weights.safetensors",
        "lightning": folder / "epoch=7-step=70.ckpt",
    }


def test_every_checkpoint_format_gives_the_numbers_of_measure(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    files = [checkpoints[name] for name in ("state_dict", "checkpoint", "safetensors", "lightning")]
    result = cli("audit", *map(str, files), *FAST, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reports = json_reports(result.stdout)  # stdout holds JSON lines only
    reference = expected(torch.load(checkpoints["state_dict"], weights_only=True))
    assert len(reports) == 4
    for path, report in zip(files, reports, strict=True):
        assert report.config["source"] == str(path)
        assert report.ncut == reference.ncut
        assert report.baseline is not None and reference.baseline is not None
        assert report.baseline.ncuts == reference.baseline.ncuts
        assert report.baseline.z_score == reference.baseline.z_score
        assert [layer.name for layer in report.layers] == ["input", "0", "2", "4"]
        assert (report.k, report.config["shuffles"], report.config["seed"]) == (3, 6, 0)


def test_the_table_shows_each_number_and_out_writes_the_report_files(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    # A Lightning checkpoint; --layers takes names with or without its "model." prefix.
    arguments = ["--layers", "model.0,2", "--layers", "model.4", "--out", str(out)]
    result = cli("audit", str(checkpoints["lightning"]), *FAST, *arguments, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # no progress bar or library chatter off a terminal
    report = expected(torch.load(checkpoints["state_dict"], weights_only=True))
    assert report.baseline is not None
    for header in ("source", "n-cut", "null mean ± std", "z", "p", "nodes", "k"):
        assert header in result.stdout
    row = next(line for line in result.stdout.splitlines() if "epoch=7-step=70.ckpt" in line)
    assert f"{report.ncut:.3f}" in row  # n-cut and its null with the same 3 decimals
    assert f"{report.baseline.mean:.3f} ± {report.baseline.std:.3f}" in row
    assert f"{report.baseline.diff:+.3f} ({report.baseline.rel_diff * 100:+.2f}%)" in row
    assert f"{report.baseline.z_score:+.2f}" in row and f"{report.baseline.p_value:.3f}" in row
    assert str(report.nodes.clustered) in row
    assert "'model.' was removed" in result.stdout

    written = ClusterabilityReport.from_json((out / "report.json").read_text())
    assert written.ncut == report.ncut
    assert [layer.name for layer in written.layers] == ["input", "0", "2", "4"]
    assert written.config["layers"] == ["0", "2", "4"]
    for image in ("adjacency.png", "cluster_matrix.png", "composition.png"):
        assert (out / image).read_bytes().startswith(PNG)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_compare_sorts_local_checkpoints_by_z_and_writes_csv_and_plot(tmp_path: Path) -> None:
    torch.save(mlp().state_dict(), tmp_path / "dense.pt")
    torch.save(modular_mlp().state_dict(), tmp_path / "modular.pt")
    result = cli(
        "compare",
        "dense.pt",
        "modular.pt",
        *FAST,
        "--csv",
        "ranking.csv",
        "--plot",
        "ranking.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "ranking.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["source"] for row in rows] == ["modular.pt", "dense.pt"]
    assert [int(row["rank"]) for row in rows] == [1, 2]
    z = [float(row["z_score"]) for row in rows]
    assert z == sorted(z) and z[0] < -2
    assert float(rows[0]["ncut"]) == expected(modular_mlp().state_dict()).ncut
    assert (tmp_path / "ranking.png").read_bytes().startswith(PNG)
    assert result.stdout.index("modular.pt") < result.stdout.index("dense.pt")


# --------------------------------------------------------------------------------- safety


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("payload", [_System, _Exec], ids=["os.system", "exec"])
def test_a_malicious_pickle_is_not_run_and_the_error_names_trust_pickle(
    tmp_path: Path, payload: type
) -> None:
    marker = tmp_path / "pwned"
    torch.save(payload(marker), tmp_path / "model.pt")
    result = cli("audit", "model.pt", *FAST, cwd=tmp_path)
    assert result.returncode == 3
    assert "--trust-pickle" in one_error_line(result)
    assert not marker.exists(), "the pickle's payload ran"


def test_a_pickled_module_is_audited_from_its_weights_unless_trusted(tmp_path: Path) -> None:
    pickled_net(tmp_path)  # net.pt, pickled as netdef.Net
    env = {"PYTHONPATH": str(tmp_path)}

    weights_only = cli("audit", "net.pt", *FAST, "--json", cwd=tmp_path, env=env)
    assert weights_only.returncode == 0, weights_only.stderr
    assert not (tmp_path / "imported").exists(), "the model's module was imported"
    (chain,) = json_reports(weights_only.stdout)
    assert "without its code" in chain.config["source_format"]

    trusted = cli("audit", "net.pt", *FAST, "--json", "--trust-pickle", cwd=tmp_path, env=env)
    assert trusted.returncode == 0, trusted.stderr
    assert (tmp_path / "imported").exists()  # the user's explicit choice
    (traced,) = json_reports(trusted.stdout)
    assert [layer.name for layer in traced.layers] == ["input", "fc1", "fc2", "out"]
    assert traced.ncut == chain.ncut


# ------------------------------------------------------------------------ user mistakes

# The mistakes of the issue, each through the installed script in its own process.
# name: (arguments, expected exit code, a phrase of the message)
MISTAKES: dict[str, tuple[list[str], int, str]] = {
    "missing file": (["audit", "nope.pt"], 3, "no such file"),
    "corrupt file": (["audit", "corrupt.pt"], 3, "corrupt"),
    "unknown scheme": (["audit", "s3://bucket/model.pt"], 3, "unknown source scheme"),
    "wrong layer name": (["audit", "good.pt", "--layers", "0,9"], 4, "Available layers"),
    "bad option value": (["audit", "good.pt", "--shuffles", "1"], 2, "--shuffles 1"),
    "unreachable server": (
        ["audit", "runs:/0a1b2c/model", "--tracking-uri", "http://127.0.0.1:{port}"],
        5,
        "cannot reach the MLflow server",
    ),
    "unreachable wandb": (["audit", "wandb-artifact://team/proj/model:v1"], 5, "W&B"),
    # closed option values: refused as the command line is read, before any source is (a
    # missing file would be exit 3)
    "unknown method": (["audit", "missing.pt", "--method", "shuffle"], 2, "--method"),
    "unknown norm": (["audit", "missing.pt", "--norm", "l3"], 2, "--norm"),
    "unknown backend": (["audit", "missing.pt", "--backend", "ray"], 2, "--backend"),
    "unknown preset": (["compare", "missing.pt", "--preset", "paper"], 2, "'paper' is not one of"),
}

# More mistakes, through the same Typer app in this process (no interpreter start-up each).
IN_PROCESS_MISTAKES: dict[str, tuple[list[str], int, str]] = {
    "nan weights": (["audit", "nan.pt"], 4, "NaN"),
    "dict without weights": (["audit", "meta.pt"], 3, "without a model's weights"),
    "k above nodes": (["audit", "good.pt", "--k", "500"], 2, "k=500"),
    "scheduler without dask": (["audit", "good.pt", "--scheduler", "tcp://h:1"], 2, "dask"),
    "random_init on weights": (["audit", "good.pt", "--method", "random_init"], 2, "random_init"),
    "log-to-run on a file": (["audit", "good.pt", "--log-to-run"], 2, "--log-to-run"),
    "step without log-to-run": (["audit", "good.pt", "--step", "3"], 2, "--step"),
    "compare without sources": (["compare"], 2, "--experiment"),
    "host:port without http": (
        ["audit", "runs:/0a1b2c/model", "--tracking-uri", "127.0.0.1:5123"],
        2,
        "write http://127.0.0.1:5123",
    ),
    "no mlflow store": (["audit", "runs:/0a1b2c/model"], 5, "no MLflow store"),
    "malformed wandb uri": (["audit", "wandb-artifact://team/model"], 3, "malformed W&B"),
}


def mistake_files(folder: Path) -> None:
    torch.save(mlp().state_dict(), folder / "good.pt")
    (folder / "corrupt.pt").write_bytes(b"PK\x03\x04" + bytes(range(200)))
    torch.save({"epoch": 3, "lr": 0.1}, folder / "meta.pt")
    broken = mlp().state_dict()
    broken["2.weight"][0, 0] = float("nan")
    torch.save(broken, folder / "nan.pt")


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every mistake of :data:`MISTAKES`, run at once (two at a time) in one folder."""
    folder = tmp_path_factory.mktemp("mistakes")
    mistake_files(folder)
    port = str(free_port())
    env = {
        "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_CONFIG_DIR": str(folder),
        "HOME": str(folder),
    }

    def run(name: str) -> subprocess.CompletedProcess[str]:
        arguments, _, _ = MISTAKES[name]
        filled = [argument.replace("{port}", port) for argument in arguments]
        # A hang would fail the test at the timeout: every platform error must come in seconds.
        return cli(*filled, "--jobs", "1", cwd=folder, env=env, timeout=120)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(MISTAKES, pool.map(run, MISTAKES), strict=True))
    return {"results": results, "folder": folder}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_each_mistake_is_one_line_on_stderr_and_its_exit_code(
    mistakes: dict[str, Any], name: str
) -> None:
    _, code, phrase = MISTAKES[name]
    result = mistakes["results"][name]
    assert result.returncode == code, (result.returncode, result.stderr)
    assert code in EXIT_CODES
    assert phrase in one_error_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize("name", list(IN_PROCESS_MISTAKES))
def test_more_mistakes_are_one_line_and_their_exit_code(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cluster_tracking.cli.app import app

    arguments, code, phrase = IN_PROCESS_MISTAKES[name]
    mistake_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(variable, raising=False)
    command, *options = arguments
    result = CliRunner().invoke(app, [command, *FAST, *options], env={"COLUMNS": "150"})
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert result.stdout == ""
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_badly_typed_option_is_typers_usage_error_exit_2(tmp_path: Path) -> None:
    result = cli("audit", "model.pt", "--shuffles", "many", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--shuffles" in result.stderr


def test_help_is_the_manual() -> None:
    from typer.testing import CliRunner

    from cluster_tracking.cli.app import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "150"})
    assert top.exit_code == 0
    for code, meaning in EXIT_CODES.items():
        assert f"{code}" in top.output, meaning
    manual = {
        "audit": [
            "--k",
            "--shuffles",
            "--method",
            "--seed",
            "--jobs",
            "--backend",
            "--scheduler",
            "--layers",
            "--norm",
            "--preset",
            "--json",
            "--out",
            "--log-to-run",
            "--step",
            "--trust-pickle",
            "--tracking-uri",
        ],
        "compare": ["--experiment", "--csv", "--plot", "--json", "--log-to-run", "--k"],
    }
    for command, options in manual.items():
        page = runner.invoke(app, [command, "--help"], env={"COLUMNS": "150"})
        assert page.exit_code == 0
        assert "Examples" in page.output and f"cluster-tracking {command}" in page.output
        for option in options:
            assert option in page.output, (command, option)


def test_closed_option_values_are_listed_in_help_and_match_the_package() -> None:
    from typer.testing import CliRunner

    from cluster_tracking.audit.settings import _BACKENDS
    from cluster_tracking.cli.app import app
    from cluster_tracking.cli.options import Backend, Norm, NullMethod, Preset
    from cluster_tracking.config import NULL_METHODS, PRESETS

    assert tuple(m.value for m in NullMethod) == NULL_METHODS
    assert tuple(p.value for p in Preset) == PRESETS
    assert {b.value for b in Backend} == set(_BACKENDS)
    assert [n.value for n in Norm] == ["l1", "l2"]
    page = CliRunner().invoke(app, ["audit", "--help"], env={"COLUMNS": "500"})
    assert page.exit_code == 0
    text = re.sub(r"[\s│]+", "", page.output)  # the page without its wrapping and box lines
    for listed in (NULL_METHODS, PRESETS, ("l1", "l2"), ("loky", "threading", "multiprocessing")):
        assert "|".join(listed) in text, listed
    assert "thepaper'sprocedureexactly" in text and "Graphconventions" not in text
    for long, short in (("--k", "-k"), ("--shuffles", "-n"), ("--jobs", "-j"), ("--out", "-o")):
        assert f"{long}{short}" in text, short


def test_short_options_work_like_the_long_ones(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from cluster_tracking.cli.app import app

    source = str(checkpoints["state_dict"])
    page = CliRunner().invoke(
        app, ["audit", source, "-k", "3", "-n", "6", "-j", "1", "-o", str(tmp_path), "--json"]
    )
    assert page.exit_code == 0, page.output
    (report,) = json_reports(page.stdout)
    assert report.k == 3 and report.config["shuffles"] == 6
    assert report.ncut == expected(torch.load(source, weights_only=True)).ncut
    assert (tmp_path / "report.json").is_file() and (tmp_path / "cluster_matrix.png").is_file()


def test_output_piped_to_a_file_is_not_wrapped_at_80_columns(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / ("a-model-with-a-long-descriptive-name-" + "x" * 60 + ".pt")
    shutil.copyfile(checkpoints["state_dict"], source)
    script = Path(sys.executable).with_name("cluster-tracking")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    with open(tmp_path / "out.txt", "w") as handle:  # a file: not a terminal
        result = subprocess.run(
            [str(script), "audit", str(source), *FAST],
            cwd=tmp_path,
            env=env,
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            timeout=240,
        )
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out.txt").read_text().splitlines()
    (row,) = [line for line in lines if source.name in line and "│" in line]  # whole, one line
    assert len(row) > 120 and "± " in row and "%)" in row  # n-cut, null, diff in the same row
    assert any("diff = n-cut - null mean" in line for line in lines)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SourceError("missing"), 3),
        (PlatformError("down"), 5),
        (GraphError("no layers"), 4),
        (ConfigError("bad k"), 2),
        (SinkError("mlflow not installed"), 5),
        (RuntimeError("a bug"), 1),
    ],
)
def test_each_error_kind_has_its_documented_exit_code(error: Exception, code: int) -> None:
    assert exit_code(error) == code and code in EXIT_CODES


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (AuditSettings(k=1), "at least 2 clusters"),
        (AuditSettings(shuffles=1), "--shuffles 1"),
        (AuditSettings(shuffles=-3), "--shuffles -3"),
        (AuditSettings(method="nope"), "--method"),
        (AuditSettings(seed=-1), "--seed"),
        (AuditSettings(backend="spark"), "--backend"),
        (AuditSettings(scheduler="tcp://h:1"), "--backend dask"),
        (AuditSettings(preset="filan2021", norm="l2"), "--norm"),
    ],
)
def test_settings_are_checked_before_any_source_is_read(settings: AuditSettings, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        settings.check()


def test_k_and_layers_options_are_parsed() -> None:
    assert parse_k("12") == 12 and parse_k("AUTO") == "auto"
    with pytest.raises(ConfigError):
        parse_k("twelve")
    assert parse_layers(["0,2", " 4 "]) == ("0", "2", "4")
    assert parse_layers(None) is None
    with pytest.raises(ConfigError):
        parse_layers([","])


# --------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    served = MlflowServer(tmp_path_factory.mktemp("audit-mlflow"))
    served.start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def logged(server: MlflowServer) -> dict[str, Any]:
    """An experiment of four runs: a state_dict artifact (with metrics, params and a previous
    audit), a logged model (torch.export, registered as audit-mlp v1 @champion), a logged model
    pickled whole (a modular MLP), and a run without a model."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.uri)
    try:
        # an explicit experiment id: set_experiment would leak MLFLOW_EXPERIMENT_ID to later tests
        experiment_id = MlflowClient(server.uri).create_experiment("audit-tests")
        with mlflow.start_run(experiment_id=experiment_id, run_name="state-dict") as state_run:
            mlflow.log_params({"lr": "0.1", "epochs": "6"})
            for step in range(6):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            mlflow.pytorch.log_state_dict(mlp(0).state_dict(), "weights")
            mlflow.log_text("an earlier audit", "clusterability/audit/report.json")
            mlflow.log_text("keep me", "notes.txt")
        with mlflow.start_run(experiment_id=experiment_id, run_name="exported") as exported_run:
            mlflow.pytorch.log_model(
                mlp(2),
                name="model",
                input_example=np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32),
                pip_requirements=["torch"],
                registered_model_name="audit-mlp",
            )
        with mlflow.start_run(experiment_id=experiment_id, run_name="pickled") as pickled_run:
            mlflow.pytorch.log_model(
                modular_mlp(),
                name="model",
                serialization_format="pickle",
                pip_requirements=["torch"],
            )
        with mlflow.start_run(experiment_id=experiment_id, run_name="no-model") as empty_run:
            mlflow.log_metric("loss", 1.0)
        MlflowClient(server.uri).set_registered_model_alias("audit-mlp", "champion", "1")
    finally:
        mlflow.set_tracking_uri(previous)
    return {
        "uri": server.uri,
        "experiment": experiment_id,
        "experiment_name": "audit-tests",
        "state": state_run.info.run_id,
        "exported": exported_run.info.run_id,
        "pickled": pickled_run.info.run_id,
        "empty": empty_run.info.run_id,
    }


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, folder):
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


@pytest.mark.slow
def test_log_to_run_adds_metrics_and_artifacts_and_touches_nothing_else(
    logged: dict[str, Any], tmp_path: Path
) -> None:
    client = MlflowClient(logged["uri"])
    run_id = logged["state"]
    before = client.get_run(run_id)
    artifacts_before = artifact_paths(client, run_id)

    source = f"runs:/{run_id}/weights"
    result = cli(
        "audit",
        source,
        *FAST,
        "--json",
        "--log-to-run",
        "--tracking-uri",
        logged["uri"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (report,) = json_reports(result.stdout)
    assert report.ncut == expected(mlp(0).state_dict()).ncut
    assert report.config["source"] == source

    after = client.get_run(run_id)
    for key, value in report.metrics().items():
        (metric,) = client.get_metric_history(run_id, key)
        assert metric.value == value
        assert metric.step == 5  # the run's last logged step
    assert set(report.metrics()) == set(METRIC_KEYS)
    assert after.data.params == before.data.params  # no params written

    artifacts_after = artifact_paths(client, run_id)
    assert artifacts_before <= artifacts_after
    added = artifacts_after - artifacts_before
    assert added == {  # the previous audit's folder was taken
        f"clusterability/audit-2/{name}"
        for name in (
            "report.json",
            "adjacency.png",
            "cluster_matrix.png",
            "composition.png",
            "report.html",
            "audit.json",
        )
    }
    download = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path="clusterability",
            dst_path=str(tmp_path / "dl"),
            tracking_uri=logged["uri"],
        )
    )
    assert (download / "audit" / "report.json").read_text() == "an earlier audit"
    logged_report = ClusterabilityReport.from_json(
        (download / "audit-2" / "report.json").read_text()
    )
    assert logged_report.ncut == report.ncut
    info = json.loads((download / "audit-2" / "audit.json").read_text())
    assert info["source"] == source and info["step"] == 5


@pytest.mark.slow
def test_a_logged_model_is_audited_by_run_by_version_and_by_alias(
    logged: dict[str, Any], tmp_path: Path
) -> None:
    sources = [
        f"runs:/{logged['exported']}/model",
        "models:/audit-mlp/1",
        "models:/audit-mlp@champion",
        f"runs:/{logged['pickled']}",  # the run's model: pickled whole, read without its code
    ]
    result = cli(
        "audit", *sources, *FAST, "--json", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": logged["uri"]}
    )
    assert result.returncode == 0, result.stderr
    exported_run, version, alias, pickled = json_reports(result.stdout)
    reference = expected(mlp(2).state_dict())
    for report in (exported_run, version, alias):
        assert report.ncut == reference.ncut
        assert "torch.export" in report.config["source_format"]
    assert pickled.ncut == expected(modular_mlp().state_dict()).ncut
    assert "without its code" in pickled.config["source_format"]


@pytest.mark.slow
def test_log_to_run_of_a_registered_model_goes_to_its_source_run_at_a_given_step(
    logged: dict[str, Any], tmp_path: Path
) -> None:
    result = cli(
        "audit",
        "models:/audit-mlp@champion",
        *FAST,
        "--log-to-run",
        "--step",
        "7",
        "--tracking-uri",
        logged["uri"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "logged to MLflow run exported" in result.stdout
    client = MlflowClient(logged["uri"])
    (metric,) = client.get_metric_history(logged["exported"], "clusterability/ncut")
    assert metric.step == 7 and metric.value == expected(mlp(2).state_dict()).ncut
    assert "clusterability/audit/report.json" in artifact_paths(client, logged["exported"])


@pytest.mark.slow
def test_a_run_without_a_model_and_a_missing_artifact_are_exit_3(
    logged: dict[str, Any], tmp_path: Path
) -> None:
    env = {"MLFLOW_TRACKING_URI": logged["uri"]}
    cases = {
        f"runs:/{logged['empty']}": "has no logged model",
        f"runs:/{logged['state']}/nothing": "no such artifact",
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda source: cli("audit", source, *FAST, cwd=tmp_path, env=env), cases)
    for (source, phrase), result in zip(cases.items(), results, strict=True):
        assert result.returncode == 3, (source, result.stderr)
        assert phrase in one_error_line(result), source


@pytest.mark.slow
def test_compare_an_experiment_ranks_its_runs_by_z(logged: dict[str, Any], tmp_path: Path) -> None:
    result = cli(
        "compare",
        "--experiment",
        "audit-tests",
        *FAST,
        "--csv",
        "runs.csv",
        "--plot",
        "runs.png",
        "--tracking-uri",
        logged["uri"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "runs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3  # the run without a model is listed, not audited
    assert "no-model" in result.stdout
    z = [float(row["z_score"]) for row in rows]
    assert z == sorted(z)
    assert rows[0]["label"].startswith("pickled")  # the modular MLP
    expected_ncut = {
        "state-dict": expected(mlp(0).state_dict()).ncut,
        "exported": expected(mlp(2).state_dict()).ncut,
        "pickled": expected(modular_mlp().state_dict()).ncut,
    }
    for row in rows:
        assert float(row["ncut"]) == expected_ncut[row["label"].split(" ")[0]]
    assert (tmp_path / "runs.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_compare_skips_logged_models_that_are_not_ready(
    server: MlflowServer, tmp_path: Path
) -> None:
    """A FAILED logged model (its log_model raised) has no complete files: compare leaves it
    out with a note, audits the runs' other models and exits 0."""
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient(server.uri)
    experiment_id = client.create_experiment("failed-models")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.uri)
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name="good") as good:
            mlflow.pytorch.log_model(
                mlp(2),
                name="model",
                input_example=np.zeros((2, 8), dtype=np.float32),
                pip_requirements=["torch"],
            )
        with mlflow.start_run(experiment_id=experiment_id, run_name="weights-and-failed") as mixed:
            mlflow.pytorch.log_state_dict(mlp(0).state_dict(), "weights")
        with mlflow.start_run(experiment_id=experiment_id, run_name="only-failed") as failed:
            pass
    finally:
        mlflow.set_tracking_uri(previous)
    for run in (mixed, failed):  # newer than the run's other models, as a last log_model is
        model = client.create_logged_model(
            experiment_id, name="broken", source_run_id=run.info.run_id
        )
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    result = cli(
        "compare",
        "--experiment",
        "failed-models",
        *FAST,
        "--csv",
        "ranking.csv",
        "--tracking-uri",
        server.uri,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower() and "Traceback" not in result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and all("is FAILED, not READY; skipped" in n for n in notes), notes
    with open(tmp_path / "ranking.csv", newline="") as handle:
        rows = {row["label"].split(" ")[0]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"good", "weights-and-failed"}
    assert rows["good"]["source"].startswith("models:/m-")
    assert rows["weights-and-failed"]["source"].startswith(f"runs:/{mixed.info.run_id}/weights/")
    assert float(rows["good"]["ncut"]) == expected(mlp(2).state_dict()).ncut
    assert float(rows["weights-and-failed"]["ncut"]) == expected(mlp(0).state_dict()).ncut
    assert "only-failed" in result.stdout  # listed among the runs without a model
    assert good.info.run_id and failed.info.run_id


# ------------------------------------------------------------------------------------ W&B


def test_log_to_a_wandb_run_writes_metrics_and_a_new_artifact_version(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The W&B write-back, in offline mode (no W&B server here): the run that logged the model
    gets the metrics and an artifact ``clusterability-audit-<run id>`` holding the files.
    Fetching a ``wandb-artifact://`` source and resuming a run on a server are not tested."""
    from _wandb_offline import find_run_dir, offline_wandb, read_offline_run

    from cluster_tracking.audit.run import audit_source
    from cluster_tracking.audit.sources import RunTarget
    from cluster_tracking.audit.writeback import log_to_run

    result = audit_source(str(checkpoints["state_dict"]), AuditSettings(k=3, shuffles=6, jobs=1))
    result.loaded.run = RunTarget(
        platform="wandb", run_id="audited1", project="cluster-tracking-tests", label="audited1"
    )
    with offline_wandb(tmp_path, monkeypatch):
        where = log_to_run(result)
    assert "audited1" in where
    offline = read_offline_run(find_run_dir(tmp_path, "audited1"))
    (row,) = offline.rows_with("clusterability/ncut")
    for key, value in result.report.metrics().items():
        assert row[key] == pytest.approx(value)
    (artifact,) = offline.artifacts_named("clusterability-audit-audited1")
    assert artifact.type == "clusterability-audit"
    assert set(artifact.files) == {*BUNDLE, "audit.json"}
    written = ClusterabilityReport.from_json(artifact.files["report.json"].read_text())
    assert written.ncut == result.report.ncut
    assert artifact.metadata["source"] == str(checkpoints["state_dict"])
