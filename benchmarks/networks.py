"""The networks the benchmarks measure, at PyTorch's default initialisation (seeded)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn


def mlp(widths: Sequence[int], seed: int = 0) -> nn.Sequential:
    """A ReLU MLP with the given layer widths (input first)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def paper_mlp() -> nn.Sequential:
    """The paper's MLP, 784-256-256-256-256-10 (1,818 nodes)."""
    return mlp([784, 256, 256, 256, 256, 10])


def planted_mlp(modules: int = 12, contrast: float = 4.0) -> nn.Sequential:
    """The paper's MLP with ``modules`` planted modules: neuron i of every layer belongs to module
    ``i % modules``; weights inside a module are scaled up by ``contrast``, the others down."""
    model = paper_mlp()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                n_out, n_in = layer.weight.shape
                same = (torch.arange(n_out)[:, None] % modules) == (
                    torch.arange(n_in)[None, :] % modules
                )
                layer.weight.mul_(torch.where(same, contrast, 1.0 / contrast))
    return model


def cnn() -> nn.Sequential:
    """A CNN whose channel graph is 1-32-32-64-64 (3x3 kernels)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3),
    )


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.shortcut = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: a stem, residual blocks with adds (64 -> 128 -> 256 channels), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.blocks = nn.Sequential(
            _Block(64, 64), _Block(64, 64), _Block(64, 128), _Block(128, 128), _Block(128, 256)
        )
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


def resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet()


#: name -> (builder, description)
NETWORKS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "paper_mlp": (paper_mlp, "MLP 784-256x4-10"),
    "planted_mlp": (planted_mlp, "MLP 784-256x4-10, 12 planted modules"),
    "cnn": (cnn, "CNN channels 1-32-32-64-64"),
    "resnet": (resnet, "ResNet 64-128-256, residual adds"),
    "mlp_2k": (lambda: mlp([500] * 4), "MLP 500x4"),
    "mlp_4k": (lambda: mlp([1000] * 4), "MLP 1000x4"),
    "mlp_8k": (lambda: mlp([1000] * 8), "MLP 1000x8"),
    "mlp_16k": (lambda: mlp([1000] * 16), "MLP 1000x16"),
    "mlp_30k": (lambda: mlp([1000] * 30), "MLP 1000x30"),
    "mlp_8x500": (lambda: mlp([500] * 8), "MLP 500x8"),
    "mlp_8x1500": (lambda: mlp([1500] * 8), "MLP 1500x8"),
}


def build(name: str) -> nn.Module:
    return NETWORKS[name][0]()
