"""The one start of every command that computes: process group, device, precision, seed."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from droppos.engine.distributed import DistEnv, init_distributed
from droppos.engine.logging import show_progress
from droppos.engine.precision import resolve_precision
from droppos.outputs import PARTIAL_SUFFIX, write_text
from droppos.sections import RunSection


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


# torch's own choice, before any command changes it: the physical cores this process may use.
CORES = torch.get_num_threads()


def compute_threads(requested: int) -> int:
    """`--run.threads`: as asked, else this process's share of the cores when torchrun starts
    several on the machine. Loader workers are not subtracted: with OpenMP's threads sleeping
    while they wait (`OMP_WAIT_POLICY=PASSIVE`, set on import), a worker takes a core when it
    has work and gives it back. Measured on 2 cores, one worker: 2 threads beat 1 on an idle
    machine (the demo: 100 s against 112 s) and match it beside a busy process (18.8 s against
    18.0 s an epoch; spinning threads took 37.5 s). Workers that decode JPEGs on every core of
    a CPU-only run are another matter: then give `--run.threads` the cores the workers leave."""
    if requested > 0:
        return requested
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, CORES // local_processes)


# Left in every output folder a droppos command writes to: what tells a folder of droppos
# runs (which commands may write into again) from a folder of someone else's files.
RUN_MARKER = ".droppos-run"


def command_of(folder: Path) -> str | None:
    """The command whose run `folder` holds: the one its marker names, else (a folder from
    before the marker named it) the one its `results.json` records; None when it cannot tell."""
    marker = folder / RUN_MARKER
    if marker.is_file() and not marker.is_symlink():
        named = marker.read_text(encoding="utf-8", errors="replace").strip()
        if named:
            return named
    results = folder / "results.json"
    if results.is_file() and not results.is_symlink():
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads(results.read_text(encoding="utf-8"))
            if isinstance(recorded, dict) and isinstance(recorded.get("command"), str):
                return recorded["command"]
    return None


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` is droppos's: its marker, or (from before the marker) a checkpoint or
    a lock."""
    return any((folder / name).exists() for name in (RUN_MARKER, "last.pth", ".droppos.lock"))


def check_output_dir(folder: Path, reuse: bool = False, command: str | None = None) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written (a
    command would otherwise find out only when it saves, after the work), one that holds
    another command's run (its `config.yaml` and results would be overwritten), and one that
    holds files but no droppos run unless `reuse` (`--run.reuse_folder`)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--run.output_dir {folder} is a file, not a folder: choose another")
    owner = command_of(folder) if folder.is_dir() and command else None
    if owner is not None and owner != command:
        raise ValueError(
            f"--run.output_dir {folder} holds a `{owner}` run: give `{command}` a folder of "
            "its own (no command writes over another's outputs)"
        )
    if folder.is_dir() and not reuse and not holds_a_run(folder):
        foreign = sorted(
            p.name
            for p in folder.iterdir()
            if not (p.name.startswith(".droppos") or p.name.endswith(PARTIAL_SUFFIX))
        )
        if foreign:
            raise ValueError(
                f"--run.output_dir {folder} holds files but no droppos run ("
                f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): choose a new "
                "or empty folder, or pass --run.reuse_folder true to write into it"
            )
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"--run.output_dir {folder}: {existing} cannot be written by this user; choose "
            "another folder"
        )


def start(run: RunSection, command: str) -> RunContext:
    """Join the process group if torchrun started us, pick the device, the precision and the
    CPU threads (`compute_threads`), and seed torch with the same seed on every rank: every
    rank initialises the same model (FSDP keeps each rank's own shard of it; nothing is
    broadcast)."""
    check_output_dir(Path(run.output_dir), run.reuse_folder, command)
    threads = compute_threads(run.threads)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    env = init_distributed(run.device)
    if env.is_main:
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        marker = Path(run.output_dir) / RUN_MARKER
        if not os.path.lexists(marker):  # the folder's first run names it
            write_text(marker, command + "\n")
    precision = resolve_precision(run.precision, env.device)
    torch.manual_seed(run.seed)
    return RunContext(
        env=env, precision=precision, progress=show_progress(run.progress, env.is_main)
    )
