"""A training run's checkpoints: saved atomically and never non-finite, resumed with checks.

The layout is `interop/schema.py:TrainingCheckpoint`. A checkpoint records the run's geometry
(ranks, per-rank batch, accumulation, steps per epoch) and configuration: a resume that would
silently change what a step means is refused, or converted where that is exact. Before every
save the non-finite watch is read (one device value), so no file ever holds a diverged weight.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from droppos.engine.collectives import from_rank0
from droppos.engine.guards import NonFiniteWatch, RunStopped
from droppos.interop import sharded
from droppos.interop.schema import Progress, TrainingCheckpoint, load_object, save_atomic

LAST = "last.pth"
SHARDS = re.compile(r"shards-step\d{8}-(\d{3,})(-[0-9a-f]+)?")


def find_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`resume`: a path, `auto` (the output folder's `last.pth` if there is one) or None.

    A run never writes over another: starting afresh (None), or from a checkpoint elsewhere,
    in a folder whose `last.pth` holds a run is refused (ValueError), as that run's files
    would be replaced."""
    held = Path(output_dir) / LAST
    if resume == "auto":
        return held if held.is_file() else None
    fresh = resume in (None, "", "none", "null", "never")
    path = None if fresh else Path(resume)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"--run.resume: no checkpoint at {path}")
    if held.is_file() and (path is None or not path.samefile(held)):
        how = "start afresh" if path is None else f"go on from {path}"
        raise ValueError(
            f"{output_dir} holds a run ({held}); to {how} over it would replace its files: "
            "choose another --run.output_dir (or move that run away first)"
        )
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
    checkpoint: TrainingCheckpoint,
    config: Mapping[str, Any],
    geometry: Mapping[str, int],
    split_invariant: bool,
) -> tuple[Progress, list[str]]:
    """Where to go on from `checkpoint` in a run of `config` and `geometry`, and notes to print.

    Refused (ValueError, one line): a different model configuration; another `--run.seed` (the
    seed fixes every crop and mask: two would mix in one run); a different split of the
    global batch, unless the method's steps do not depend on the split and the global batch
    and steps per epoch are unchanged (then the per-rank batch position is converted exactly).
    Other changed options (lr, epochs, ...) are allowed and named in a note.
    """
    saved_config = checkpoint.config
    changed_model = differences(saved_config.get("model", {}), config.get("model", {}))
    if changed_model:
        raise ValueError(
            f"--run.resume: {path} was trained with another model ("
            + "; ".join(f"model.{c}" for c in changed_model[:4])
            + "): resume with the model it was trained with, or start afresh with "
            "--run.resume null in a new --run.output_dir"
        )
    saved_seed = saved_config.get("run", {}).get("seed")
    seed = config.get("run", {}).get("seed")
    if saved_seed is not None and seed is not None and saved_seed != seed:
        raise ValueError(
            f"--run.resume: {path} was trained with --run.seed {saved_seed}; going on with "
            f"{seed} would mix two seeds' crops and masks in one run: resume with "
            f"--run.seed {saved_seed}, or start afresh in another --run.output_dir"
        )
    progress = Progress(**vars(checkpoint.progress))
    saved = checkpoint.geometry
    changed = [k for k in geometry if saved.get(k) != geometry[k]]
    if changed:
        said = ", ".join(f"{k} {saved.get(k)} -> {geometry[k]}" for k in changed)

        def global_batch(g: Mapping[str, Any]) -> int:
            return int(g.get("world_size", 0)) * g.get("batch_size", 0) * g.get("accum_steps", 0)

        convertible = (
            split_invariant
            and global_batch(saved) == global_batch(geometry)
            and saved.get("steps_per_epoch") == geometry["steps_per_epoch"]
            and progress.batch % saved["accum_steps"] == 0
        )
        if not convertible:
            raise ValueError(
                f"--run.resume: {path} was written by a run with another batch geometry ({said}); "
                "resume with the same --optim.batch_size, --optim.accum_steps and number of "
                "processes, or choose another --run.output_dir"
            )
        progress.batch = progress.batch // saved["accum_steps"] * geometry["accum_steps"]
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
    return progress, notes


