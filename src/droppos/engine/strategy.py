"""How a model is spread over processes: the seam between the training loop and distribution.

A strategy wraps the bare model into what the step calls (compiled if asked), says how to skip
gradient synchronisation on all but the last micro-batch of an accumulation cycle, how much to
scale a loss share before backward, clips the gradient, and writes and restores the model's and
the optimiser's state. The loop and the methods touch the model only through the wrapped module
and these calls, so a new way of distributing is a new class here and a case in `strategy_for`.

- `SingleProcess`: one process, one device.
- `DDP`: every rank a full replica (DistributedDataParallel); the default under torchrun.
- `FSDP`: parameters, gradients and optimiser state sharded over the ranks (FSDP2,
  `torch.distributed.fsdp.fully_shard`), one shard group per transformer block plus the rest;
  with bf16, parameters are gathered in bf16 and gradients reduced in fp32, and the model's own
  inputs are not cast (masks, targets and loss weights are DDP's). Its checkpoints keep the
  tensors sharded (`interop/sharded.py`).

Every strategy stores the optimiser's state keyed by parameter name (torch's distributed state
dict API), so a run moves between strategies when its global batch is unchanged: a DDP
checkpoint resumes under FSDP and back.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, get_args

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from droppos.engine.distributed import DistEnv
from droppos.interop import sharded
from droppos.interop.schema import TrainingCheckpoint
from droppos.sections import StrategyName

STRATEGIES: tuple[str, ...] = get_args(StrategyName)


class Strategy(Protocol):
    name: str
    loss_scale: float
    """Factor on each loss share before backward: the shares already sum to the global loss,
    and a strategy that averages gradients over ranks needs it multiplied back."""
    sharded: bool
    """Whether its checkpoints keep the tensors in a shards folder."""

    def wrap(self, model: nn.Module, compile_model: bool) -> nn.Module: ...

    def no_sync(self, engine_model: nn.Module) -> contextlib.AbstractContextManager[None]: ...

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor: ...

    def settle(self, model: nn.Module) -> None:
        """Put the model back as training left it after inference outside the step (an
        evaluation, pictures): what state dicts and the optimiser expect."""
        ...

    def gathered(self, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """The bare model whole, for a no-grad pass that calls its parts rather than its
        `forward` (the monitors read the encoder's blocks one by one)."""
        ...

    def state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path
    ) -> tuple[dict[str, Any], dict[str, Any], str | None]: ...

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: TrainingCheckpoint
    ) -> None: ...


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU (gathered from the shards under FSDP: call it on
    every rank; the main rank gets the tensors)."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def _by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """An optimiser state dict keyed by parameter name: as given, or converted from the
    position-keyed layout of `optimizer.state_dict()` (checkpoints of droppos 0.2 and older)."""
    keys = list(state.get("state", {}))
    if not keys or not all(isinstance(k, int) for k in keys):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [
        {**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]
    ]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def check_can_compile(device: torch.device) -> None:
    """`--run.compile true` on the CPU: inductor writes C++ and builds it, so a machine without
    a C++ compiler would fail at the first step with a compiler traceback. Say it first."""
    if device.type != "cpu":
        return
    named = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([named] if named else ["g++", "clang++", "c++"])):
        raise ValueError(
            "--run.compile true on the CPU needs a C++ compiler (g++ or clang++, or set CXX): "
            "install one, or drop --run.compile"
        )


class SingleProcess:
    """One process, one device: nothing to synchronise."""

    name = "single"
    loss_scale = 1.0
    sharded = False

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

    def settle(self, model: nn.Module) -> None:
        return None

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        yield model

    def state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path
    ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        """(model state, optimiser state, shards folder name): here one file holds all."""
        return model.state_dict(), get_optimizer_state_dict(model, optimizer), None

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: TrainingCheckpoint
    ) -> None:
        """From a checkpoint read whole (a sharded run's tensors gathered from its folder)."""
        model.load_state_dict(saved.model)
        set_optimizer_state_dict(model, optimizer, _by_name(model, optimizer, saved.optimizer))


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
        """This micro-batch's backward keeps its gradients local, provided no forward armed
        DDP's reducer since the last all-reduce: every forward through the DDP module with
        autograd on outside `no_sync` does (the loop's no-grad pass ahead of the step runs
        without autograd for that reason)."""
        with engine_model.no_sync():  # type: ignore[operator]
            yield


class FSDP:
    """FSDP2 over torchrun's processes: each rank holds 1/world of the parameters, gradients and
    optimiser state, and gathers a block's parameters only while it runs. Gradients are
    averaged over ranks (like DDP), so shares are scaled by the world size."""

    name = "fsdp"
    sharded = True

    def __init__(self, env: DistEnv, precision: str) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if precision == "fp16":
            raise ValueError("--run.strategy fsdp takes bf16 or fp32; use --run.precision bf16")
        self.env = env
        self.loss_scale = float(env.world_size)
        if precision == "bf16":
            self.block_policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
            self.root_policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        else:
            self.block_policy = self.root_policy = MixedPrecisionPolicy()
        self.model: nn.Module | None = None

    def wrap(self, model: nn.Module, compile_model: bool) -> nn.Module:
        """One shard group per transformer block (encoder and decoders), one for the rest.

        In bf16 a block's inputs are activations, cast to bf16 as FSDP does by default; the
        root's are data (images, mask noise, soft targets, loss weights) and reach it as they
        are, as under DDP: noise rounded to bf16 ties at the mask's cut and draws other masks,
        and rounded targets and weights change the loss. Autocast, on wherever the model
        runs, puts the root's own layers in bf16."""
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module, mp_policy=self.block_policy)
        fully_shard(model, mp_policy=self.root_policy)
        self.model = model
        return torch.compile(model) if compile_model else model

    @contextlib.contextmanager
    def no_sync(self, engine_model: nn.Module) -> Iterator[None]:
        assert self.model is not None
        self.model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """The total norm over every rank's shards (a plain tensor on the device)."""
        norm = SingleProcess.clip_grad_norm(self, model, max_norm)  # type: ignore[arg-type]
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def settle(self, model: nn.Module) -> None:
        """A forward without backward leaves the root's parameters gathered: shard them again."""
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        """The root's own parameters (patch embedding, tokens, final norm) gathered; each
        block gathers its own as it runs."""
        model.unshard()  # type: ignore[operator]
        try:
            yield model
        finally:
            model.reshard()  # type: ignore[operator]

    def state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path
    ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        """Writes this rank's shards (collective) into a new folder beside the checkpoint; the
        checkpoint keeps the folder's name and the optimiser's parameter groups."""
        optimizer_state = get_optimizer_state_dict(model, optimizer)
        tensors = {
            "model": get_model_state_dict(model),
            "optimizer_state": optimizer_state["state"],
        }
        sharded.save(tensors, folder)
        return {}, {"param_groups": optimizer_state["param_groups"]}, folder.name

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: TrainingCheckpoint
    ) -> None:
        """Each rank reads its own part of a sharded checkpoint; a whole one (one process,
        DDP) is sharded as it loads."""
        folder = saved.shards_folder
        if folder is None:
            set_state_dict(
                model,
                optimizer,
                model_state_dict=saved.model,
                optim_state_dict=_by_name(model, optimizer, saved.optimizer),
                options=StateDictOptions(full_state_dict=True),
            )
            return
        optimizer_state = get_optimizer_state_dict(model, optimizer)  # initialised, sharded
        tensors = {
            "model": get_model_state_dict(model),
            "optimizer_state": optimizer_state["state"],
        }
        sharded.load_into(tensors, folder)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=tensors["model"],
            optim_state_dict={
                "state": tensors["optimizer_state"],
                "param_groups": saved.optimizer["param_groups"],
            },
        )


_CLASSES: dict[str, type] = {"auto": SingleProcess, "ddp": DDP, "fsdp": FSDP}
"""Each `--run.strategy` name's class (`auto`: one process, or DDP under torchrun)."""


def shards_the_model(choice: str) -> bool:
    """Whether `--run.strategy choice` keeps only a shard of the model on each rank (asked by
    a configuration before any process starts)."""
    return bool(_CLASSES[choice].sharded)


def strategy_for(env: DistEnv, choice: str = "auto", precision: str = "fp32") -> Strategy:
    """`auto`: DDP under torchrun (even for one process), else one process; `ddp` and `fsdp`
    need torchrun."""
    if choice not in STRATEGIES:
        raise ValueError(f"--run.strategy must be one of {', '.join(STRATEGIES)}, got {choice!r}")
    if choice != "auto" and not env.launched:
        raise ValueError(
            f"--run.strategy {choice} runs under torchrun: torchrun --nproc_per_node N -m "
            "droppos.cli.main ..."
        )
    if choice == "fsdp":
        return FSDP(env, precision)
    return DDP(env) if env.launched else SingleProcess()
