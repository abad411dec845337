"""Local paths an audit may read: regular files and bounded folder searches.

Only regular files are read: a device, a FIFO or a socket is refused before it is opened (a FIFO
without a writer or ``/dev/zero`` would block or never end), and symlinks are followed only to
regular files. A folder is searched breadth-first, :data:`MAX_FOLDER_DEPTH` levels and
:data:`MAX_FOLDER_ENTRIES` entries at most, without following symlinked folders.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cluster_tracking.errors import SourceError
from cluster_tracking.graph.safetensors_header import first_line
from cluster_tracking.graph.selection import list_names

#: File name endings read as weight files when a folder or a run is searched for a model.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pt2")

#: How deep (folders inside the source folder) and how many entries a folder source is searched.
MAX_FOLDER_DEPTH = 4
MAX_FOLDER_ENTRIES = 2000


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_mode(path: Path, shown: str) -> int:
    """The mode of ``path`` (symlinks followed); only regular files and folders pass.

    Nothing is opened: a FIFO without a writer or ``/dev/zero`` would block or never end.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        dangling = path.is_symlink()
        raise SourceError(
            f"{shown}: " + ("a symlink to nothing." if dangling else "no such file or folder.")
        ) from None
    except PermissionError as error:
        raise SourceError(f"{shown}: cannot read it ({error.strerror}).") from None
    except (OSError, ValueError) as error:
        raise SourceError(f"{shown}: cannot read it ({first_line(error)}).") from None
    if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
        return info.st_mode
    kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
    via = " (through a symlink)" if path.is_symlink() else ""
    raise SourceError(
        f"{shown} is {kind}{via}, not a regular file; audit reads weight files and folders only."
    )


@dataclass
class FolderScan:
    """What a bounded search of a folder found: every entry (sorted), and the regular files."""

    entries: list[Path]
    files: list[Path]

    def weight_files(self) -> list[Path]:
        """Weight files; a ``log_state_dict`` folder's ``state_dict.pth`` wins."""
        found = [p for p in self.files if p.name.lower().endswith(WEIGHT_SUFFIXES)]
        preferred = [p for p in found if p.name == "state_dict.pth"]
        return preferred if len(preferred) == 1 else found


def scan_folder(folder: Path, source: str) -> FolderScan:
    """Search ``folder`` breadth-first, :data:`MAX_FOLDER_DEPTH` levels and
    :data:`MAX_FOLDER_ENTRIES` entries at most, without following symlinked folders; regular
    files only (a symlink counts when it leads to one).

    Raises:
        SourceError: the folder holds more entries than that (a home folder, ``/usr``...).
    """
    entries: list[Path] = []
    files: list[Path] = []
    pending: list[tuple[Path, int]] = [(folder, 0)]
    while pending:
        current, depth = pending.pop(0)
        try:
            with os.scandir(current) as listing:
                children = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in children:
            entries.append(Path(entry.path))
            if len(entries) > MAX_FOLDER_ENTRIES:
                weights = [
                    p.relative_to(folder).as_posix()
                    for p in files
                    if p.name.lower().endswith(WEIGHT_SUFFIXES)
                ]
                raise SourceError(
                    f"{source} is a folder of more than {MAX_FOLDER_ENTRIES} entries (searched "
                    f"{MAX_FOLDER_DEPTH} levels deep at most), not a model folder; weight files "
                    f"among the first {MAX_FOLDER_ENTRIES}: {list_names(weights, 5)}. Audit the "
                    "weight file or the model's own folder."
                )
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < MAX_FOLDER_DEPTH:
                        pending.append((Path(entry.path), depth + 1))
                elif entry.is_file(follow_symlinks=True):
                    files.append(Path(entry.path))
            except OSError:
                continue
    return FolderScan(entries=sorted(entries), files=sorted(files))


def weight_files(folder: Path) -> list[Path]:
    """Weight files under ``folder`` (a bounded search); ``state_dict.pth`` wins."""
    return scan_folder(folder, str(folder)).weight_files()
