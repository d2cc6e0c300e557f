"""Steps every training command shares between building its model and running its loop."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from droppos.engine.config import OptimSection
from droppos.engine.distributed import DistEnv
from droppos.engine.optim import build_adamw, scaled_lr


def optimizer_steps_per_epoch(batches: int, batch_size: int, accum_steps: int) -> int:
    """Full accumulation cycles per epoch; a user error when not even one fits."""
    if batches < accum_steps:
        raise ValueError(
            f"the dataset gives {batches} batch(es) of {batch_size} per rank, fewer "
            f"than --optim.accum_steps {accum_steps}; lower the batch size"
        )
    return batches // accum_steps


def adamw_for_run(
    model: nn.Module, optim: OptimSection, world_size: int, layer_decay: float | None = None
) -> tuple[torch.optim.AdamW, float]:
    """AdamW at the run's peak lr: `optim.lr` if given, else `optim.base_lr` scaled by the
    effective batch (per-process batch x accumulation x processes)."""
    effective_batch = optim.batch_size * optim.accum_steps * world_size
    peak_lr = optim.lr or scaled_lr(optim.base_lr, effective_batch)
    optimizer = build_adamw(
        model, peak_lr, optim.weight_decay, optim.betas, layer_decay=layer_decay
    )
    return optimizer, peak_lr


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
