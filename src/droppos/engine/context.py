"""The one start of every command that computes: process group, device, precision, seed."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from droppos.engine.distributed import DistEnv, init_distributed
from droppos.engine.logging import show_progress
from droppos.engine.precision import resolve_precision
from droppos.engine.sections import RunSection


@dataclass(frozen=True)
class RunContext:
    """Where this process computes and how: its rank and device, the resolved precision, and
    whether it shows progress bars. Only the main process writes files and prints."""

    env: DistEnv
    precision: str
    progress: bool

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @classmethod
    def local(
        cls, device: torch.device | str = "cpu", precision: str = "fp32", progress: bool = False
    ) -> RunContext:
        """This process alone on `device` (no process group): for calling an evaluation from
        Python, as the benchmarks and tests do."""
        device = torch.device(device)
        return cls(DistEnv(0, 1, 0, device), resolve_precision(precision, device), progress)

    def say(self, line: str) -> None:
        """Print a line for the user, from the main process only."""
        if self.is_main:
            print(line, file=sys.stdout, flush=True)


def start(run: RunSection) -> RunContext:
    """Join the process group if torchrun started us, pick the device and the precision, and seed
    torch with the same seed on every rank: every rank initialises the same model (FSDP keeps
    each rank's own shard of it; nothing is broadcast)."""
    env = init_distributed(run.device)
    precision = resolve_precision(run.precision, env.device)
    torch.manual_seed(run.seed)
    return RunContext(
        env=env, precision=precision, progress=show_progress(run.progress, env.is_main)
    )
