"""What the user sees: JSON lines, TensorBoard scalars, the resolved config; rank 0 writes."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from droppos.engine.collectives import sum_over_ranks
from droppos.engine.distributed import DistEnv
from droppos.outputs import open_for_append, write_text

Sums = dict[str, tuple[torch.Tensor, torch.Tensor]]


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON has no NaN, and a bare NaN
    makes a file that strict readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Strict JSON (non-finite floats as null), indented, with a final newline."""
    write_text(path, json.dumps(finite_json(value), indent=2, allow_nan=False) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def write_config(config: Any, folder: str | Path) -> Path:
    """`folder/config.yaml`: every option of a command's configuration as resolved, to pass back
    with `--config` and repeat the run."""
    path = Path(folder) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(_plain(dataclasses.asdict(config)), sort_keys=False)
    return write_text(path, text)


def show_progress(requested: bool, is_main: bool = True) -> bool:
    """Progress bars only where a person watches: on a terminal, from rank 0. Redirected to a
    file or a pipe, a run prints plain per-epoch lines instead of every bar refresh."""
    return requested and is_main and sys.stderr.isatty()


class MetricWriter:
    """Appends `{"kind": ..., "step": ..., **metrics}` to `metrics.jsonl`; mirrors to TensorBoard.

    Resumed runs append to the same files, so a crash leaves one continuous record.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open_for_append(output_dir / "metrics.jsonl")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
        if self._tensorboard is not None:
            for name, value in metrics.items():
                if (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and (math.isfinite(value))
                ):
                    self._tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def image(self, tag: str, picture: Any, step: int) -> None:
        """An RGB picture [H, W, 3] (uint8) to TensorBoard's Images tab."""
        if self.enabled and self._tensorboard is not None:
            self._tensorboard.add_image(tag, picture, step, dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, optionally of one kind (`step`, `epoch`, ...)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [r for r in records if kind is None or r["kind"] == kind]


class MetricSums:
    """Running (numerator, denominator) sums on the device, and the loss summed per step."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.loss = torch.zeros((), device=env.device)
        self.steps = 0
        self.skipped = 0
        self.sums: dict[str, list[torch.Tensor]] = {}

    def add(self, loss: torch.Tensor, metrics: Sums) -> None:
        self.loss = self.loss + loss
        self.steps += 1
        for name, (num, den) in metrics.items():
            found = self.sums.setdefault(name, [torch.zeros((), device=num.device)] * 2)
            found[0], found[1] = found[0] + num.float(), found[1] + den.float()

    def means(self) -> dict[str, float]:
        """One collective and one host read for everything: exact global-batch averages."""
        if not self.steps:
            return {}
        names = list(self.sums)
        flat = [self.loss] + [t for n in names for t in self.sums[n]]
        values = sum_over_ranks({"all": torch.stack(flat)})["all"].tolist()
        result = {"loss": values[0] / self.steps}
        for i, name in enumerate(names):
            num, den = values[1 + 2 * i], values[2 + 2 * i]
            result[name] = num / den if den else math.nan
        return result
