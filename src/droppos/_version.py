"""The package's name and version: the one place below everything else that states them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PACKAGE = __name__.split(".")[0]
"""The distribution's import name (what checkpoints and exports record as their producer)."""

try:
    __version__ = version(PACKAGE)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
