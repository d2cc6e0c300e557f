"""Joining the process group that torchrun describes: NCCL on CUDA, gloo on CPU.

No launcher of our own: `torchrun` (or Slurm's `srun` through it) sets RANK / WORLD_SIZE /
LOCAL_RANK and the rendezvous, and this module only reads them. Started by torchrun, a process
joins the group even when it is the only one, so a one-GPU torchrun run talks NCCL like a
thousand-GPU one. The collectives themselves are in `engine/collectives.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool = False
    """Started by torchrun: a process group exists (even for one process)."""
    run_id: str | None = None
    """The job's id, the same in every restart of it (torchrun's, else Slurm's)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks this process's GPU when there is one, else the CPU."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' requested but no CUDA GPU is available; use --run.device cpu"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if preference == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def job_id() -> str | None:
    """What stays the same when a launcher restarts the whole job: torchrun's run id (its
    `--rdzv-id`), else Slurm's job id."""
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(name)
        if value and value != "none":
            return f"{name.lower()}:{value}"
    return None


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the process group when started by torchrun; otherwise a single process."""
    launched = launched_by_torchrun()
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    rank = int(os.environ.get("RANK", "0")) if launched else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            device_id=device if backend == "nccl" else None,
            timeout=timedelta(minutes=30),
        )
    return DistEnv(rank, world_size, local_rank, device, launched, job_id())


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
