"""Training checkpoints: atomic writes, weights-only reads, and a resume that checks what it finds.

A checkpoint records where the run goes on from (`position`: the next epoch, the next per-rank
batch within it, the optimiser steps taken), so resuming neither skips nor repeats an epoch
(the original code saved `epoch + 1` and added one again on load). It also records the run's
geometry (ranks, per-rank batch, accumulation, steps per epoch) and configuration: a resume
that would silently change what a step means is refused, or converted where that is exact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from droppos.interop.checkpoints import load_checkpoint_object

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


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint of ours, unpickled weights-only: tensors, numbers, strings and
    containers; a file that needs anything else (code to run) is refused, saying why."""
    path = Path(path)
    try:
        state = load_checkpoint_object(path)
    except ValueError as error:  # a refused, truncated or foreign file, said in words
        raise ValueError(f"--run.resume: {error}") from None
    if not isinstance(state, dict) or "position" not in state or "model" not in state:
        raise ValueError(
            f"cannot resume from {path}: not a droppos training checkpoint (pick another "
            "--run.output_dir, or --run.resume null to start afresh)"
        )
    return state


def find_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`resume`: a path, `auto` (the output folder's `last.pth` if there is one) or None."""
    if resume in (None, "", "none", "null", "never"):
        return None
    if resume == "auto":
        candidate = Path(output_dir) / LAST
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--run.resume: no checkpoint at {path}")
    return path


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples compare as lists."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple | list) else value
    return flat


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key: saved -> current` for every option that differs."""
    old, new = flatten(saved), flatten(current)
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def check_resume(
    path: Path,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    geometry: Mapping[str, int],
    split_invariant: bool,
) -> tuple[dict[str, int], list[str]]:
    """Where to go on from `state` in a run of `config` and `geometry`, and notes to print.

    Refused (ValueError, one line): a different model configuration; a different split of the
    global batch, unless the method's steps do not depend on the split and the global batch
    and steps per epoch are unchanged (then the per-rank batch position is converted exactly).
    Other changed options (lr, epochs, ...) are allowed and named in a note.
    """
    saved_config = state.get("config") or {}
    changed_model = differences(saved_config.get("model", {}), config.get("model", {}))
    if changed_model:
        raise ValueError(
            f"--run.resume: {path} was trained with another model ("
            + "; ".join(f"model.{c}" for c in changed_model[:4])
            + "); pick another --run.output_dir or set --run.resume null"
        )
    position = dict(state["position"])
    saved = dict(state.get("geometry") or {})
    changed = [k for k in geometry if saved.get(k) != geometry[k]]
    if changed:
        said = ", ".join(f"{k} {saved.get(k)} -> {geometry[k]}" for k in changed)

        def global_batch(g: Mapping[str, Any]) -> int:
            return int(g.get("world_size", 0)) * g.get("batch_size", 0) * g.get("accum_steps", 0)

        convertible = (
            split_invariant
            and global_batch(saved) == global_batch(geometry)
            and saved.get("steps_per_epoch") == geometry["steps_per_epoch"]
            and position["batch"] % saved["accum_steps"] == 0
        )
        if not convertible:
            raise ValueError(
                f"--run.resume: {path} was written by a run with another batch geometry ({said}); "
                "resume with the same --optim.batch_size, --optim.accum_steps and number of "
                "processes, or choose another --run.output_dir"
            )
        steps_into_epoch = position["batch"] // saved["accum_steps"]
        position["batch"] = steps_into_epoch * geometry["accum_steps"]
    notes = []
    other = [
        c
        for c in differences(
            {k: v for k, v in saved_config.items() if k not in ("model", "run")},
            {k: v for k, v in config.items() if k not in ("model", "run")},
        )
        if not c.startswith(("optim.batch_size", "optim.accum_steps"))
    ]
    if changed:
        notes.append(f"same global batch, split differently ({said}): position converted")
    if other:
        notes.append("resuming with changed options: " + "; ".join(other[:6]))
    return position, notes
