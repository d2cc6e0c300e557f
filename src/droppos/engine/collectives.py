"""Every collective droppos makes, placed where the process group can reduce it.

NCCL reduces only tensors on the process's GPU, gloo only CPU tensors; a tensor on the wrong
device is an error the first time the collective runs (an epoch end, a logging step...). So no
module calls `torch.distributed` but this one (`tests/test_distributed.py` checks it), and each
helper moves what it is given to `collective_device()` (the GPU of an NCCL group, the CPU of a
gloo one) with `place`, runs one collective, and hands results back on the caller's device.

Under torchrun the process group exists even for one process, and the helpers run the
collective whenever a group exists: a one-GPU torchrun run exercises NCCL for real. Without a
group (a plain `python` or `droppos` process) they are the identity.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the process group, else (1, 0)."""
    if group_active():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def collective_device() -> torch.device:
    """Where the default group reduces tensors: this process's GPU for NCCL, else the CPU."""
    if group_active() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def place(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the device the group reduces on (a copy only when it is elsewhere)."""
    return tensor.to(collective_device())


def sum_over_ranks(values: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """Each value summed over ranks, in one all-reduce (computed in float64); every result has
    the dtype and device its input had (a number comes back as a tensor on the CPU)."""
    tensors = {name: torch.as_tensor(value) for name, value in values.items()}
    if not group_active():
        return tensors
    flat = place(torch.cat([t.detach().double().reshape(-1) for t in tensors.values()]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([t.numel() for t in tensors.values()])
    return {
        name: part.reshape(t.shape).to(device=t.device, dtype=t.dtype)
        for (name, t), part in zip(tensors.items(), parts)
    }


def gather_interleaved(shard: torch.Tensor, total: int) -> torch.Tensor:
    """Rank r's row i is sample i * world + r: all-gather padded shards, re-interleave, trim.
    The result is on `shard`'s device."""
    world, _ = world_and_rank()
    if not group_active():
        return shard[:total]
    rows = -(-total // world)
    padded = place(shard.new_zeros((rows, *shard.shape[1:])))
    padded[: len(shard)] = place(shard)
    parts = [place(torch.empty_like(padded)) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:total].to(shard.device)


def from_rank0(value: Any) -> Any:
    """`value` as rank 0 has it, on every rank (JSON-encodable values: lists, dicts, numbers,
    strings). Sent as bytes in a uint8 tensor, never pickled, so no rank runs another's code."""
    if not group_active():
        return value
    _, rank = world_and_rank()
    payload = json.dumps(value).encode() if rank == 0 else b""
    size = place(torch.tensor([len(payload)], dtype=torch.int64))
    dist.broadcast(size, src=0)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if rank == 0 else None
    buffer = place(data if data is not None else torch.empty(int(size), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().numpy()).decode()) if rank else value


def computed_by_rank0(compute: Callable[[], Any]) -> Any:
    """`compute()` run by rank 0 alone and received by every rank (a listing of a folder, say:
    walked once, not by every rank of every node). A user mistake it raises on rank 0 (a
    ValueError) is raised on every rank, so no rank waits for a value that never comes."""
    if not group_active():
        return compute()
    outcome: dict[str, Any] = {}
    if world_and_rank()[1] == 0:
        try:
            outcome = {"value": compute()}
        except ValueError as error:
            outcome = {"error": str(error)}
    outcome = from_rank0(outcome)
    if "error" in outcome:
        raise ValueError(outcome["error"])
    return outcome["value"]
