"""The installed version of cluster-tracking (the package's ``__version__``), in a module of its
own so that any part of the package can record it without importing the package's facade."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cluster-tracking")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
