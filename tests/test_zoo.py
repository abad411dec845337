"""The architecture zoo: today's networks, built from configs or constructors (no downloads),
each with a weight graph or a documented refusal.

For every architecture the graph follows: the whole model is traced (no ``layers=``); every
weight of a Linear/Conv/Conv1D/ConvTranspose/attention/recurrent layer is in exactly one block
(none silently left out), except the LM head and embeddings, which are out by default; the first
layer is the width the architecture implies (its hidden size, or its input channels); and reading
the weights again (what the tracker does at later steps) gives the same graph. The README's
architecture table is this list.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph import live_weights, weight_graph
from cluster_tracking.graph.chain import is_conv1d

sys.path.insert(0, str(Path(__file__).parent))
from test_graph_export import (
    _Block,
    _ChannelShuffle,
    _Concat,
    _DropPath,
    _LayerScale,
    _Mixer,
    _PatchEmbedding,
    _Recurrent,
    _ResNetLike,
    _UNet,
)

transformers.logging.set_verbosity_error()

H = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
TOKENS = {"vocab_size": 60, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}


@dataclass(frozen=True)
class Arch:
    family: str
    make: Callable[[], nn.Module]
    example: Any = None  # example inputs; None: known from the model (Hugging Face)
    first: int | None = None  # width of the first layer (stream or input)
    refused: str | None = None  # the refusal's message, for architectures the graph refuses
    position_mixing: tuple[str, ...] = ()  # weights over positions: no edges, by design


def _hf(model_class: str, config_class: str, **config: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        cfg = getattr(transformers, config_class)(**config)
        return getattr(transformers, model_class)(cfg)

    return make


def _separable() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 12, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 4),
    )


class _SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.reduce, self.expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.head((y * gate).mean((2, 3)))


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(h + self.attention(h, h, h)[0])


class _BiLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _encoder() -> nn.Module:
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)


PLAIN = [
    Arch("MLP", lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), (2, 6), 6),
    Arch("ResNet-style CNN (BatchNorm, residual add)", _ResNetLike, (1, 3, 8, 8), 3),
    Arch("DenseNet-style concatenation", _Concat, (1, 3, 8, 8), 3),
    Arch("depthwise-separable CNN (MobileNet-style)", _separable, (1, 3, 8, 8), 3),
    Arch("squeeze-and-excitation", _SqueezeExcite, (1, 3, 8, 8), 3),
    Arch("ShuffleNet channel shuffle", _ChannelShuffle, (1, 1, 4, 4), 1),
    Arch("U-Net (ConvTranspose, skip concatenation)", _UNet, (1, 1, 8, 8), 1),
    Arch(
        "ConvTranspose1d",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.ConvTranspose1d(3, 4, 3)),
        (1, 2, 9),
        2,
    ),
    Arch(
        "stochastic depth (DropPath)",
        lambda: nn.Sequential(nn.Linear(3, 4), _DropPath(), nn.Linear(4, 2)),
        (2, 3),
        3,
    ),
    Arch("LSTM", lambda: _Recurrent(nn.LSTM), (1, 4, 3), 3),
    Arch("GRU", lambda: _Recurrent(nn.GRU), (1, 4, 3), 3),
    Arch("bidirectional 2-layer LSTM", _BiLSTM, (1, 4, 3), 3),
    Arch("nn.MultiheadAttention", _MHA, (1, 5, 3), 3),
    Arch("nn.TransformerEncoder", _encoder, (1, 5, 8), 8),
    Arch("pre-LN block with SwiGLU", _Block, (1, 3, 4), 4),
    Arch("LayerScale", _LayerScale, (2, 3), 3),
    Arch("ViT patch embedding", _PatchEmbedding, (1, 3, 4, 4), 3),
    Arch("MLP-Mixer", _Mixer, (1, 5, 3), 3, position_mixing=("tokens",)),
    Arch("nn.Embedding", lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)), "tokens", 4),
]

TEXT = [
    Arch("BERT", _hf("BertModel", "BertConfig", **H, **TOKENS), first=16),
    Arch(
        "DistilBERT",
        _hf(
            "DistilBertModel",
            "DistilBertConfig",
            dim=16,
            n_layers=2,
            n_heads=2,
            hidden_dim=32,
            vocab_size=60,
        ),
        first=16,
    ),
    Arch(
        "RoBERTa",
        _hf("RobertaModel", "RobertaConfig", **H, **TOKENS, max_position_embeddings=40),
        first=16,
    ),
    Arch(
        "ALBERT (shared layers)",
        _hf("AlbertModel", "AlbertConfig", embedding_size=8, **H, **TOKENS),
        first=8,
    ),
    Arch("ELECTRA", _hf("ElectraModel", "ElectraConfig", embedding_size=8, **H, **TOKENS), first=8),
    Arch(
        "GPT-2 (Conv1D)",
        _hf(
            "GPT2LMHeadModel",
            "GPT2Config",
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=32,
            **TOKENS,
        ),
        first=16,
    ),
    Arch("GPT-NeoX", _hf("GPTNeoXModel", "GPTNeoXConfig", **H, **TOKENS), first=16),
    Arch(
        "OPT",
        _hf(
            "OPTModel",
            "OPTConfig",
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=32,
            word_embed_proj_dim=16,
            **TOKENS,
        ),
        first=16,
    ),
    Arch(
        "BLOOM",
        _hf("BloomModel", "BloomConfig", hidden_size=16, n_layer=2, n_head=2, **TOKENS),
        first=16,
    ),
    Arch(
        "Falcon",
        _hf(
            "FalconModel",
            "FalconConfig",
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            **TOKENS,
        ),
        first=16,
    ),
    Arch(
        "Llama (gated MLP, GQA)",
        _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=1, **H, **TOKENS),
        first=16,
    ),
    Arch(
        "Mistral",
        _hf("MistralModel", "MistralConfig", num_key_value_heads=1, **H, **TOKENS),
        first=16,
    ),
    Arch("Qwen2", _hf("Qwen2Model", "Qwen2Config", num_key_value_heads=1, **H, **TOKENS), first=16),
    Arch(
        "Gemma",
        _hf("GemmaModel", "GemmaConfig", num_key_value_heads=1, head_dim=8, **H, **TOKENS),
        first=16,
    ),
    Arch("Phi", _hf("PhiModel", "PhiConfig", **H, **TOKENS), first=16),
    Arch(
        "T5",
        _hf(
            "T5Model",
            "T5Config",
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            vocab_size=60,
        ),
        first=16,
    ),
    Arch(
        "T5 v1.1 (gated)",
        _hf(
            "T5Model",
            "T5Config",
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            vocab_size=60,
            feed_forward_proj="gated-gelu",
        ),
        first=16,
    ),
    Arch(
        "BART",
        _hf(
            "BartModel",
            "BartConfig",
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            decoder_start_token_id=0,
            **TOKENS,
        ),
        first=16,
    ),
    Arch(
        "Whisper",
        _hf(
            "WhisperModel",
            "WhisperConfig",
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=8,
            decoder_start_token_id=0,
            **TOKENS,
        ),
        first=8,
    ),
    Arch("CLIP text", _hf("CLIPTextModel", "CLIPTextConfig", **H, vocab_size=60), first=16),
]

VISION = [
    Arch(
        "ViT",
        _hf("ViTForImageClassification", "ViTConfig", image_size=16, patch_size=4, **H),
        first=3,
    ),
    Arch("DeiT", _hf("DeiTModel", "DeiTConfig", image_size=16, patch_size=4, **H), first=3),
    Arch("DINOv2", _hf("Dinov2Model", "Dinov2Config", image_size=16, patch_size=4, **H), first=3),
    Arch(
        "CLIP vision",
        _hf("CLIPVisionModel", "CLIPVisionConfig", image_size=16, patch_size=4, **H),
        first=3,
    ),
    Arch(
        "Swin (windows, patch merging)",
        _hf(
            "SwinModel",
            "SwinConfig",
            image_size=32,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
        ),
        first=3,
    ),
    Arch(
        "ConvNeXt (channels-last, LayerScale)",
        _hf(
            "ConvNextModel",
            "ConvNextConfig",
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_stages=2,
            image_size=32,
        ),
        first=3,
    ),
    Arch(
        "ResNet",
        _hf(
            "ResNetModel",
            "ResNetConfig",
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            layer_type="basic",
        ),
        first=3,
    ),
    Arch(
        "ResNet bottleneck",
        _hf(
            "ResNetModel",
            "ResNetConfig",
            embedding_size=8,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="bottleneck",
        ),
        first=3,
    ),
    Arch(
        "RegNet (grouped, SE)",
        _hf(
            "RegNetModel",
            "RegNetConfig",
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            groups_width=4,
        ),
        first=3,
    ),
    Arch(
        "MobileNetV2",
        _hf("MobileNetV2Model", "MobileNetV2Config", image_size=32, depth_multiplier=0.25),
        first=3,
    ),
    Arch(
        "EfficientNet",
        _hf(
            "EfficientNetModel",
            "EfficientNetConfig",
            image_size=32,
            width_coefficient=0.25,
            depth_coefficient=0.25,
            hidden_dim=320,
        ),
        first=3,
    ),
    Arch(
        "MobileViT",
        _hf(
            "MobileViTModel",
            "MobileViTConfig",
            image_size=32,
            hidden_sizes=[16, 24, 32],
            neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        ),
        first=3,
    ),
    Arch(
        "SegFormer",
        _hf(
            "SegformerModel",
            "SegformerConfig",
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            num_attention_heads=[1, 2],
            patch_sizes=[7, 3],
            strides=[4, 2],
            image_size=32,
        ),
        first=3,
    ),
    Arch(
        "LeViT",
        _hf(
            "LevitModel",
            "LevitConfig",
            image_size=32,
            hidden_sizes=[16, 32, 48],
            num_attention_heads=[1, 2, 3],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
        ),
        first=3,
    ),
]

REFUSED = [
    Arch(
        "Mixtral (mixture of experts)",
        _hf(
            "MixtralModel",
            "MixtralConfig",
            num_key_value_heads=1,
            num_local_experts=2,
            num_experts_per_tok=1,
            **H,
            **TOKENS,
        ),
        refused=r"topk .*MixtralTopKRouter",
    ),
    Arch(
        "Mamba (selective state space)",
        _hf(
            "MambaModel",
            "MambaConfig",
            hidden_size=16,
            num_hidden_layers=1,
            vocab_size=60,
            state_size=4,
        ),
        refused=r"conv1d .*MambaMixer.*after reshaping",
    ),
    Arch(
        "wav2vec 2.0 (weight-norm conv)",
        _hf(
            "Wav2Vec2Model",
            "Wav2Vec2Config",
            **H,
            conv_dim=(8, 8),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        ),
        refused=r"ParametrizedConv1d.*weight_norm",
    ),
]

ZOO = PLAIN + TEXT + VISION + REFUSED


def _example(arch: Arch) -> Any:
    if arch.example == "tokens":
        return torch.zeros(1, 5, dtype=torch.long)
    if isinstance(arch.example, tuple):
        return torch.zeros(arch.example)
    return None


def _weight_parameters(model: nn.Module) -> dict[int, str]:
    """The weights the graph must hold: of every Linear/Conv/Conv1D/ConvTranspose layer,
    attention in-projection and recurrent layer (the LM head and embeddings are out)."""
    layer_types = (nn.Linear, nn.modules.conv._ConvNd)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    skip |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, layer_types) or is_conv1d(module):
            found[id(module.weight)] = f"{name}.weight"
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            found[id(module.in_proj_weight)] = f"{name}.in_proj_weight"
        if isinstance(module, nn.RNNBase):
            for parameter_name in module._flat_weights_names:
                if "weight" in parameter_name:
                    found[id(getattr(module, parameter_name))] = f"{name}.{parameter_name}"
    return {key: value for key, value in found.items() if key not in skip}


def _block_parameters(model: nn.Module, graph: Any) -> list[int]:
    ids = []
    for block in graph.blocks:
        if block.source is not None:
            name = block.source.parameter
        else:
            name = block.name.split("#", 1)[0] + ".weight"
        ids.append(id(model.get_parameter(name)))
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("arch", ZOO, ids=[arch.family for arch in ZOO])
def test_every_architecture_has_its_graph_or_a_documented_refusal(arch: Arch) -> None:
    torch.manual_seed(0)
    model = arch.make()
    example = _example(arch)
    if arch.refused is not None:
        with pytest.raises(GraphError, match=arch.refused):
            weight_graph(model, example_inputs=example)
        return
    graph = weight_graph(model, example_inputs=example)

    covered = _block_parameters(model, graph)
    expected = _weight_parameters(model)
    missing = [
        name
        for key, name in expected.items()
        if key not in covered and not name.startswith(arch.position_mixing or ("\0",))
    ]
    assert not missing, f"weights in no block: {missing}"
    layer_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    counts = {key: covered.count(key) for key in set(covered)}
    shared = {layer_of[key] for key, count in counts.items() if count > 1}
    if "ALBERT" not in arch.family:  # ALBERT calls its one layer at every depth
        assert not shared, f"weights in several blocks: {shared}"
    if arch.first is not None:
        assert graph.widths[0] == arch.first
    again = graph.with_weights(live_weights(model, graph))
    np.testing.assert_allclose(again.adjacency.toarray(), graph.adjacency.toarray(), rtol=1e-12)


FOLLOWED = PLAIN + TEXT + VISION


@pytest.mark.slow
@pytest.mark.parametrize("arch", FOLLOWED, ids=[arch.family for arch in FOLLOWED])
def test_every_saved_form_gives_the_live_graph(arch: Arch, tmp_path: Path) -> None:
    """A Hugging Face folder, and a state_dict saved as .pt, safetensors or a torch.export .pt2
    archive loaded into the architecture (what ``--arch`` does), give the live graph."""
    from safetensors.torch import save_file

    from cluster_tracking.audit.sources import load_source

    torch.manual_seed(0)
    model = arch.make().eval()
    example = _example(arch)
    live = weight_graph(model, example_inputs=example)
    if arch in PLAIN:
        state = {name: value.contiguous() for name, value in model.state_dict().items()}
        torch.save(state, tmp_path / "model.pt")
        save_file(state, str(tmp_path / "model.safetensors"))
        inputs = example if isinstance(example, tuple) else (example,)
        torch.export.save(torch.export.export(model, inputs), str(tmp_path / "model.pt2"))
        routes = ["model.pt", "model.safetensors", "model.pt2"]
    else:
        model.save_pretrained(tmp_path / "folder")
        routes = ["folder"]
    for route in routes:
        loaded = load_source(str(tmp_path / route))
        if isinstance(loaded.weights, nn.Module):
            rebuilt = loaded.weights
        else:
            rebuilt = arch.make()
            rebuilt.load_state_dict(loaded.weights)
            rebuilt.eval()
        graph = weight_graph(rebuilt, example_inputs=example)
        assert graph.layer_names == live.layer_names, route
        assert graph.widths == live.widths, route
        np.testing.assert_allclose(
            graph.adjacency.toarray(), live.adjacency.toarray(), rtol=1e-6, err_msg=route
        )


def test_the_zoo_covers_forty_architectures_and_follows_nine_in_ten() -> None:
    assert len(ZOO) >= 40
    assert len(ZOO) - len(REFUSED) >= 0.9 * len(ZOO)
