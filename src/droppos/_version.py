"""The package's name and version: the one place below everything else that states them.

`pyproject.toml` reads the version from here (so the wheel, `droppos --version` and the
documentation site say the same); CHANGELOG.md's newest entry names it too."""

from __future__ import annotations

PACKAGE = __name__.split(".")[0]
"""The distribution's import name (what checkpoints and exports record as their producer)."""

__version__ = "0.1.0"
"""This release (semantic versioning); a release bumps it here and adds a CHANGELOG.md entry."""
