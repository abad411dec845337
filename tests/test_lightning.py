"""The Lightning callback: what lands in the run of the trainer's own logger.

Real components only: a real ``lightning.Trainer`` on the CPU training a small LightningModule for
two epochs of four steps, a real ``MLFlowLogger`` on a local SQLite store, a real ``WandbLogger``
in offline mode (read back with :mod:`_wandb_offline`), real DDP with two CPU processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import wandb
from _wandb_offline import find_run_dir, offline_wandb, read_offline_run
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cluster_tracking.errors import ClusterTrackingWarning, ConfigError, GraphError
from cluster_tracking.integrations.lightning import ClusterabilityCallback
from cluster_tracking.integrations.wandb import STEP_METRIC
from cluster_tracking.report import METRIC_KEYS, SUMMARY_ARTIFACTS, ClusterabilityReport
from cluster_tracking.tracking.sinks import LocalDirectorySink

REPO = Path(__file__).resolve().parents[1]
FAST: dict[str, Any] = {"k": 3, "shuffles": 4, "n_jobs": 1, "seed": 1, "on_backlog": "queue"}
STEPS_PER_EPOCH = 4  # 32 samples in batches of 8


class Classifier(L.LightningModule):
    """A 3-layer MLP on 8 features, 4 classes; the network is ``self.model``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Untraceable(Classifier):
    """Data-dependent control flow: torch.fx cannot trace the forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.model(x)
        return self.model(-x)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=generator), torch.randint(0, 4, (32,)))
    return DataLoader(data, batch_size=8)


def trainer(root: Path, callback: ClusterabilityCallback, **options: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "default_root_dir": str(root),
        "callbacks": [callback],
        **options,
    }
    return L.Trainer(**settings)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own: nothing (``mlruns``, ``lightning_logs``) escapes it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def mlflow_logger(root: Path) -> MLFlowLogger:
    return MLFlowLogger(
        experiment_name="lightning",
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        artifact_location=str(root / "artifacts"),
    )


def assert_mlflow_run_holds(
    client: MlflowClient, run_id: str, reports: list[ClusterabilityReport], tmp: Path
) -> None:
    """Every metric of every report once, at its step; the per-step and summary artifacts."""
    for key in METRIC_KEYS:
        history = client.get_metric_history(run_id, key)
        assert Counter(m.step for m in history) == Counter(r.step for r in reports), key
        assert {m.step: m.value for m in history} == pytest.approx(
            {r.step: r.metrics()[key] for r in reports}
        )
    local = Path(client.download_artifacts(run_id, "clusterability", str(tmp)))
    for report in reports:
        saved = json.loads((local / f"step-{report.step}" / "report.json").read_text())
        assert saved["ncut"] == pytest.approx(report.ncut)
    for name in SUMMARY_ARTIFACTS:
        assert (local / name).is_file(), name
    summary = json.loads((local / "summary.json").read_text())
    assert summary["steps"] == [r.step for r in reports]


def test_mlflow_logger_run_gets_the_metrics_at_the_global_steps_and_the_summary(
    root: Path,
) -> None:
    logger = mlflow_logger(root)
    callback = ClusterabilityCallback(every_n_epochs=1, at_end=False, **FAST)
    fit = trainer(root, callback, logger=logger, enable_checkpointing=False)
    fit.fit(Classifier(), loader())

    # One measurement after each epoch, at the global step the epoch ended on.
    assert [r.step for r in callback.reports] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert callback.tracker is not None and callback.tracker.closed
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("lightning")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [logger.run_id], "exactly one run: the logger's"
    run = runs[0]
    assert run.info.status == "FINISHED"  # Lightning finalised it, after the summary was logged
    assert "train_loss" in run.data.metrics  # the trainer's own metrics share the run
    assert run.data.params["clusterability.k"] == "3"
    assert run.data.params["clusterability.every_n_epochs"] == "1"
    assert_mlflow_run_holds(client, logger.run_id, callback.reports, root / "download")
    # The whole LightningModule was traced: layers named as its modules.
    assert [layer.name for layer in callback.reports[0].layers] == [
        "input",
        "model.0",
        "model.2",
        "model.4",
    ]


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An offline W&B environment in ``tmp_path``: no login, no network, no git, no stats."""
    monkeypatch.chdir(tmp_path)
    with offline_wandb(tmp_path / "wandb-home", monkeypatch) as home:
        yield home


