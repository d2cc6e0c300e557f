"""Steps every training command shares between building its model and running its loop."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from droppos.engine.distributed import DistEnv


def optimizer_steps_per_epoch(batches: int, batch_size: int, accum_steps: int) -> int:
    """Full accumulation cycles per epoch; a user error when not even one fits."""
    if batches < accum_steps:
        raise ValueError(
            f"the dataset gives {batches} batch(es) of {batch_size} per rank, fewer "
            f"than --optim.accum_steps {accum_steps}; lower the batch size"
        )
    return batches // accum_steps


def wrap_ddp(model: nn.Module, env: DistEnv) -> DistributedDataParallel:
    """DDP without per-forward buffer broadcasts: the only buffers are fixed sin-cos tables."""
    options: dict[str, Any] = {
        "device_ids": [env.device.index] if env.device.type == "cuda" else None
    }
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        options["forward_sync_buffers"] = False
    else:  # torch releases before forward_sync_buffers
        options["broadcast_buffers"] = False
    return DistributedDataParallel(model, **options)


def prepare_for_training(model: nn.Module, env: DistEnv, compile_model: bool) -> nn.Module:
    """What the step calls: the model, compiled if asked, DDP-wrapped under torchrun."""
    engine_model: nn.Module = torch.compile(model) if compile_model else model
    if env.distributed:
        engine_model = wrap_ddp(engine_model, env)
    return engine_model
