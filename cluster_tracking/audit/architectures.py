"""``--arch``: the architecture of a bare state_dict, built from a registry, so that the audit
follows the model's real data flow instead of reading the file as a chain.

A name is looked up in torchvision's model registry (``resnet18``, ``vit_b_16``...), then timm's
(``convnext_atto``...), or, written ``package.module:function``, is a function of the user's own
code that returns the model (``mynets.models:Net``, called with no arguments). The model is built
with random weights (no download: ``weights=None``, ``pretrained=False``), the state_dict is
loaded into it strictly (every key and shape must match), and the audit measures the model.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from cluster_tracking.errors import ConfigError, SourceError

__all__ = ["build_architecture", "load_into_architecture"]


def build_architecture(name: str) -> nn.Module:
    """The model ``name`` stands for, with random weights.

    Raises:
        ConfigError: no registry knows the name, or ``module:function`` does not give a module.
    """
    name = name.strip()
    if ":" in name:
        return _from_code(name)
    tried = []
    try:
        import torchvision.models as torchvision_models
    except Exception:  # not installed, or its compiled ops do not load beside this torch
        tried.append("torchvision (not importable)")
    else:
        if name in torchvision_models.list_models():
            model: nn.Module = torchvision_models.get_model(name, weights=None)
            return model
        tried.append("torchvision")
    try:
        import timm
    except Exception:
        tried.append("timm (not importable)")
    else:
        if timm.is_model(name):
            model = timm.create_model(name, pretrained=False)
            return model
        tried.append("timm")
    raise ConfigError(
        f"--arch {name!r} is not a model of {', '.join(tried)}. Name a torchvision or timm "
        "architecture (pip install torchvision timm), or a function of your own code that returns "
        "the model, as package.module:function."
    )


def _from_code(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"--arch {spec!r}: cannot import {module_name!r} ({error}); run from the folder that "
            "holds it, or install its package."
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"--arch {spec!r}: {module_name} has no function {attribute!r}.")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"--arch {spec!r} returned a {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def load_into_architecture(name: str, state: Mapping[str, Any]) -> nn.Module:
    """The architecture ``name`` with the weights of ``state`` (every key and shape must match).

    Raises:
        ConfigError: see :func:`build_architecture`.
        SourceError: the state_dict does not fit the architecture (names the first differences).
    """
    model = build_architecture(name)
    try:
        result = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as error:  # shapes that differ
        first = " ".join(str(error).split())[:300]
        raise SourceError(f"the state_dict does not fit --arch {name!r}: {first}") from error
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_first(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_first(result.unexpected_keys)}")
    if problems:
        raise SourceError(
            f"the state_dict does not fit --arch {name!r}: {'; '.join(problems)}. Check the "
            "architecture's name (and its variant, e.g. resnet18 vs resnet34)."
        )
    model.eval()
    return model


def _first(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(key) for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