def test_wandb_logger_run_gets_step_checkpoint_and_final_measurements(wandb_dir: Path) -> None:
    logger = WandbLogger(
        project="cluster-tracking-tests",
        save_dir=str(wandb_dir),
        offline=True,
        settings=wandb.Settings(
            x_disable_stats=True, x_disable_meta=True, console="off", disable_git=True
        ),
    )
    callback = ClusterabilityCallback(every_n_steps=3, **FAST)
    # The default ModelCheckpoint saves after each epoch: global steps 4 and 8.
    fit = trainer(wandb_dir.parent, callback, logger=logger)
    fit.fit(Classifier(), loader())
    run_id = logger.experiment.id
    logger.experiment.finish()

    # Steps 0, 3, 6 by the schedule; 4 and 8 by the checkpoints (8 is also the end).
    steps = [0, 3, 4, 6, 8]
    assert [r.step for r in callback.reports] == steps
    runs = list(wandb_dir.glob("**/offline-run-*"))
    assert len(runs) == 1, f"exactly one W&B run, got {runs}"
    offline = read_offline_run(find_run_dir(wandb_dir, run_id))
    for key in METRIC_KEYS:
        expected = {
            r.step: r.metrics()[key] for r in callback.reports if r.metrics().get(key) is not None
        }
        assert offline.series(key, STEP_METRIC) == pytest.approx(expected), key
    assert offline.rows_with("train_loss"), "the trainer's own metrics share the run"
    assert offline.config["clusterability.k"] == 3
    assert offline.summary["clusterability/final_step"] == 8
    summary = offline.artifacts_named(f"clusterability-summary-{run_id}")
    assert len(summary) == 1
    assert {f"clusterability/{name}" for name in SUMMARY_ARTIFACTS} <= set(summary[0].files)


def test_module_and_layer_pattern_select_the_graph_and_a_local_folder_is_the_fallback(
    root: Path,
) -> None:
    # No logger: the artifacts go to <log_dir>/clusterability. Default schedule: every
    # checkpoint (after each epoch) and the end.
    callback = ClusterabilityCallback(module="model", layers="[0-9]", **FAST)
    fit = trainer(root, callback, logger=False)
    fit.fit(Classifier(), loader())

    assert callback.selected_layers == ["0", "2", "4"]
    assert [r.step for r in callback.reports] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert [layer.name for layer in callback.reports[0].layers] == ["input", "0", "2", "4"]
    local = LocalDirectorySink(root)
    assert [r.step for r in local.read_reports()] == [4, 8]
    assert json.loads((root / "params.json").read_text())["clusterability.layers"] == "0,2,4"
    for name in SUMMARY_ARTIFACTS:
        assert (root / "clusterability" / name).is_file(), name
    assert not (root / "clusterability" / "clusterability").exists()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"layers": ["model.0", "model.9"]}, GraphError, "'model.9', which is not a module"),
        ({"layers": "*.attention.*"}, GraphError, "matches no nn.Linear/nn.Conv module"),
        ({"layers": ["model.2", "model.0"]}, GraphError, "the layers do not chain"),
        ({"module": "backbone"}, ConfigError, "has no attribute 'backbone'"),
    ],
)
def test_a_bad_selection_stops_fit_before_the_first_step(
    root: Path, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    callback = ClusterabilityCallback(every_n_steps=1, **FAST, **options)
    fit = trainer(root, callback, logger=False)
    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=message) as raised:
        fit.fit(model, loader())
    assert "ClusterabilityCallback" in str(raised.value)
    if "model.9" in str(options) or "attention" in str(options):  # the candidates are listed
        assert "Linear/Conv layers: 'model.0', 'model.2', 'model.4'" in str(raised.value) or (
            "Linear/Conv modules: 'model.0', 'model.2', 'model.4'" in str(raised.value)
        )
    assert fit.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert callback.tracker is None


