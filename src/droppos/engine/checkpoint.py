"""Checkpoints that survive crashes: atomic writes, a rolling `last`, periodic keeps.

A checkpoint records where the run is to go on from (`epoch`, `batch` within it, `global_step`),
so resuming neither skips nor repeats an epoch (the original saved `epoch + 1` and then added one
again on load, SPEC §4).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

LAST = "last.pth"


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint of ours (not only tensors: optimizer and counters too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def find_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`resume`: a path, `auto` (the output folder's `last.pth` if there is one) or None."""
    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        candidate = Path(output_dir) / LAST
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return path
