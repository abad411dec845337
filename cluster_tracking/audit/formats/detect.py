"""Which reader a weight file needs, chosen by its content, not only its name."""

from __future__ import annotations

import zipfile
from pathlib import Path

from cluster_tracking.audit.files import file_mode
from cluster_tracking.audit.formats.checkpoint import WeightFileRead
from cluster_tracking.audit.formats.legacy import check_legacy_torch_file
from cluster_tracking.audit.formats.pt2 import read_pt2
from cluster_tracking.audit.formats.safetensors import looks_like_safetensors, read_safetensors
from cluster_tracking.audit.formats.torch_file import read_torch_file, read_torchscript
from cluster_tracking.errors import LimitError, SourceError
from cluster_tracking.graph.safetensors_header import first_line
from cluster_tracking.resources.limits import MemoryBudget, format_size


def read_weight_file(path: Path, *, trust_pickle: bool) -> WeightFileRead:
    """``(weights, format, prefix, notes)`` of one file, chosen by its content.

    The file must be regular (checked again here: a folder search may name a symlink), and its
    size and every size it declares are budgeted
    (:class:`~cluster_tracking.resources.limits.MemoryBudget`)
    before anything is read into memory.
    """
    file_mode(path, str(path))
    if not path.is_file():
        raise SourceError(f"{path} is a folder where a weight file was expected.")
    size = path.stat().st_size
    if not size:
        raise SourceError(f"{path}: the file is empty.")
    budget = MemoryBudget(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    name = path.name.lower()
    if name.endswith(".safetensors") or looks_like_safetensors(head):
        note = (
            "a safetensors file does not keep the layer order: the layers were ordered by name "
            "(natural order); pass --layers to give the data-flow order if it differs."
        )
        return read_safetensors(path, budget), "state_dict (safetensors)", "", [note]
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as error:
        raise SourceError(f"{path}: cannot read it ({first_line(error)}).") from error
    if not is_zip:
        if head[:1] == b"\x80" or name.endswith((".pt", ".pth", ".bin", ".ckpt")):
            # torch.save's legacy (pre-1.6) format: its storages' declared sizes are checked
            # against the file and budgeted before torch.load allocates them.
            check_legacy_torch_file(path, size, budget)
            return read_torch_file(path, trust_pickle=trust_pickle)
        raise SourceError(
            f"{path}: not a weight file PyTorch or safetensors can read (neither a torch.save "
            "zip archive nor a safetensors file)."
        )
    names = _check_zip(path, budget)
    if any(n.endswith("/models/model.json") or "/data/weights/" in n for n in names) and not any(
        n.endswith("/data.pkl") for n in names
    ):
        return read_pt2(path), "torch.export archive (.pt2)", "", []
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return read_torchscript(path, trust_pickle=trust_pickle)
    return read_torch_file(path, trust_pickle=trust_pickle)


def _check_zip(path: Path, budget: MemoryBudget) -> list[str]:
    """The member names of a zip archive, after its declared sizes were budgeted and every
    compressed member was inflated as a stream (never trusted: a member that inflates past its
    declared size fails its CRC check here, before PyTorch allocates it).

    Raises:
        SourceError: not a readable zip archive, or a member that does not match its size.
        LimitError: the members together pass the memory limit.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            declared = sum(info.file_size for info in infos)
            budget.take(declared, f"{len(infos)} archive members of {format_size(declared)}")
            for info in infos:
                if info.compress_type == zipfile.ZIP_STORED or info.is_dir():
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 20):
                        pass
            return [info.filename for info in infos]
    except LimitError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as error:
        raise SourceError(
            f"{path}: a damaged zip archive ({first_line(error)}); the file may be truncated or "
            "corrupt."
        ) from error
    except NotImplementedError as error:
        raise SourceError(
            f"{path}: a zip archive compressed in a way PyTorch cannot read ({first_line(error)})."
        ) from error
