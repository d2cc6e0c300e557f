"""torchrun-launched DDP: NCCL on CUDA, gloo on CPU; a no-op for one process.

No launcher of our own: `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous for
multi-node runs), and this module only reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

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


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the process group when started by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def sum_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor summed over ranks, in one collective; the identity for one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    names = list(values)
    tensors = [torch.as_tensor(values[n]) for n in names]
    flat = torch.cat([t.double().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([t.numel() for t in tensors])
    return {n: p.reshape(t.shape).to(t.dtype) for n, p, t in zip(names, parts, tensors)}


def gather_interleaved(shard: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Rank r's row i is sample i * world + r: all-gather padded shards, re-interleave, trim."""
    rows = -(-total // world)
    padded = shard.new_zeros((rows, *shard.shape[1:]))
    padded[: len(shard)] = shard
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]
