"""The one training loop: each command supplies a `TrainingMethod`, the loop does the rest.

What the loop owns: gradient accumulation (`no_sync` on all but the last micro-batch), autocast
and the fp16 scaler, clipping, the per-iteration lr schedule, metrics (JSON lines, TensorBoard,
progress), periodic and final checkpoints, and exact resume. What a method owns: its model, how
a batch reaches the device, and its forward (`StepResult`).

Global loss normalisation: each loss term is a sum divided by a denominator (the attentive
weights of the dropped tokens, the masked patches, the images). The denominators are summed
over every micro-batch of one optimiser step and every rank before any backward, so one step's
gradient is the gradient of the whole global batch's loss, however that batch is split. With
one micro-batch the forward's own sums are all-reduced between forward and backward; with
accumulation the method computes them ahead (`TrainingMethod.ahead`, no gradient).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from droppos.data import build_loader, replaced_images, set_epoch
from droppos.engine.checkpoint import (
    LAST,
    check_resume,
    find_resume,
    load_training_checkpoint,
    save_atomic,
)
from droppos.engine.config import DataSection, OptimSection, TrainRunSection
from droppos.engine.distributed import DistEnv, sum_over_ranks
from droppos.engine.guards import (
    NonFiniteWatch,
    RunLock,
    RunStopped,
    StopSignals,
    finite_step,
    remove_temporary_files,
)
from droppos.engine.logging import MetricWriter, show_progress, write_json
from droppos.engine.optim import lr_at_step, set_lr
from droppos.engine.precision import autocast, grad_scaler
from droppos.engine.training import (
    adamw_for_run,
    optimizer_steps_per_epoch,
    prepare_for_training,
)

Sums = dict[str, tuple[torch.Tensor, torch.Tensor]]


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
    """What pre-training (DropPos, MAE) and fine-tuning supply to the loop."""

    model: nn.Module
    """The bare model: optimised, clipped and saved."""
    split_invariant: bool
    """True when a step depends only on its global batch, not on how it is split over ranks
    and micro-batches: a resume may then change that split."""

    def start_epoch(self, epoch: int, batch: int) -> None:
        """Called before an epoch's first step (`batch` > 0 after a mid-epoch resume)."""
        ...

    def ahead(self, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """No-grad work computed before the step: (cache for `forward`, local normalisers)."""
        ...

    def forward(self, engine_model: nn.Module, batch: Any, cache: Any) -> StepResult: ...

    def after_step(self, step: int) -> None: ...

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Extra epoch metrics (evaluation) and files to write: {"metrics", "files"}."""
        ...

    def epoch_line(self, metrics: dict[str, float]) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What a checkpoint of this method says about itself (read back by every command)."""
        ...


@dataclass
class Position:
    """Where a run is: the next epoch, the next per-rank batch within it, optimiser steps."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class TrainLoop:
    """A run of one method: built by `build_loop`, driven by `run`."""

    method: TrainingMethod
    env: DistEnv
    optim: OptimSection
    run_options: TrainRunSection
    config: dict[str, Any]
    loader: DataLoader
    precision: str
    engine_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    peak_lr: float
    steps_per_epoch: int
    data: DataSection = field(default_factory=DataSection)
    position: Position = field(default_factory=Position)
    resumed_from: Path | None = None
    notes: list[str] = field(default_factory=list)
    lock: RunLock | None = None
    signals: StopSignals = field(default_factory=StopSignals)
    nonfinite: NonFiniteWatch | None = None
    skipped_in_a_row: int = 0
    last_saved_step: int | None = None
    bad_images_at_epoch_start: int = 0

    def close(self) -> None:
        """Release the output folder (the CLI calls it however the run ended)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def finished(self) -> bool:
        return self.position.epoch >= self.optim.epochs

    @property
    def output_dir(self) -> Path:
        return Path(self.run_options.output_dir)

    # -- checkpoints -------------------------------------------------------------------------

    def geometry(self) -> dict[str, int]:
        """How the global batch is split; a resume checks it (see `check_resume`)."""
        return {
            "world_size": self.env.world_size,
            "batch_size": self.optim.batch_size,
            "accum_steps": self.optim.accum_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def state(self) -> dict[str, Any]:
        return {
            **self.method.describe(),
            "model": self.method.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": asdict(self.position),
            "geometry": self.geometry(),
            "config": self.config,
            "method_state": self.method.state_dict(),
        }

    def save(self, extra: dict[str, dict[str, Any]] | None = None, keep: bool = False) -> None:
        """Write last.pth (and kept or extra files), never with a non-finite weight in it."""
        self.check_finite()
        if self.env.is_main:
            state = self.state()
            targets = [(LAST, state)]
            if keep:
                targets.append((f"checkpoint-{self.position.epoch:04d}.pth", state))
            targets += list((extra or {}).items())
            for name, content in targets:
                try:
                    save_atomic(content, self.output_dir / name)
                except OSError as error:
                    raise RunStopped(
                        f"could not write {self.output_dir / name} ({error.strerror or error}); "
                        f"{self.last_checkpoint_note()}; free space and run the same command "
                        "to resume"
                    ) from None
        self.last_saved_step = self.position.step

    def last_checkpoint_note(self) -> str:
        if self.last_saved_step is not None:
            where = self.output_dir / LAST
            return f"the last good checkpoint is {where} (step {self.last_saved_step})"
        if self.resumed_from is not None:
            return f"the last good checkpoint is {self.resumed_from}"
        return "no checkpoint was written yet"

    def check_finite(self) -> None:
        """Stop, saying where, if any step since the start was non-finite (one device read)."""
        if self.nonfinite is None:
            return
        step = self.nonfinite.bad_step()
        if step is not None:
            raise RunStopped(
                f"the loss or gradient norm became NaN or infinite at step {step}; nothing "
                f"after it was saved and {self.last_checkpoint_note()}. Lower --optim.lr or "
                "raise --optim.warmup_epochs (or --run.on_nonfinite skip to skip such steps)"
            )

    def restore(self, path: Path) -> None:
        state = load_training_checkpoint(path)
        position, notes = check_resume(
            path,
            state,
            self.config,
            self.geometry(),
            self.method.split_invariant,
        )
        try:
            self.method.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.method.load_state_dict(state.get("method_state") or {})
        except (KeyError, RuntimeError, ValueError) as error:
            raise ValueError(
                f"--run.resume: {path} does not fit this run ({str(error).splitlines()[0][:200]}); "
                "pick another --run.output_dir or set --run.resume null"
            ) from None
        self.position = Position(**position)
        self.resumed_from = path
        self.notes.extend(notes)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the last epoch; return (and write to summary.json) the last epoch's metrics."""
        writer = MetricWriter(
            self.output_dir, enabled=self.env.is_main, tensorboard=self.run_options.tensorboard
        )
        summary: dict[str, Any] = {}
        started = time.perf_counter()
        self.last_saved_step = self.position.step if self.resumed_from is not None else None
        try:
            with self.signals:
                while not self.finished:
                    summary = self.run_epoch(writer)
        finally:
            writer.close()
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        if self.env.is_main:
            write_json(self.output_dir / "summary.json", summary)
        return summary

    def poll(self, full: bool) -> None:
        """Act on what may have happened since the last step: a stop signal, too many bad
        images, a non-finite step. Ranks decide together, at logging steps (`full`); a single
        process looks at the host-side flags after every step."""
        if self.env.distributed and not full:
            return
        bad = replaced_images(self.loader.dataset) - self.bad_images_at_epoch_start
        flags = {"signal": float(self.signals.received is not None), "bad": float(bad)}
        if self.env.distributed:
            on_device = {k: torch.tensor(v, device=self.env.device) for k, v in flags.items()}
            flags = {k: float(v) for k, v in sum_over_ranks(on_device).items()}
        if full:
            self.check_finite()
        epoch_images = self.steps_per_epoch * self.optim.accum_steps * self.optim.batch_size
        allowed = self.data.max_bad_fraction * epoch_images * self.env.world_size
        if flags["bad"] > allowed:
            raise RunStopped(
                f"{int(flags['bad'])} unreadable images this epoch, more than "
                f"--data.max_bad_fraction {self.data.max_bad_fraction} of "
                f"{epoch_images * self.env.world_size}; the warnings above name them. Fix or "
                "remove them (or raise the fraction), then run the same command to resume"
            )
        if flags["signal"]:
            self.save()
            name = self.signals.received or "a stop signal"
            raise RunStopped(
                f"stopped by {name} at epoch {self.position.epoch + 1}, step "
                f"{self.position.step}; saved {self.output_dir / LAST}: run the same command "
                "to resume exactly there",
                exit_code=0,
            )

    def run_epoch(self, writer: MetricWriter) -> dict[str, Any]:
        pos, accum = self.position, self.optim.accum_steps
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
            disable=not show_progress(self.run_options.progress, self.env.is_main),
            dynamic_ncols=True,
            leave=False,
        )
        for micro_batches in self.optimizer_steps():
            set_lr(
                self.optimizer,
                lr_at_step(pos.step, total_steps, warmup_steps, self.peak_lr, self.optim.min_lr),
            )
            loss, metrics, images = self.accumulate(micro_batches)
            grad_norm, applied = self.optimizer_step(loss)
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
        metrics["bad_images"] = int(sum_over_ranks({"n": torch.tensor(bad)})["n"])
        if epoch_sums.skipped:
            metrics["skipped_steps"] = epoch_sums.skipped
        pos.epoch, pos.batch = pos.epoch + 1, 0
        extra = self.method.end_epoch(pos.epoch - 1, metrics)
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

    def optimizer_steps(self) -> Iterator[list[Any]]:
        """The loader's batches grouped by optimiser step; a ragged tail is left out."""
        group: list[Any] = []
        remaining = self.steps_per_epoch - self.position.batch // self.optim.accum_steps
        for batch in self.loader:
            if remaining <= 0:
                break
            group.append(batch)
            if len(group) == self.optim.accum_steps:
                yield group
                group, remaining = [], remaining - 1

    def accumulate(self, micro_batches: list[Any]) -> tuple[torch.Tensor, Sums, int]:
        """Forward and backward every micro-batch of one step, with global normalisers."""
        method, device = self.method, self.env.device
        last = len(micro_batches) - 1
        caches: list[Any] = [None] * len(micro_batches)
        normalisers: dict[str, torch.Tensor] | None = None
        if last > 0:  # every denominator of the step is needed before the first backward
            local: dict[str, torch.Tensor] = {}
            for j, batch in enumerate(micro_batches):
                with autocast(device, self.precision):
                    caches[j], sums = method.ahead(batch)
                for name, value in sums.items():
                    local[name] = local.get(name, 0) + value.float()
            normalisers = sum_over_ranks(local)
        loss = torch.zeros((), device=device)
        metrics: Sums = {}
        images = 0
        for j, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext()
            if j < last and isinstance(self.engine_model, DistributedDataParallel):
                sync = self.engine_model.no_sync()
            with sync:
                with autocast(device, self.precision):
                    result = method.forward(self.engine_model, batch, caches[j])
                if normalisers is None:
                    normalisers = sum_over_ranks(result.normalisers)
                share = result.share(normalisers)
                # DDP averages gradients over ranks; the shares already sum to the global loss.
                self.scaler.scale(share * self.env.world_size).backward()
            loss = loss + share.detach().float()
            for name, (num, den) in result.metrics.items():
                old = metrics.get(name)
                metrics[name] = (num, den) if old is None else (old[0] + num, old[1] + den)
            images += batch_size(batch)
        return loss, metrics, images

    def optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Clip and step; returns the gradient norm and whether the step was applied.

        A non-finite loss or norm is noted on the device (read at logging steps and before
        saves). With `--run.on_nonfinite skip` it is read now and the step is skipped; fp16
        leaves that to its gradient scaler, which skips overflowing steps by design.
        """
        parameters = [p for p in self.method.model.parameters() if p.grad is not None]
        self.scaler.unscale_(self.optimizer)
        if self.optim.clip_grad is not None:
            grad_norm = nn.utils.clip_grad_norm_(parameters, self.optim.clip_grad)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in parameters])
        fp16 = self.scaler.is_enabled()
        finite = finite_step(loss, None if fp16 else grad_norm)
        if self.run_options.on_nonfinite == "skip" and not fp16 and not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.run_options.max_skipped_steps:
                raise RunStopped(
                    f"{self.skipped_in_a_row} non-finite steps in a row up to step "
                    f"{self.position.step + 1}; {self.last_checkpoint_note()}. Lower "
                    "--optim.lr or raise --optim.warmup_epochs"
                )
            return grad_norm, False
        self.skipped_in_a_row = 0
        if self.run_options.on_nonfinite == "stop":
            assert self.nonfinite is not None
            self.nonfinite.observe(self.position.step + 1, finite)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, True


class MetricSums:
    """Running (numerator, denominator) sums on the device, and the loss summed per step."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.loss = torch.zeros((), device=env.device)
        self.steps = 0
        self.skipped = 0
        self.sums: dict[str, list[torch.Tensor]] = {}

    def add(self, loss: torch.Tensor, metrics: Sums) -> None:
        self.loss = self.loss + loss
        self.steps += 1
        for name, (num, den) in metrics.items():
            found = self.sums.setdefault(name, [torch.zeros((), device=num.device)] * 2)
            found[0], found[1] = found[0] + num.float(), found[1] + den.float()

    def means(self) -> dict[str, float]:
        """One collective and one host read for everything: exact global-batch averages."""
        if not self.steps:
            return {}
        names = list(self.sums)
        flat = [self.loss] + [t for n in names for t in self.sums[n]]
        values = sum_over_ranks({"all": torch.stack(flat)})["all"].tolist()
        result = {"loss": values[0] / self.steps}
        for i, name in enumerate(names):
            num, den = values[1 + 2 * i], values[2 + 2 * i]
            result[name] = num / den if den else math.nan
        return result


def batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return len(first) if isinstance(first, list) else int(first.shape[0])


def build_loop(
    method: TrainingMethod,
    env: DistEnv,
    config: Any,
    train_set: Dataset,
    precision: str,
    collate_fn: Any = None,
) -> TrainLoop:
    """The training loader (this rank's shard, in an order that is a function of seed and
    epoch), optimizer, scaler and engine model for `method`; restores a checkpoint if due.

    `config` is the command's configuration: its `optim`, `run` and `data` sections drive the
    loop, and the whole of it is recorded in every checkpoint.
    """
    optim: OptimSection = config.optim
    run_options: TrainRunSection = config.run
    data: DataSection = config.data
    loader = build_loader(
        train_set,
        optim.batch_size,
        shuffle=True,
        seed=run_options.seed,
        num_workers=data.num_workers,
        drop_last=True,
        distributed=env.distributed,
        device_type=env.device.type,
        timeout=data.timeout,
        collate_fn=collate_fn,
    )
    steps_per_epoch = optimizer_steps_per_epoch(len(loader), optim.batch_size, optim.accum_steps)
    layer_decay = optim.layer_decay if optim.layer_decay < 1 else None
    optimizer, peak_lr = adamw_for_run(method.model, optim, env.world_size, layer_decay)
    loop = TrainLoop(
        method=method,
        env=env,
        optim=optim,
        run_options=run_options,
        config=asdict(config),
        loader=loader,
        precision=precision,
        engine_model=prepare_for_training(method.model, env, run_options.compile),
        optimizer=optimizer,
        scaler=grad_scaler(env.device, precision),
        peak_lr=peak_lr,
        steps_per_epoch=steps_per_epoch,
        data=data,
        nonfinite=NonFiniteWatch(env.device),
    )
    if env.is_main:  # one run per output folder; its interrupted saves are ours to clean
        loop.lock = RunLock(run_options.output_dir).acquire()
        remove_temporary_files(run_options.output_dir)
    try:
        resume = find_resume(run_options.output_dir, run_options.resume)
        if resume is not None:
            loop.restore(resume)
    except BaseException:
        loop.close()
        raise
    return loop
