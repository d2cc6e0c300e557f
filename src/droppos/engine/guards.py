"""What keeps a long run safe: divergence, preemption, a shared output folder, interrupted saves.

Each guard turns a fault into a `RunStopped`: one line for the user and an exit status. None of
them reads a device value on every step: the non-finite flag stays on the device and is read at
logging steps and before every save, so no checkpoint ever holds a non-finite weight.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from droppos.engine.distributed import DistEnv, sum_over_ranks

LOCK = ".droppos.lock"
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class RunStopped(Exception):
    """A run that ends early for a reason the user should read (one line) and an exit status:
    0 when the stop was asked for (a signal) and the run can be resumed, else 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGTERM (Slurm, Kubernetes, `docker stop`), SIGINT (Ctrl-C) and SIGUSR1 ask the run to
    stop at the next step boundary, save and exit 0; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signal.Signals(number).name


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss or gradient norm was not finite."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, step: int, finite: torch.Tensor) -> None:
        unseen = (self.first_bad < 0) & ~finite
        self.first_bad = torch.where(unseen, torch.full_like(self.first_bad, step), self.first_bad)

    def bad_step(self) -> int | None:
        """The first non-finite step, or None (reads one value from the device)."""
        step = int(self.first_bad)
        return None if step < 0 else step


def finite_step(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """True (on the device) when this step's loss and gradient norm are both finite."""
    finite = torch.isfinite(loss)
    if grad_norm is not None:
        finite = finite & torch.isfinite(grad_norm)
    return finite


class BadImageBudget:
    """Stops a run whose epoch holds more unreadable images than `--data.max_bad_fraction`."""

    def __init__(self, max_fraction: float, epoch_images: int) -> None:
        self.max_fraction = max_fraction
        self.epoch_images = epoch_images  # over every rank

    def check(self, bad: float) -> None:
        if bad > self.max_fraction * self.epoch_images:
            raise RunStopped(
                f"{int(bad)} unreadable images this epoch, more than --data.max_bad_fraction "
                f"{self.max_fraction} of {self.epoch_images}; the warnings above name them. Fix "
                "or remove them (or raise the fraction), then run the same command to resume"
            )


def agreed_flags(flags: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Host-side flags summed over ranks (one collective, on the device), so every rank decides
    the same; the flags themselves for one process."""
    if not env.distributed:
        return flags
    on_device = {k: torch.tensor(v, device=env.device) for k, v in flags.items()}
    return {k: float(v) for k, v in sum_over_ranks(on_device).items()}


class RunLock:
    """`output_dir/.droppos.lock`, holding the owner's host and pid: one run per folder.

    A lock whose process is gone (same host, dead pid) is stale: it is taken over, with a
    warning. Created with O_EXCL, so two runs starting together cannot both get it.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not _is_stale(owner):
                    raise ValueError(
                        f"another run (host {owner.get('host')}, pid {owner.get('pid')}, started "
                        f"{owner.get('started')}) is using {self.path.parent}; wait for it to "
                        "end, or choose another --run.output_dir"
                    ) from None
                print(
                    f"warning: taking over the stale lock {self.path} "
                    f"(process {owner.get('pid') if owner else '?'} is gone)",
                    file=sys.stderr,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as stream:
                json.dump(
                    {
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                    stream,
                )
            self.held = True
            return self
        raise ValueError(f"cannot take the lock {self.path}; remove it if no run uses the folder")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written by a process killed while creating it: stale


def _is_stale(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process: cannot tell, so respect it
    if owner.get("pid") == os.getpid():
        return True  # left by an earlier run of this very process that was never closed
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Temporary files of saves that a kill interrupted (`.last.pth.k2j4x9`): only the lock's
    holder calls this, so no save is in progress."""
    removed = []
    for path in Path(folder).glob(".*.pth.*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