class Checkpointer:
    """Writes a run's checkpoints into its output folder (from the main process) and knows the
    last good one, which every stop message names.

    A sharded run's tensors go to a new `shards-stepSSSSSSSS-NNN-RUN/` folder at every save
    (written by every rank, renamed into place when complete); `last.pth`, written after it,
    names it. A folder no checkpoint names any more is removed, so a kill at any moment leaves
    the last complete checkpoint readable. A name is never used twice (RUN is drawn afresh by
    every run), so a file that names a folder since removed never reads another run's tensors.
    """

    def __init__(
        self,
        output_dir: str | Path,
        is_main: bool,
        device: torch.device,
        sharded: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.nonfinite = NonFiniteWatch(device)  # no checkpoint is written from a NaN
        self.sharded = sharded
        self.last_saved_step: int | None = None
        self.resumed_from: Path | None = None
        self._next_shards: int | None = None
        self._run_tag = ""

    def new_shards_folder(self, step: int) -> Path:
        """A folder name no save used before (the same on every rank)."""
        if not self.sharded:
            return self.output_dir
        if self._next_shards is None:
            used = [int(m.group(1)) for m in map(SHARDS.search, self._names()) if m]
            self._next_shards, self._run_tag = from_rank0(
                [1 + max(used, default=0), secrets.token_hex(4)]
            )
        name = f"shards-step{step:08d}-{self._next_shards:03d}-{self._run_tag}"
        self._next_shards += 1
        return self.output_dir / name

    def _names(self) -> list[str]:
        return [p.name for p in self.output_dir.iterdir()] if self.output_dir.is_dir() else []

    def remove_unnamed_shards(self) -> None:
        """Delete the shards folders that no file in the output folder that could be a
        checkpoint (`*.pth*`: a `last.pth.bak` a user moved aside too) names."""
        named = set()
        for path in self.output_dir.glob("*.pth*"):
            try:
                shards = load_object(path, whole=False).get("shards")
            except (OSError, ValueError):
                continue
            if isinstance(shards, str):
                named.add(shards)
        for name in self._names():
            if SHARDS.fullmatch(name) and name not in named:
                sharded.remove(self.output_dir / name)

    def save(
        self,
        checkpoint: TrainingCheckpoint,
        keep_as: str | None = None,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Write last.pth (and a kept copy, and extra files), never with a non-finite weight."""
        self.check_finite()
        if self.is_main:
            state = checkpoint.to_dict()
            targets: list[tuple[str, Mapping[str, Any]]] = [(LAST, state)]
            if keep_as is not None:
                targets.append((keep_as, state))
            targets += list((extra or {}).items())
            for name, content in targets:
                try:
                    save_atomic(content, self.output_dir / name)
                except OSError as error:
                    raise RunStopped(
                        f"could not write {self.output_dir / name} ({error.strerror or error}); "
                        f"{self.last_checkpoint_note()}; free space and run the same command "
                        "to resume"
                    ) from None
            if self.sharded:
                self.remove_unnamed_shards()
        self.last_saved_step = checkpoint.progress.step

    def last_checkpoint_note(self) -> str:
        if self.last_saved_step is not None:
            where = self.output_dir / LAST
            return f"the last good checkpoint is {where} (step {self.last_saved_step})"
        if self.resumed_from is not None:
            return f"the last good checkpoint is {self.resumed_from}"
        return "no checkpoint was written yet"

    def check_finite(self) -> None:
        """Stop, saying where, if any step since the start was non-finite (one device read)."""
        step = self.nonfinite.bad_step()
        if step is not None:
            raise RunStopped(
                f"the loss or gradient norm became NaN or infinite at step {step}; nothing "
                f"after it was saved and {self.last_checkpoint_note()}. Lower --optim.lr or "
                "raise --optim.warmup_epochs (or --run.on_nonfinite skip to skip such steps)"
            )
