"""What keeps a long run safe: divergence, preemption, a shared output folder, interrupted saves.

Each guard turns a fault into a `RunStopped`: one line for the user and an exit status. None of
them reads a device value on every step: the non-finite flag stays on the device and is read at
logging steps and before every save, so no checkpoint ever holds a non-finite weight.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from droppos.engine.collectives import sum_over_ranks
from droppos.engine.distributed import DistEnv
from droppos.outputs import PARTIAL_SUFFIX

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
    """Host-side flags summed over ranks (one collective and one read), so every rank decides
    the same; the flags themselves for one process."""
    if not env.distributed:
        return flags
    return {k: float(v) for k, v in sum_over_ranks(flags).items()}


class StepFlags:
    """Host-side flags of every rank (a stop signal, a bad-image count), agreed at every
    optimiser step without a collective of their own: they ride in the all-reduce of the
    step's loss normalisers, and come back through pinned memory. Reading them waits for that
    all-reduce of the current step only, never for the queue to drain: the step's backward and
    optimiser are already queued behind it."""

    PREFIX = "flag:"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._names: list[str] = []
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def outgoing(self, flags: dict[str, float]) -> dict[str, torch.Tensor]:
        """Entries to add to the step's normaliser all-reduce (filled on the device: no copy)."""
        self._names = list(flags)
        return {
            f"{self.PREFIX}{k}": torch.full((), float(v), device=self.device, dtype=torch.float64)
            for k, v in flags.items()
        }

    def arrived(self, reduced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Take the flags out of the reduced normalisers (returned without them) and start
        their copy to the host."""
        flags = torch.stack([reduced.pop(f"{self.PREFIX}{k}") for k in self._names])
        if self.device.type == "cuda":
            self._host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flags
        return reduced

    def read(self) -> dict[str, float] | None:
        """This step's agreed flags, or None when the step carried none."""
        if self._host is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        values, self._host, self._event = self._host.tolist(), None, None
        return dict(zip(self._names, values))


class RunLock:
    """`output_dir/.droppos.lock`: one run per folder.

    It records its owner (host, pid, the job's run id when a launcher gives one) and a
    heartbeat that a background thread renews every `HEARTBEAT` seconds. Another run is refused
    while the lock is alive. It is taken over (with a warning) when its process is gone (same
    host, dead pid), when it belongs to this very job (a restart of the whole job by torchrun or
    Slurm, which keeps the run id, perhaps on other hosts), or when its heartbeat stopped for
    `STALE_AFTER` seconds (a host that died). The lock is created with its content in one step
    (a hard link of a complete file), so two runs starting together cannot both get it.
    """

    HEARTBEAT = 60.0
    STALE_AFTER = 600.0

    def __init__(self, folder: str | Path, run_id: str | None = None) -> None:
        self.path = Path(folder) / LOCK
        self.run_id = run_id
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _content(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run_id": self.run_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "heartbeat": time.time(),
        }

    def _write_temporary(self, content: dict[str, Any]) -> Path:
        handle, name = tempfile.mkstemp(prefix=f"{LOCK}.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(handle, "w") as stream:
            json.dump(content, stream)
        return Path(name)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = self._content()
        for _ in range(3):
            temporary = self._write_temporary(content)
            try:
                os.link(temporary, self.path)  # fails if the lock exists: atomic, and complete
            except FileExistsError:
                owner = self._owner()
                why = self._stale(owner)
                if why is None:
                    raise ValueError(
                        f"another run (host {owner.get('host')}, pid {owner.get('pid')}, started "
                        f"{owner.get('started')}) is using {self.path.parent}; wait for it to "
                        "end, or choose another --run.output_dir"
                    ) from None
                print(f"warning: taking over the stale lock {self.path} ({why})", file=sys.stderr)
                self._claim_stale()
                continue
            finally:
                temporary.unlink(missing_ok=True)
            self.held = True
            self._start_heartbeat(content)
            return self
        raise ValueError(f"cannot take the lock {self.path}; remove it if no run uses the folder")

    def _claim_stale(self) -> None:
        """Move the stale lock aside (only one of two claimants can), then delete it."""
        aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, aside)
            aside.unlink(missing_ok=True)

    def _start_heartbeat(self, content: dict[str, Any]) -> None:
        def beat() -> None:
            while not self._stop.wait(self.HEARTBEAT):
                with contextlib.suppress(OSError):
                    temporary = self._write_temporary({**content, "heartbeat": time.time()})
                    os.replace(temporary, self.path)

        self._beat = threading.Thread(target=beat, name="droppos-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        if self.held:
            self._stop.set()
            if self._beat is not None:
                self._beat.join(timeout=5)
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict[str, Any]:
        try:
            found = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _stale(self, owner: dict[str, Any]) -> str | None:
        """Why the lock `owner` holds may be taken over, or None while it is alive."""
        if self.run_id is not None and owner.get("run_id") == self.run_id:
            return f"a restart of this job, {self.run_id}"
        beat = owner.get("heartbeat")
        if not isinstance(beat, int | float):  # unreadable or from an older droppos: its age
            with contextlib.suppress(OSError):
                beat = self.path.stat().st_mtime
        if isinstance(beat, int | float) and time.time() - beat > self.STALE_AFTER:
            return f"no heartbeat for {time.time() - beat:.0f} s"
        if owner.get("host") == socket.gethostname() and _process_gone(owner.get("pid")):
            return f"process {owner.get('pid')} is gone"
        return None


def _process_gone(pid: Any) -> bool:
    if pid == os.getpid():
        return True  # left by an earlier run of this very process that was never closed
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError, OverflowError):
        return False
    return False


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Partial files of saves that a kill interrupted (`.last.pth.k2j4x9.droppos-partial`), and
    nothing else (a user's `.model.pth.bak` stays): only the lock's holder calls this, so no
    save is in progress."""
    removed = []
    for path in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
