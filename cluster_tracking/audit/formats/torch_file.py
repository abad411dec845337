"""``torch.save`` files and TorchScript archives.

Read with ``torch.load(..., weights_only=True)``, PyTorch's restricted unpickler; a pickle it
refuses is read again with inert stand-ins (:mod:`cluster_tracking.audit.formats.stand_ins`);
only ``trust_pickle=True`` unpickles for real.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from cluster_tracking.audit.formats.checkpoint import WeightFileRead, from_checkpoint
from cluster_tracking.audit.formats.stand_ins import TRUST_HINT, stand_in_class
from cluster_tracking.errors import SourceError
from cluster_tracking.graph.safetensors_header import first_line
from cluster_tracking.graph.selection import list_names


def read_torch_file(path: Path, *, trust_pickle: bool) -> WeightFileRead:
    """A ``torch.save`` file: weights-only first, then stand-ins, or (trusted) a real unpickling."""
    notes: list[str] = []
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return from_checkpoint(loaded, path, False, notes)
    except pickle.UnpicklingError as error:
        refused: Exception = error
    except Exception as error:  # torch raises many kinds on a damaged file
        raise SourceError(
            f"{path}: not a readable PyTorch checkpoint ({first_line(error)}); the file may be "
            "truncated or corrupt."
        ) from error
    if trust_pickle:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as error:
            notes.append(
                f"--trust-pickle: the pickled model's class cannot be imported here "
                f"({first_line(error)}); its weights were read without it."
            )
        except Exception as error:
            raise SourceError(f"{path}: unpickling failed ({first_line(error)}).") from error
        else:
            return from_checkpoint(loaded, path, True, notes)
    loaded = _load_with_stand_ins(path, refused)
    return from_checkpoint(loaded, path, False, notes)


def read_torchscript(path: Path, *, trust_pickle: bool) -> WeightFileRead:
    """A TorchScript archive's weights as a chain (only with ``trust_pickle``: loading it compiles
    the code in it)."""
    if not trust_pickle:
        raise SourceError(
            f"{path} is a TorchScript archive (torch.jit.save), whose loading compiles the code "
            f"in it; {TRUST_HINT}."
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise SourceError(f"{path}: torch.jit.load failed ({first_line(error)}).") from error
    # A ScriptModule cannot be traced by torch.fx: read its weights as a chain.
    state = {key: value for key, value in module.state_dict().items()}
    return state, "TorchScript archive (state_dict)", "", ["loaded with torch.jit.load."]


def _load_with_stand_ins(path: Path, refused: Exception) -> Any:
    """Load a pickle whose globals the weights-only unpickler refused, with inert stand-ins."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        names = []
    if not names:
        raise SourceError(
            f"{path}: PyTorch's weights-only loader refused it ({first_line(refused)}); "
            f"{TRUST_HINT}."
        ) from refused
    stand_ins = [(stand_in_class(name), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):  # type: ignore[arg-type]
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", str(error))
        what = f"calls {blocked.group(1)}" if blocked else f"names {list_names(names, 5)}"
        raise SourceError(
            f"refusing to unpickle {path}: the pickle {what}, which would run code when "
            f"loaded; {TRUST_HINT}."
        ) from error
    except Exception as error:
        raise SourceError(
            f"{path}: cannot read its weights without running code from it "
            f"({first_line(error)}); {TRUST_HINT}."
        ) from error
