"""Track clusterability in a Hugging Face ``Trainer``, logged into its ``report_to`` MLflow run.

Run it as it is (well under a minute on a laptop; nothing is downloaded: the model is a small BERT
built from a config and randomly initialised, the data synthetic):

    python examples/transformers_trainer.py

It logs to ``$MLFLOW_TRACKING_URI`` when set, else to ``./mlflow.db``; look at the run with

    mlflow ui --backend-store-uri sqlite:///mlflow.db

The run that Hugging Face's ``MLflowCallback`` starts in the experiment
``cluster-tracking-transformers`` holds the Trainer's ``loss`` and params and, at every checkpoint
(``save_steps``), ``clusterability/ncut``, ``clusterability/z_score``, ... of the MLP blocks of the
encoder; its artifacts hold ``clusterability/step-<step>/`` and ``clusterability/report.html``.
"""

from __future__ import annotations

import os
import tempfile

import torch
import transformers
from transformers import Trainer, TrainingArguments

from cluster_tracking.integrations.transformers import ClusterabilityTrainerCallback

#: The MLP blocks of every BERT layer: ``intermediate.dense`` (hidden -> 4 x hidden) and
#: ``output.dense`` (back); ``[0-9]`` keeps out ``attention.output.dense``.
BERT_MLP = "*.intermediate.dense|*[0-9].output.dense"


def make_data(n: int = 1024, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A toy task: is token 7 in the sequence?"""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        tokens = torch.randint(10, 100, (length,), generator=generator)
        label = int(torch.rand((), generator=generator) < 0.5)
        if label:
            tokens[int(torch.randint(0, length, (), generator=generator))] = 7
        examples.append({"input_ids": tokens, "labels": torch.tensor(label)})
    return examples


def main() -> None:
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "cluster-tracking-transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = transformers.AutoModelForSequenceClassification.from_config(config)

    # At every checkpoint (the default schedule) and at the end: 8 clusters, 10 null networks.
    clusterability = ClusterabilityTrainerCallback(layers=BERT_MLP, k=8, shuffles=10)
    with tempfile.TemporaryDirectory() as checkpoints:
        args = TrainingArguments(
            output_dir=checkpoints,
            max_steps=120,
            per_device_train_batch_size=32,
            learning_rate=1e-3,
            logging_steps=20,
            save_strategy="steps",
            save_steps=40,
            save_only_model=True,
            report_to=["mlflow"],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=make_data(), callbacks=[clusterability]
        )
        trainer.train()

    print(f"measured layers: {clusterability.selected_layers}")
    print(f"MLflow store {os.environ['MLFLOW_TRACKING_URI']}")
    for report in clusterability.reports:
        baseline = report.baseline
        z = f"{baseline.z_score:+.2f}" if baseline and baseline.z_score is not None else "n/a"
        p = f"{baseline.p_value:.3f}" if baseline else "n/a"
        print(f"step {report.step:4d}  n-cut {report.ncut:.3f}  z {z}  p {p}")


if __name__ == "__main__":
    main()
