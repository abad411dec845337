"""What the tracers carry through a model's forward pass (:class:`_Feat`: the nodes of one tensor;
:data:`_OTHER`: anything that is not a feature tensor), and the advice their refusals give.

Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATE_DICT_ADVICE = (
    "A bare state_dict is read as a chain of its weights in key order, which is right only for a "
    "network that is such a chain; for any other, measure the model itself (in the CLI: --arch "
    "NAME, a torchvision or timm architecture or package.module:function of your own code, or a "
    "Hugging Face model folder with its config.json), or name a chain with layers=/--layers in "
    "data-flow order."
)

LAYERS_HINT = (
    "pass example_inputs=(a small input tensor, ...) to follow the model with torch.export "
    "instead (it follows reshapes, attention, recurrent and transposed-convolution layers), or "
    "layers=[...] naming the Linear/Conv modules to use, in data-flow order, to build the graph "
    "from them as a chain without tracing"
)


@dataclass(frozen=True)
class _Feat:
    """What the graph knows about one tensor of the forward pass.

    ``nodes``: provisional node id of each unit/channel along dim 1 (``None`` for a model input that
    no layer has read yet, so its width is still unknown: ``placeholder`` names it). ``flat``: a
    ``[C, *spatial]`` map flattened into dim 1, so dim 1 holds ``C * S`` features for ``C`` nodes.
    ``spatial``: number of dims after dim 1 (``None`` when unknown).
    """

    nodes: np.ndarray | None
    origin: str
    placeholder: str | None = None
    flat: bool = False
    spatial: int | None = None


class _Other:
    """A value that is not a feature tensor (a constant, a shape, a parameter)."""


_OTHER = _Other()


def _chain_advice(label: str) -> str:
    if label.startswith("weight "):
        return STATE_DICT_ADVICE
    return "Check the model, or pass layers=[...] naming Linear/Conv modules that form a chain."
