"""The one training loop: each command supplies a `TrainingMethod`, the loop does the rest.

What the loop owns: the epoch and its optimiser steps, gradient accumulation, autocast and the
fp16 scaler, the per-iteration lr schedule, metrics, and when to save. What it delegates: how the
model is distributed (`engine/strategy.py`: wrapping, no_sync, clipping, state), how checkpoints
are written and resumed (`engine/checkpointing.py`), what stops a run (`engine/guards.py`). What a
method owns: its model, how a batch reaches the device, and its forward (`StepResult`); it calls
the model only through the wrapped module the loop hands it.

Global loss normalisation: each loss term is a sum divided by a denominator (the attentive
weights of the dropped tokens, the masked patches, the images). The denominators are summed
over every micro-batch of one optimiser step and every rank before any backward, so one step's
gradient is the gradient of the whole global batch's loss, however that batch is split. With
one micro-batch the forward's own sums are all-reduced between forward and backward; with
accumulation the method computes them ahead (`TrainingMethod.ahead`), and the loop runs that
pass without autograd: through the wrapped model with autograd on, it would arm DDP's reducer,
and the first `no_sync` micro-batch's backward would all-reduce the gradients too, twice the
traffic of the one all-reduce an optimiser step needs (the last micro-batch's).

Everything random in a step is a function of (seed, epoch, sample index), so a resumed run sees
exactly the batches and masks an unbroken one would. Metrics stay on the device as sums and are
read once every `log_every` steps.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from droppos._version import PACKAGE
from droppos.data.loader import build_loader, set_epoch
from droppos.engine.checkpointing import LAST, Checkpointer, check_resume, find_resume
from droppos.engine.collectives import sum_over_ranks
from droppos.engine.context import RunContext
from droppos.engine.distributed import DistEnv
from droppos.engine.guards import (
    BadImageBudget,
    RunLock,
    RunStopped,
    StepFlags,
    StopSignals,
    agreed_flags,
    finite_step,
    remove_temporary_files,
)
from droppos.engine.logging import MetricSums, MetricWriter, Sums, write_config, write_json
from droppos.engine.optim import adamw_for_run, lr_at_step, set_lr
from droppos.engine.precision import autocast, grad_scaler
from droppos.engine.strategy import Strategy, check_can_compile, strategy_for
from droppos.interop.schema import Header, Progress, TrainingCheckpoint
from droppos.models.attention import fused_attention_pays, use_fused_attention
from droppos.sections import DataSection, OptimSection, TrainRunSection

Result = TypeVar("Result")


@dataclass
class StepResult:
    """One micro-batch's forward, as the loop needs it.

    normalisers: this shard's denominator of each loss term (summed over ranks by the loop).
    share: given the global denominators, this shard's share of the global loss (with grad).
    metrics: every metric as (numerator, denominator) sums, detached.
    """

    normalisers: dict[str, torch.Tensor]
    share: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    metrics: Sums


class TrainingMethod(Protocol):
    """What pre-training methods and fine-tuning supply to the loop."""

    model: nn.Module
    """The bare model: what the strategy wraps, optimises, clips and saves."""
    split_invariant: bool
    """True when a step depends only on its global batch, not on how it is split over ranks
    and micro-batches: a resume may then change that split."""

    def start_epoch(self, epoch: int, batch: int) -> None:
        """Called before an epoch's first step (`batch` > 0 after a mid-epoch resume)."""
        ...

    def ahead(self, engine_model: nn.Module, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """Work computed before the step, with accumulation: (cache for `forward`, local
        normalisers). The loop calls it under `torch.no_grad()`."""
        ...

    def to_device(self, batch: Any) -> Any:
        """A loader batch on the device (images decoded and normalised there when they come
        encoded or as uint8): called once per micro-batch, before `ahead` and `forward`."""
        ...

    def forward(self, engine_model: nn.Module, batch: Any, cache: Any) -> StepResult: ...

    def after_step(self, step: int) -> None: ...

    def end_epoch(
        self, strategy: Strategy, epoch: int, metrics: dict[str, float]
    ) -> dict[str, Any]:
        """Extra epoch metrics (evaluation), pictures and files to write:
        {"metrics", "images", "files"}; inference outside the step asks `strategy` for what it
        needs of the model."""
        ...

    def epoch_line(self, metrics: dict[str, float]) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> Header:
        """What a checkpoint of this method says about itself (read back by every command)."""
        ...


def optimizer_steps_per_epoch(
    batches: int, batch_size: int, accum_steps: int, images: int | None = None, world: int = 1
) -> int:
    """Full accumulation cycles per epoch; a user error when not even one fits (saying how
    many images the source holds, when known, and what one optimiser step needs)."""
    if batches < accum_steps:
        found = f"the data source holds {images} image(s): " if images is not None else ""
        need = batch_size * accum_steps * world
        raise ValueError(
            f"{found}{batches} full batch(es) of {batch_size} per process, fewer than "
            f"--optim.accum_steps {accum_steps} (one optimiser step needs {need} images); "
            "lower --optim.batch_size or --optim.accum_steps, or add images"
        )
    return batches // accum_steps


def replaced_images(dataset: Dataset) -> int:
    """Unreadable images the training set has replaced so far (0 for one that replaces none)."""
    return int(getattr(dataset, "replaced", 0))


@dataclass
class TrainLoop:
    """A run of one method: built by `build_loop`, driven by `run`."""

    method: TrainingMethod
    context: RunContext
    strategy: Strategy
    optim: OptimSection
    run_options: TrainRunSection
    data: DataSection
    config: dict[str, Any]
    train_set: Dataset
    engine_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    peak_lr: float
    checkpointer: Checkpointer
    progress: Progress = field(default_factory=Progress)
    notes: list[str] = field(default_factory=list)
    lock: RunLock | None = None
    signals: StopSignals = field(default_factory=StopSignals)
    skipped_in_a_row: int = 0
    bad_images_at_epoch_start: int = 0
    step_flags: StepFlags = field(init=False)
    upcoming: OnDevice | None = None
    collate_fn: Any = None
    loader: DataLoader = field(init=False)
    steps_per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        """What follows from the loop's own sections: the attention kernel of its device and
        precision (a compiled model traces at its first forward, so after wrapping is in time),
        its loader (this rank's shard, in an order that is a function of seed and epoch), and
        its schedule (optimiser steps an epoch, as many epochs as `--optim.min_steps` needs)."""
        self.step_flags = StepFlags(self.env.device)
        use_fused_attention(
            self.method.model, fused_attention_pays(self.env.device, self.precision)
        )
        self.loader = build_loader(
            self.train_set,
            self.optim.batch_size,
            shuffle=True,
            seed=self.run_options.seed,
            num_workers=self.data.num_workers,
            prefetch_factor=self.data.prefetch_factor,
            drop_last=True,
            replicas=(self.env.world_size, self.env.rank),
            device_type=self.env.device.type,
            timeout=self.data.timeout,
            collate_fn=self.collate_fn,
        )
        self.steps_per_epoch = optimizer_steps_per_epoch(
            len(self.loader),
            self.optim.batch_size,
            self.optim.accum_steps,
            len(self.train_set),  # type: ignore[arg-type]
            self.env.world_size,
        )
        self.optim, note = epochs_for_min_steps(self.optim, self.steps_per_epoch)
        self.notes.extend(note)

    def close(self) -> None:
        """Release the output folder (every command calls it however the run ended)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def env(self) -> DistEnv:
        return self.context.env

    @property
    def precision(self) -> str:
        return self.context.precision

    @property
    def finished(self) -> bool:
        return self.progress.epoch >= self.optim.epochs

    @property
    def output_dir(self) -> Path:
        return Path(self.run_options.output_dir)

    @property
    def resumed_from(self) -> Path | None:
        return self.checkpointer.resumed_from

    # -- checkpoints -------------------------------------------------------------------------

    def geometry(self) -> dict[str, int]:
        """How the global batch is split; a resume checks it (see `check_resume`)."""
        return {
            "world_size": self.env.world_size,
            "batch_size": self.optim.batch_size,
            "accum_steps": self.optim.accum_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def checkpoint(self) -> TrainingCheckpoint:
        """The run's state now (a sharding strategy writes its shards here, on every rank)."""
        folder = self.checkpointer.new_shards_folder(self.progress.step)
        model, optimizer, shards = self.strategy.state(self.method.model, self.optimizer, folder)
        return TrainingCheckpoint(
            header=self.method.describe(),
            model=model,
            optimizer=optimizer,
            scaler=self.scaler.state_dict(),
            progress=Progress(**asdict(self.progress)),
            geometry=self.geometry(),
            config=self.config,
            method_state=self.method.state_dict(),
            shards=shards,
        )

    def save(self, extra: dict[str, dict[str, Any]] | None = None, keep: bool = False) -> None:
        """Write last.pth (and a kept copy or extra files), never with a non-finite weight."""
        keep_as = f"checkpoint-{self.progress.epoch:04d}.pth" if keep else None
        self.checkpointer.check_finite()  # before any tensor is written, shards included
        self.checkpointer.save(self.checkpoint(), keep_as, extra)

    def restore(self, path: Path) -> None:
        saved = TrainingCheckpoint.read(path, whole=not self.strategy.sharded)
        this = self.method.describe()
        if saved.header.label != this.label:  # another command's or method's run
            raise ValueError(
                f"--run.resume: {path} holds a {saved.header.label}, not a {this.label} like "
                "this run's: resume from a last.pth this command wrote with this model, or "
                "start afresh with --run.resume null in a new --run.output_dir"
            )
        progress, notes = check_resume(
            path, saved, self.config, self.geometry(), self.method.split_invariant
        )
        try:
            self.strategy.restore(self.method.model, self.optimizer, saved)
            self.scaler.load_state_dict(saved.scaler)
            self.method.load_state_dict(saved.method_state)
        except (KeyError, RuntimeError, ValueError, AssertionError) as error:
            raise ValueError(
                f"--run.resume: {path} does not fit this run ({str(error).splitlines()[0][:200]}); "
                "pick another --run.output_dir"
            ) from None
        self.progress = progress
        self.checkpointer.resumed_from = path
        self.notes.extend(notes)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the last epoch; return (and write to summary.json) the last epoch's metrics."""
        writer = MetricWriter(
            self.output_dir, enabled=self.env.is_main, tensorboard=self.run_options.tensorboard
        )
        summary: dict[str, Any] = {}
        started = time.perf_counter()
        # The run's own last.pth is its last good checkpoint only when it resumed from it (a
        # `--run.resume PATH` into a fresh folder has none there yet: the note names PATH).
        origin, own = self.checkpointer.resumed_from, self.output_dir / LAST
        resumed = origin is not None and own.is_file() and origin.samefile(own)
        self.checkpointer.last_saved_step = self.progress.step if resumed else None
        try:
            with self.signals:
                while not self.finished:
                    summary = self.run_epoch(writer)
        finally:
            writer.close()
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        summary["strategy"] = self.strategy.name
        summary["processes"] = self.env.world_size
        summary["precision"], summary["threads"] = self.precision, torch.get_num_threads()
        if self.env.is_main:
            write_json(self.output_dir / "summary.json", summary)
        return summary

    def local_flags(self) -> dict[str, float]:
        """What this process has seen since the epoch began: a stop signal, unreadable images."""
        bad = replaced_images(self.loader.dataset) - self.bad_images_at_epoch_start
        return {"signal": float(self.signals.received is not None), "bad": float(bad)}

    def poll(self, full: bool) -> None:
        """Act on what may have happened since the last step: a stop signal, too many bad
        images, a non-finite step. Ranks decide together: after every step on the flags the
        step's all-reduce carried (`StepFlags`), and at logging steps (`full`) on a fresh
        agreement, with the non-finite check; a single process looks at its own flags."""
        if self.env.distributed and not full:
            flags = self.step_flags.read()
            if flags is None:
                return
        else:
            flags = agreed_flags(self.local_flags(), self.env)
        if full:
            self.checkpointer.check_finite()
        epoch_images = self.steps_per_epoch * self.optim.accum_steps * self.optim.batch_size
        BadImageBudget(self.data.max_bad_fraction, epoch_images * self.env.world_size).check(
            flags["bad"]
        )
        if flags["signal"]:
            self.save()
            name = self.signals.received or "a stop signal"
            raise RunStopped(
                f"stopped by {name} at epoch {self.progress.epoch + 1}, step "
                f"{self.progress.step}; saved {self.output_dir / LAST}: run the same command "
                "to resume exactly there",
                exit_code=0,
            )

    def run_epoch(self, writer: MetricWriter) -> dict[str, Any]:
        pos, accum = self.progress, self.optim.accum_steps
        total_steps = self.optim.epochs * self.steps_per_epoch
        warmup_steps = round(self.optim.warmup_epochs * self.steps_per_epoch)
        set_epoch(self.loader, pos.epoch, start_batch=pos.batch)
        self.method.start_epoch(pos.epoch, pos.batch)
        self.bad_images_at_epoch_start = replaced_images(self.loader.dataset)
        self.engine_model.train()
        epoch_sums, window_sums = MetricSums(self.env), MetricSums(self.env)
        window_images, window_start = 0, time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=pos.batch // accum,
            desc=f"epoch {pos.epoch + 1}/{self.optim.epochs}",
            disable=not self.context.progress,
            dynamic_ncols=True,
            leave=False,
        )
        steps = self.optimizer_steps()
        following = next(steps, None)
        self.upcoming = None
        while following is not None:
            micro_batches, following = following, next(steps, None)
            set_lr(
                self.optimizer,
                lr_at_step(pos.step, total_steps, warmup_steps, self.peak_lr, self.optim.min_lr),
            )
            loss, metrics, images, grad_norm, applied = self.train_step(micro_batches, following)
            pos.step += 1
            pos.batch += accum
            bar.update(1)
            if applied:
                self.method.after_step(pos.step)
                epoch_sums.add(loss, metrics)
                window_sums.add(loss, metrics)
            else:
                epoch_sums.skipped += 1
            window_images += images * self.env.world_size
            logging_step = pos.step % self.run_options.log_every == 0
            self.poll(full=logging_step)

            if logging_step:
                record = window_sums.means()
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                record["lr"] = max(g["lr"] for g in self.optimizer.param_groups)
                record["images_per_second"] = window_images / elapsed
                record["epoch"] = pos.epoch + pos.batch / (self.steps_per_epoch * accum)
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                writer.write("step", pos.step, record)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "epoch"})
                window_sums, window_images = MetricSums(self.env), 0
                window_start = time.perf_counter()
            every = self.run_options.save_every_steps
            if every and pos.step % every == 0:
                self.save()
        bar.close()

        self.poll(full=True)
        metrics: dict[str, Any] = epoch_sums.means()
        metrics["lr"] = max(g["lr"] for g in self.optimizer.param_groups)
        bad = replaced_images(self.loader.dataset) - self.bad_images_at_epoch_start
        metrics["bad_images"] = int(sum_over_ranks({"n": float(bad)})["n"])
        if epoch_sums.skipped:
            metrics["skipped_steps"] = epoch_sums.skipped
        pos.epoch, pos.batch = pos.epoch + 1, 0
        extra = self.method.end_epoch(self.strategy, pos.epoch - 1, metrics)
        self.strategy.settle(self.method.model)
        metrics.update(extra.get("metrics", {}))
        writer.write("epoch", pos.step, {"epoch": pos.epoch, **metrics})
        for tag, picture in extra.get("images", {}).items():
            writer.image(tag, picture, pos.step)
        if self.env.is_main:
            faults = ""
            if metrics["bad_images"]:
                faults += f" ({metrics['bad_images']} unreadable images skipped)"
            if epoch_sums.skipped:
                faults += f" ({epoch_sums.skipped} non-finite steps skipped)"
            tqdm.write(
                f"epoch {pos.epoch}/{self.optim.epochs}: "
                + self.method.epoch_line(metrics)
                + faults,
                file=sys.stdout,
            )
        keep_every = self.run_options.keep_every_epochs
        self.save(extra.get("files"), keep=bool(keep_every) and pos.epoch % keep_every == 0)
        return metrics

    def train_step(
        self, micro_batches: list[Any], following: list[Any] | None
    ) -> tuple[torch.Tensor, Sums, int, torch.Tensor, bool]:
        """One optimiser step on `micro_batches`, sending the first batch of the `following`
        step to the device while this one computes (the next call picks it up). Returns the
        loss, the metric sums, the image count, the gradient norm and whether it was applied."""
        micro_batches = list(micro_batches)
        if self.upcoming is not None:  # sent to the device during the previous step
            micro_batches[0], self.upcoming = self.upcoming, None
        flags = self.local_flags() if self.env.distributed else None
        upcoming = following[0] if following is not None else None
        loss, metrics, images = self.accumulate(micro_batches, flags, upcoming)
        grad_norm, applied = self.optimizer_step(loss)
        return loss, metrics, images, grad_norm, applied

    def optimizer_steps(self) -> Iterator[list[Any]]:
        """The loader's batches grouped by optimiser step; a ragged tail is left out."""
        group: list[Any] = []
        remaining = self.steps_per_epoch - self.progress.batch // self.optim.accum_steps
        for batch in self.loader:
            if remaining <= 0:
                break
            group.append(batch)
            if len(group) == self.optim.accum_steps:
                yield group
                group, remaining = [], remaining - 1

    def accumulate(
        self,
        micro_batches: list[Any],
        flags: dict[str, float] | None = None,
        upcoming: Any = None,
    ) -> tuple[torch.Tensor, Sums, int]:
        """Forward and backward every micro-batch of one step, with global normalisers (their
        all-reduce also carries the ranks' `flags`, read back by `poll`).

        Each micro-batch goes to the device once (`TrainingMethod.to_device`), and the next one
        is sent (decoded, on the device path) right after the current forward is queued, before
        its backward: the transfer overlaps the computation. `upcoming`, the next step's first
        loader batch, is sent after this step's last forward; the next call finds it there.
        """
        method, device, model = self.method, self.env.device, self.engine_model
        last = len(micro_batches) - 1
        counts = [batch_size(b.raw if isinstance(b, OnDevice) else b) for b in micro_batches]
        batches = list(micro_batches)

        def ready(j: int) -> Any:
            if not isinstance(batches[j], OnDevice):
                batches[j] = OnDevice(method.to_device(batches[j]), batches[j])
            return batches[j].batch

        caches: list[Any] = [None] * len(micro_batches)
        riding = self.step_flags.outgoing(flags) if flags is not None else {}

        def reduce(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            reduced = sum_over_ranks({**local, **riding})
            return self.step_flags.arrived(reduced) if riding else reduced

        normalisers: dict[str, torch.Tensor] | None = None
        if last > 0:  # every denominator of the step is needed before the first backward
            local: dict[str, torch.Tensor] = {}
            for j in range(len(batches)):
                # Without autograd: a forward through DDP with it on arms DDP's reducer, and
                # the first `no_sync` micro-batch's backward would all-reduce anyway.
                with torch.no_grad(), autocast(device, self.precision):
                    caches[j], sums = method.ahead(model, ready(j))
                for name, value in sums.items():
                    local[name] = local.get(name, 0) + value.float()
            normalisers = reduce(local)
        loss = torch.zeros((), device=device)
        metrics: Sums = {}
        images = 0
        for j in range(len(batches)):
            sync = self.strategy.no_sync(model) if j < last else contextlib.nullcontext()
            with sync:
                with autocast(device, self.precision):
                    result = method.forward(model, ready(j), caches[j])
                if j < last:
                    ready(j + 1)
                elif upcoming is not None:
                    self.upcoming = OnDevice(method.to_device(upcoming), upcoming)
                if normalisers is None:
                    normalisers = reduce(result.normalisers)
                share = result.share(normalisers)
                self.scaler.scale(share * self.strategy.loss_scale).backward()
            loss = loss + share.detach().float()
            for name, (num, den) in result.metrics.items():
                old = metrics.get(name)
                metrics[name] = (num, den) if old is None else (old[0] + num, old[1] + den)
            images += counts[j]
        return loss, metrics, images

    def optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Clip and step; returns the gradient norm and whether the step was applied.

        A non-finite loss or norm is noted on the device (read at logging steps and before
        saves). With `--run.on_nonfinite skip` it is read now and the step is skipped; fp16
        leaves that to its gradient scaler, which skips overflowing steps by design.
        """
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.strategy.clip_grad_norm(self.method.model, self.optim.clip_grad)
        fp16 = self.scaler.is_enabled()
        finite = finite_step(loss, None if fp16 else grad_norm)
        if self.run_options.on_nonfinite == "skip" and not fp16 and not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.run_options.max_skipped_steps:
                raise RunStopped(
                    f"{self.skipped_in_a_row} non-finite steps in a row up to step "
                    f"{self.progress.step + 1}; {self.checkpointer.last_checkpoint_note()}. "
                    "Lower --optim.lr or raise --optim.warmup_epochs"
                )
            return grad_norm, False
        self.skipped_in_a_row = 0
        if self.run_options.on_nonfinite == "stop":
            self.checkpointer.nonfinite.observe(self.progress.step + 1, finite)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, True


def epochs_for_min_steps(
    optim: OptimSection, steps_per_epoch: int
) -> tuple[OptimSection, list[str]]:
    """`optim` with enough epochs for `--optim.min_steps` (warmup scaled alike), and the note
    that says so; `optim` itself when its epochs already give that many steps."""
    epochs = max(optim.epochs, math.ceil(optim.min_steps / steps_per_epoch))
    if epochs == optim.epochs:
        return optim, []
    warmup = optim.warmup_epochs * epochs / optim.epochs
    note = (
        f"{steps_per_epoch} optimiser steps an epoch: {epochs} epochs instead of "
        f"{optim.epochs} (warmup {warmup:g}) to train the --optim.min_steps {optim.min_steps}"
    )
    return replace(optim, epochs=epochs, warmup_epochs=warmup), [note]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute the encoder blocks' activations in backward instead of keeping them (timm's
    `set_grad_checkpointing`, which droppos's encoder and timm's ViT both have)."""
    enable = getattr(model, "set_grad_checkpointing", None)
    if enable is None:
        raise ValueError(f"--run.activation_checkpointing: {type(model).__name__} cannot do it")
    enable(True)


@dataclass
class OnDevice:
    """A loader batch already sent to the device (`batch`), with what the loader gave (`raw`)."""

    batch: Any
    raw: Any


def batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return len(first) if isinstance(first, list) else int(first.shape[0])


def build_loop(
    method: TrainingMethod,
    context: RunContext,
    config: Any,
    train_set: Dataset,
    collate_fn: Any = None,
) -> TrainLoop:
    """The wrapped model, optimizer and scaler for `method` (the loop adds its loader and
    schedule), the output folder held for this run; restores a checkpoint if due.

    `config` is the command's configuration: its `optim`, `run` and `data` sections drive the
    loop, and the whole of it is recorded in every checkpoint.
    """
    optim: OptimSection = config.optim
    run_options: TrainRunSection = config.run
    data: DataSection = config.data
    env = context.env
    strategy = strategy_for(env, run_options.strategy, context.precision)
    if run_options.compile:
        check_can_compile(env.device)
    if run_options.activation_checkpointing:
        checkpoint_activations(method.model)
    engine_model = strategy.wrap(method.model, run_options.compile)  # FSDP swaps parameters:
    optimizer, peak_lr = adamw_for_run(method.model, optim, env.world_size)  # optimiser after
    loop = TrainLoop(
        method=method,
        context=context,
        strategy=strategy,
        optim=optim,
        run_options=run_options,
        data=data,
        config=asdict(config),
        train_set=train_set,
        engine_model=engine_model,
        optimizer=optimizer,
        scaler=grad_scaler(env.device, context.precision),
        peak_lr=peak_lr,
        checkpointer=Checkpointer(
            run_options.output_dir, env.is_main, env.device, strategy.sharded
        ),
        collate_fn=collate_fn,
    )
    if env.is_main:  # one run per output folder; its interrupted saves are ours to clean
        loop.lock = RunLock(run_options.output_dir, env.run_id).acquire()
        remove_temporary_files(run_options.output_dir)
        if strategy.sharded:
            loop.checkpointer.remove_unnamed_shards()
    try:
        resume = find_resume(run_options.output_dir, run_options.resume)
        if resume is not None:
            loop.restore(resume)
    except BaseException:
        loop.close()
        raise
    return loop


def train_command(
    command: str,
    config: Any,
    loop: TrainLoop,
    what: str,
    train: Callable[[TrainLoop], Result],
) -> Result | None:
    """How a training command runs its loop: say what it will do (or that the run already
    finished, leaving its outputs alone), record the resolved `config.yaml`, train, and release
    the output folder however the run ends. None when there was nothing left to train."""
    context, out = loop.context, loop.output_dir
    try:
        if loop.finished:
            context.say(
                f"{PACKAGE} {command}: the run in {out} already finished its "
                f"{loop.optim.epochs} epochs; its outputs are left as they are (raise "
                "--optim.epochs to continue it, or choose another --run.output_dir)"
            )
            return None
        if context.is_main:
            write_config(config, out)
        resumed = ""
        if loop.resumed_from is not None:
            resumed = f"; resuming at epoch {loop.progress.epoch + 1}, step {loop.progress.step}"
        env = loop.env
        context.say(
            f"{what} ({env.world_size} process(es), {env.device}, {loop.precision}, "
            f"{loop.strategy.name}); "
            f"outputs in {out}{resumed}"
        )
        for note in loop.notes:
            context.say(f"note: {note}")
        return train(loop)
    finally:
        loop.close()
