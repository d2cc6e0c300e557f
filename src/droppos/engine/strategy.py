"""How a model is spread over processes: the seam between the training loop and distribution.

A strategy wraps the bare model into what the step calls (compiled if asked), says how to skip
gradient synchronisation on all but the last micro-batch of an accumulation cycle, how much to
scale a loss share before backward, clips the gradient, and hands out the model's and the
optimiser's state in the single-process layout every checkpoint uses. The loop and the methods
touch the model only through the wrapped module and these calls, so a new way of distributing
(sharding parameters, say) is a new class here and nothing else.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from droppos.engine.distributed import DistEnv


class Strategy(Protocol):
    name: str
    loss_scale: float
    """Factor on each loss share before backward: the shares already sum to the global loss,
    and a strategy that averages gradients over ranks needs it multiplied back."""

    def wrap(self, model: nn.Module, compile_model: bool) -> nn.Module: ...

    def no_sync(self, engine_model: nn.Module) -> contextlib.AbstractContextManager[None]: ...

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor: ...

    def model_state(self, model: nn.Module) -> dict[str, Any]: ...

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None: ...

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict: ...

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None: ...


class SingleProcess:
    """One process, one device: nothing to synchronise."""

    name = "single"
    loss_scale = 1.0

    def wrap(self, model: nn.Module, compile_model: bool) -> nn.Module:
        return torch.compile(model) if compile_model else model

    def no_sync(self, engine_model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """The total gradient norm (one device value, no sync), clipped to `max_norm` if given."""
        parameters = [p for p in model.parameters() if p.grad is not None]
        if max_norm is not None:
            return nn.utils.clip_grad_norm_(parameters, max_norm)
        return nn.utils.get_total_norm([p.grad for p in parameters])

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        return model.state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        optimizer.load_state_dict(state)


class DDP(SingleProcess):
    """torchrun's processes, each a full replica (DistributedDataParallel): gradients are
    averaged over ranks in backward, so each rank's share is scaled by the world size."""

    name = "ddp"

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.loss_scale = float(env.world_size)

    def wrap(self, model: nn.Module, compile_model: bool) -> nn.Module:
        """DDP without per-forward buffer broadcasts: the only buffers are fixed sin-cos tables."""
        options: dict[str, Any] = {
            "device_ids": [self.env.device.index] if self.env.device.type == "cuda" else None
        }
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            options["forward_sync_buffers"] = False
        else:  # torch releases before forward_sync_buffers
            options["broadcast_buffers"] = False
        return DistributedDataParallel(super().wrap(model, compile_model), **options)

    @contextlib.contextmanager
    def no_sync(self, engine_model: nn.Module) -> Iterator[None]:
        with engine_model.no_sync():  # type: ignore[operator]
            yield


def strategy_for(env: DistEnv) -> Strategy:
    """DDP under torchrun with more than one process, else a single process."""
    return DDP(env) if env.distributed else SingleProcess()
