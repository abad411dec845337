"""The ``random_init`` null model: the same architecture freshly initialised (Filan et al. 2021,
§3), by its modules' own ``reset_parameters()`` or a named ``torch.nn.init`` scheme."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cluster_tracking.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: Named initialisations accepted by ``random_init`` (besides the modules' own
#: ``reset_parameters``), applied to every weight tensor of two or more dimensions: the name of
#: each one's function in ``torch.nn.init`` (torch is imported when a null network is made, so
#: that the shuffle nulls' worker processes start without it).
NAMED_INITS: dict[str, str] = {
    "xavier_uniform": "xavier_uniform_",
    "xavier_normal": "xavier_normal_",
    "kaiming_uniform": "kaiming_uniform_",
    "kaiming_normal": "kaiming_normal_",
    "orthogonal": "orthogonal_",
}

_TORCH_RNG_LOCK = threading.Lock()


def reinitialised_copy(
    model: torch.nn.Module, seed: int, init: str | None = None
) -> torch.nn.Module:
    """A copy of ``model`` with fresh parameters: its modules' ``reset_parameters()`` (default) or a
    named ``torch.nn.init`` scheme (see :data:`NAMED_INITS`), from torch seed ``seed``.

    BatchNorm running statistics are reset too, so a fresh network is what it would be at init.
    """
    if init is not None and init not in NAMED_INITS:
        raise ConfigError(
            f"unknown init {init!r} for random_init; choose one of {', '.join(NAMED_INITS)} "
            "or leave it unset to use each module's own reset_parameters()."
        )
    import torch

    fresh = copy.deepcopy(model)
    with _TORCH_RNG_LOCK, torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in fresh.modules():
            reset_stats: Any = getattr(module, "reset_running_stats", None)
            if callable(reset_stats):
                reset_stats()
            if init is None:
                reset: Any = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            else:
                for name, parameter in module.named_parameters(recurse=False):
                    if name == "weight" and parameter.dim() >= 2:
                        initialise: Callable[[torch.Tensor], Any] = getattr(
                            torch.nn.init, NAMED_INITS[init]
                        )
                        initialise(parameter)
    return fresh
