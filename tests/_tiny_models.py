"""Small models several test files build: tiny Hugging Face transformers (from configs, no
downloads) and a ResNet block whose state_dict is not a chain."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import transformers


def tiny_llama() -> transformers.PreTrainedModel:
    """A 2-layer Llama-style causal LM: hidden 16, gated MLP 32, 4 heads over 2 key/value heads."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=32,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def tiny_gpt2() -> transformers.PreTrainedModel:
    """A 2-layer GPT-2 (transformers' Conv1D layers): hidden 16, vocabulary 50."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def tiny_bert() -> transformers.PreTrainedModel:
    """A 2-layer BERT sequence classifier: hidden 16, vocabulary 50, 3 labels."""
    import transformers

    config = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_vit() -> transformers.PreTrainedModel:
    """A 1-layer ViT image classifier: 16x16 images in 4x4 patches, hidden 16, 3 labels."""
    import transformers

    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


class ResNetBlock(nn.Module):
    """A strided residual block with a 1x1 downsample conv: its state_dict, read in key order,
    would put the downsample conv after conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.downsample = nn.Conv2d(4, 8, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x)))) + self.downsample(x)
