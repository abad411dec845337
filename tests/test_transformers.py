"""The Hugging Face callback: what lands in the run the ``Trainer`` reports to.

Real components only: a real ``transformers.Trainer`` on the CPU training tiny randomly initialised
models built here (a 2-layer BERT from a ``BertConfig``, a small custom ``PreTrainedModel``; no hub
download) for a few steps on a synthetic dataset, with Hugging Face's own ``MLflowCallback`` on a
local SQLite store and its ``WandbCallback`` in W&B's offline mode (read back with
:mod:`_wandb_offline`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import transformers
import wandb
from _tiny_models import tiny_gpt2, tiny_llama
from _wandb_offline import find_run_dir, offline_wandb, read_offline_run
from mlflow import MlflowClient
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from cluster_tracking.errors import ClusterTrackingWarning, ConfigError, GraphError
from cluster_tracking.graph import weight_graph
from cluster_tracking.integrations.transformers import (
    ClusterabilityTrainerCallback,
    select_layers,
)
from cluster_tracking.integrations.wandb import STEP_METRIC
from cluster_tracking.report import METRIC_KEYS, SUMMARY_ARTIFACTS
from cluster_tracking.tracking.sinks import LocalDirectorySink

REPO = Path(__file__).resolve().parents[1]
FAST: dict[str, Any] = {"k": 3, "shuffles": 4, "n_jobs": 1, "seed": 1, "on_backlog": "queue"}
#: The MLP blocks of every BERT layer (``[0-9]`` keeps ``attention.output.dense`` out).
BERT_MLP = "*.intermediate.dense|*[0-9].output.dense"
BERT_MLP_LAYERS = [
    "bert.encoder.layer.0.intermediate.dense",
    "bert.encoder.layer.0.output.dense",
    "bert.encoder.layer.1.intermediate.dense",
    "bert.encoder.layer.1.output.dense",
]


def tiny_bert() -> PreTrainedModel:
    """A randomly initialised 2-layer BERT classifier: hidden 16, MLP 32, vocabulary 50."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return transformers.AutoModelForSequenceClassification.from_config(config)


def token_data(n: int = 32) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 50, (12,), generator=generator), "labels": i % 2}
        for i in range(n)
    ]


class TinyConfig(PretrainedConfig):
    model_type = "cluster-tracking-tiny-mlp"

    def __init__(self, n_features: int = 8, hidden: int = 16, **kwargs: Any) -> None:
        self.n_features = n_features
        self.hidden = hidden
        super().__init__(**kwargs)