def test_a_model_without_a_graph_warns_once_and_training_goes_on(root: Path) -> None:
    callback = ClusterabilityCallback(every_n_steps=1, **FAST)
    fit = trainer(root, callback, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(Untraceable(), loader())
    ours = [w for w in caught if issubclass(w.category, ClusterTrackingWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    text = str(ours[0].message)
    assert "cannot be built" in text and "layers=" in text and "module=" in text
    assert "'model.0'" in text  # the candidates are listed
    assert fit.global_step == 2 * STEPS_PER_EPOCH  # training ran to the end
    assert callback.tracker is None and callback.reports == []
    assert not (root / "clusterability").exists()


class TinyLlamaLM(L.LightningModule):
    """A 2-layer Llama-style causal LM (gated MLP, grouped-query attention) as ``self.model``."""

    def __init__(self) -> None:
        super().__init__()
        from _tiny_models import tiny_llama

        self.model = tiny_llama()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.slow
def test_a_whole_llama_is_measured_without_layers(root: Path) -> None:
    from cluster_tracking.graph import weight_graph

    tokens = torch.randint(0, 50, (32, 12), generator=torch.Generator().manual_seed(0))
    callback = ClusterabilityCallback(module="model", every_n_steps=4, **FAST)
    fit = trainer(root, callback, logger=False)
    module = TinyLlamaLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(module, DataLoader(TensorDataset(tokens), batch_size=8))
    assert not [w for w in caught if issubclass(w.category, ClusterTrackingWarning)]
    assert [r.step for r in callback.reports] == [0, 4, 8]
    final = weight_graph(module.model)
    layers = callback.reports[-1].layers
    assert [(layer.name, layer.width) for layer in layers] == list(
        zip(final.layer_names, final.widths, strict=True)
    )
    assert final.merged["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"


def test_options_are_checked_when_the_callback_is_created() -> None:
    with pytest.raises(ConfigError, match="k must be an integer >= 2"):
        ClusterabilityCallback(k=1)
    with pytest.raises(ConfigError, match="every_n_steps must be a positive integer"):
        ClusterabilityCallback(every_n_steps=0)
    with pytest.raises(ConfigError, match="rank is set by the callback"):
        ClusterabilityCallback(rank=1)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'shufles'"):
        ClusterabilityCallback(shufles=4)
    with pytest.raises(ConfigError, match="selects no layer"):
        ClusterabilityCallback(layers="")
    with pytest.raises(ConfigError, match="selects no layer"):
        ClusterabilityCallback(layers=[])


@pytest.mark.slow
def test_under_ddp_only_rank_zero_measures_and_logs(root: Path) -> None:
    """Two CPU processes (gloo): one run, every measured step logged once."""
    logger = mlflow_logger(root)
    MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments()  # create the store once
    callback = ClusterabilityCallback(every_n_steps=1, **FAST)
    fit = trainer(root, callback, logger=logger, devices=2, strategy="ddp_spawn")
    fit.fit(Classifier(), loader())

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lightning").experiment_id])
    assert len(runs) == 1
    # Each rank sees 16 samples: 2 steps per epoch, global steps 0..4.
    for key in ("clusterability/ncut", "clusterability/z_score"):
        steps = Counter(m.step for m in client.get_metric_history(runs[0].info.run_id, key))
        assert steps == Counter(range(5)), key
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "clusterability")}
    assert {f"clusterability/{name}" for name in SUMMARY_ARTIFACTS} <= artifacts


def test_without_lightning_the_callback_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['lightning.pytorch'] = None\n"
        "from cluster_tracking.integrations.lightning import ClusterabilityCallback\n"
        "try:\n"
        "    ClusterabilityCallback()\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'cluster-tracking[lightning]'" in done.stdout