class TinyMLP(PreTrainedModel):
    """A custom ``PreTrainedModel``: an MLP ``body`` and a loss in ``forward``."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.body = nn.Sequential(
            nn.Linear(config.n_features, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, 4),
        )
        self.post_init()

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        logits = self.body(features)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def feature_data(n: int = 32) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    return [{"features": torch.randn(8, generator=generator), "labels": i % 4} for i in range(n)]


def arguments(output_dir: Path, report_to: list[str], **overrides: Any) -> TrainingArguments:
    """Six steps of 8 examples (4 steps per epoch), a loss log every 2 steps, a checkpoint every
    3 steps."""
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "logging_steps": 2,
        "save_strategy": "steps",
        "save_steps": 3,
        "save_only_model": True,
        "report_to": report_to,
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(**settings)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own, and no hub access."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return tmp_path


@pytest.fixture
def mlflow_store(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` for HF's MLflowCallback: a SQLite
    store in the test's folder (the fluent API pointed there too: HF keeps a URI already set)."""
    uri = f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-trainer")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_mlflow_run_of_the_trainer_gets_the_metrics_at_its_global_steps(
    root: Path, mlflow_store: str
) -> None:
    callback = ClusterabilityTrainerCallback(every_n_steps=2, layers=BERT_MLP, **FAST)
    trainer = Trainer(
        model=tiny_bert(),
        args=arguments(root / "out", ["mlflow"]),
        train_dataset=token_data(),
        callbacks=[callback],
    )
    trainer.train()

    # Steps 0, 2, 4, 6 by the schedule; 3 and 6 by the checkpoints; 6 is also the end.
    assert [r.step for r in callback.reports] == [0, 2, 3, 4, 6]
    assert callback.selected_layers == BERT_MLP_LAYERS
    assert [layer.name for layer in callback.reports[0].layers] == ["input", *BERT_MLP_LAYERS]
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("hf-trainer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "exactly one run: the one HF's MLflowCallback started"
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"  # HF ended it before our summary: it still landed
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [2, 4, 6]
    assert run.data.params["learning_rate"]  # HF's own params share the run
    assert run.data.params["clusterability.layers"] == ",".join(BERT_MLP_LAYERS)
    for key in METRIC_KEYS:
        history = client.get_metric_history(run_id, key)
        assert Counter(m.step for m in history) == Counter(r.step for r in callback.reports)
        assert {m.step: m.value for m in history} == pytest.approx(
            {r.step: r.metrics()[key] for r in callback.reports}
        )
    local = Path(client.download_artifacts(run_id, "clusterability", str(root / "download")))
    for report in callback.reports:
        saved = json.loads((local / f"step-{report.step}" / "report.json").read_text())
        assert saved["ncut"] == pytest.approx(report.ncut)
    for name in SUMMARY_ARTIFACTS:
        assert (local / name).is_file(), name
    assert json.loads((local / "summary.json").read_text())["steps"] == [0, 2, 3, 4, 6]


@pytest.fixture
def wandb_dir(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An offline W&B environment for HF's WandbCallback: no login, no network, no git."""
    extra = {
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_X_DISABLE_META": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_PROJECT": "cluster-tracking-tests",
    }
    with offline_wandb(root / "wandb-home", monkeypatch, extra) as home:
        yield home


@pytest.mark.slow
def test_wandb_run_of_the_trainer_gets_the_metrics_at_its_global_steps(
    root: Path, wandb_dir: Path
) -> None:
    callback = ClusterabilityTrainerCallback(every_n_steps=2, layers=BERT_MLP, **FAST)
    trainer = Trainer(
        model=tiny_bert(),
        args=arguments(root / "out", ["wandb"]),
        train_dataset=token_data(),
        callbacks=[callback],
    )
    trainer.train()
    assert wandb.run is not None
    run_id = wandb.run.id
    wandb.run.finish()

    assert [r.step for r in callback.reports] == [0, 2, 3, 4, 6]
    runs = list(wandb_dir.glob("**/offline-run-*"))
    assert len(runs) == 1, f"exactly one W&B run, got {runs}"
    offline = read_offline_run(find_run_dir(wandb_dir, run_id))
    for key in METRIC_KEYS:
        expected = {
            r.step: r.metrics()[key] for r in callback.reports if r.metrics().get(key) is not None
        }
        assert offline.series(key, STEP_METRIC) == pytest.approx(expected), key
    assert offline.rows_with("train/loss"), "HF's own metrics share the run"
    assert offline.summary["clusterability/final_step"] == 6
    assert offline.artifacts_named(f"clusterability-summary-{run_id}")


def test_layer_patterns_pick_the_mlp_blocks_of_a_transformer() -> None:
    model = tiny_bert()
    assert select_layers(model, BERT_MLP) == BERT_MLP_LAYERS
    # A list keeps its order; each pattern's matches come in declaration order.
    assert select_layers(model, ["classifier", "*.layer.1.intermediate.dense"]) == [
        "classifier",
        "bert.encoder.layer.1.intermediate.dense",
    ]
    graph = weight_graph(model, layers=select_layers(model, BERT_MLP))
    assert graph.layer_names == ("input", *BERT_MLP_LAYERS)
    assert graph.widths == (16, 32, 16, 32, 16)  # hidden -> 4 x hidden -> hidden, twice


def test_a_selection_that_makes_no_graph_is_a_clear_error() -> None:
    model = tiny_bert()
    with pytest.raises(GraphError, match=r"'\*\.mlp\.fc1' matches no nn.Linear/nn.Conv") as error:
        select_layers(model, "*.mlp.fc1")
    assert "'bert.encoder.layer.0.attention.self.query'" in str(error.value)  # candidates
    with pytest.raises(ConfigError, match="holds an empty entry"):
        select_layers(model, "*.intermediate.dense|")
    with pytest.raises(ConfigError, match="layers must be a string"):
        select_layers(model, 3)  # type: ignore[arg-type]


def test_gpt2_conv1d_layers_are_read_in_their_own_layout() -> None:
    # transformers' Conv1D stores [in, out]: c_fc is 16 -> 64, c_proj 64 -> 16.
    gpt2 = tiny_gpt2()
    layers = select_layers(gpt2, "*.h.0.mlp.c_fc|*.h.0.mlp.c_proj")
    graph = weight_graph(gpt2, layers=layers)
    assert graph.widths == (16, 64, 16)
    fc = gpt2.transformer.h[0].mlp.c_fc.weight.detach().double().abs().numpy()
    dense = graph.adjacency.toarray()
    np.testing.assert_allclose(dense[16:80, 0:16], fc.T, rtol=1e-12)


def test_an_unknown_layer_stops_training_before_the_first_step(root: Path) -> None:
    callback = ClusterabilityTrainerCallback(
        every_n_steps=1, layers=["bert.encoder.layer.0.intermediate.dense", "bert.pooler"], **FAST
    )
    trainer = Trainer(
        model=tiny_bert(),
        args=arguments(root / "out", []),
        train_dataset=token_data(),
        callbacks=[callback],
    )
    with pytest.raises(GraphError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "ClusterabilityTrainerCallback(layers=" in message
    assert "'bert.pooler'" in message and "BertPooler" in message
    assert "'bert.encoder.layer.0.intermediate.dense'" in message  # the candidates are listed
    assert trainer.state.global_step == 0
    assert not list((root / "out").glob("checkpoint-*"))
    assert callback.tracker is None


def lm_data(n: int = 32) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 50, (12,), generator=generator) for _ in range(n)]
    return [{"input_ids": row, "labels": row} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_a_whole_transformer_is_measured_without_layers(
    root: Path, make: Callable[[], PreTrainedModel]
) -> None:
    model = make()
    callback = ClusterabilityTrainerCallback(every_n_steps=3, **FAST)
    trainer = Trainer(
        model=model,
        args=arguments(root / "out", [], save_strategy="no"),
        train_dataset=lm_data(),
        callbacks=[callback],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if issubclass(w.category, ClusterTrackingWarning)]
    assert [r.step for r in callback.reports] == [0, 3, 6]
    final = weight_graph(model)  # the trained model, traced again
    report = callback.reports[-1]
    assert [layer.name for layer in report.layers] == list(final.layer_names)
    assert [layer.width for layer in report.layers] == list(final.widths)
    assert any(".mlp." in name for name in final.layer_names)


class DataDependentMLP(TinyMLP):
    """A forward that branches on the values of its input: neither torch.fx nor torch.export
    can follow it."""

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        if features.sum() > 0:
            features = features * 2
        return super().forward(features, labels)


def test_a_model_no_tracer_can_follow_warns_once_and_training_goes_on(root: Path) -> None:
    callback = ClusterabilityTrainerCallback(every_n_steps=1, **FAST)
    trainer = Trainer(
        model=DataDependentMLP(TinyConfig()),
        args=arguments(root / "out", []),
        train_dataset=feature_data(),
        callbacks=[callback],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if issubclass(w.category, ClusterTrackingWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    text = str(ours[0].message)
    assert "torch.export cannot trace" in text and "layers=" in text
    assert trainer.state.global_step == 6
    assert callback.tracker is None and callback.reports == []


def test_module_picks_the_network_and_checkpoints_set_the_default_schedule(root: Path) -> None:
    # No report_to: a local folder in output_dir. Default schedule: every checkpoint (steps 3
    # and 6) and the end (6).
    callback = ClusterabilityTrainerCallback(module="body", **FAST)
    trainer = Trainer(
        model=TinyMLP(TinyConfig()),
        args=arguments(root / "out", []),
        train_dataset=feature_data(),
        callbacks=[callback],
    )
    trainer.train()

    assert [r.step for r in callback.reports] == [3, 6]
    assert [layer.name for layer in callback.reports[0].layers] == ["input", "0", "2", "4"]
    local = LocalDirectorySink(root / "out")
    assert [r.step for r in local.read_reports()] == [3, 6]
    for name in SUMMARY_ARTIFACTS:
        assert (root / "out" / "clusterability" / name).is_file(), name
    assert not (root / "out" / "clusterability" / "clusterability").exists()


def test_options_are_checked_when_the_callback_is_created() -> None:
    with pytest.raises(ConfigError, match="shuffles=1"):
        ClusterabilityTrainerCallback(shuffles=1)
    with pytest.raises(ConfigError, match="rank is set by the callback"):
        ClusterabilityTrainerCallback(rank=0)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'every_n_step'"):
        ClusterabilityTrainerCallback(every_n_step=10)
    with pytest.raises(ConfigError, match="module must be an attribute path"):
        ClusterabilityTrainerCallback(module=3)  # type: ignore[arg-type]


def test_without_transformers_the_callback_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "from cluster_tracking.integrations.transformers import ClusterabilityTrainerCallback\n"
        "try:\n"
        "    ClusterabilityTrainerCallback()\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'cluster-tracking[transformers]'" in done.stdout
