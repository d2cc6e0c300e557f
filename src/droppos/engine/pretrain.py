"""The pre-training loop: data -> DropPos step -> optimizer, with exact resume.

Everything random in a step (augmentation, masks) is a pure function of (seed, epoch, sample
index), so neither the number of ranks nor an interruption changes what the model sees. Metrics
stay on the device and are read once every `log_every` steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from droppos.data import AugmentedDataset, build_dataset, build_loader, set_epoch
from droppos.data.mask_noise import MaskNoiseDataset
from droppos.data.transforms import pretrain_transform
from droppos.engine.checkpoint import LAST, find_resume, load_checkpoint, save_atomic
from droppos.engine.config import PretrainConfig
from droppos.engine.distributed import DistEnv, init_distributed, mean_over_ranks
from droppos.engine.logging import MetricWriter
from droppos.engine.optim import lr_at_step, set_lr
from droppos.engine.precision import autocast, grad_scaler, resolve_precision
from droppos.engine.training import (
    adamw_for_run,
    optimizer_steps_per_epoch,
    prepare_for_training,
)
from droppos.objective.smoothing import sigma_at_epoch


@dataclass
class Trainer:
    """Everything a run holds; built by `setup`, driven by `train`."""

    config: PretrainConfig
    env: DistEnv
    model: nn.Module  # the bare model (saved, exported)
    engine_model: nn.Module  # what the step calls: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: torch.utils.data.DataLoader
    precision: str
    peak_lr: float
    steps_per_epoch: int
    epoch: int = 0
    batch: int = 0  # next batch within `epoch` (non-zero after a mid-epoch resume)
    step: int = 0  # optimizer steps taken


def setup(config: PretrainConfig) -> Trainer:
    """Validate, build data/model/optimizer, and restore a checkpoint if one is to be resumed.

    User mistakes (bad options, missing data) raise ValueError/FileNotFoundError from here,
    before any work is done.
    """
    config.validate()
    env = init_distributed(config.run.device)
    precision = resolve_precision(config.run.precision, env.device)
    torch.manual_seed(config.run.seed + env.rank)

    model = config.model.build()
    cfg = getattr(model, "droppos_config", None) or model.mae_config
    dataset = build_dataset(config.data.source, "train")
    transform = pretrain_transform(
        model.config.img_size,
        model.config.in_chans,
        config.data.mean,
        config.data.std,
        crop_scale=config.data.crop_scale,
    )
    noisy = MaskNoiseDataset(
        AugmentedDataset(dataset, transform, seed=config.run.seed),
        num_patches=model.num_patches,
        num_visible=cfg.num_visible,
    )
    loader = build_loader(
        noisy,
        config.optim.batch_size,
        shuffle=True,
        seed=config.run.seed,
        num_workers=config.data.num_workers,
        drop_last=True,
        distributed=env.distributed,
        device_type=env.device.type,
    )
    steps_per_epoch = optimizer_steps_per_epoch(
        len(loader), config.optim.batch_size, config.optim.accum_steps
    )

    model.to(env.device)
    optimizer, peak_lr = adamw_for_run(model, config.optim, env.world_size)
    engine_model = prepare_for_training(model, env, config.run.compile)
    trainer = Trainer(
        config=config,
        env=env,
        model=model,
        engine_model=engine_model,
        optimizer=optimizer,
        scaler=grad_scaler(env.device, precision),
        loader=loader,
        precision=precision,
        peak_lr=peak_lr,
        steps_per_epoch=steps_per_epoch,
    )
    resume = find_resume(config.run.output_dir, config.run.resume)
    if resume is not None:
        restore(trainer, load_checkpoint(resume))
    return trainer


def checkpoint_state(trainer: Trainer) -> dict[str, Any]:
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "epoch": trainer.epoch,
        "batch": trainer.batch,
        "step": trainer.step,
        "config": asdict(trainer.config),
        "model_name": trainer.config.model.name,
    }


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.epoch, trainer.batch, trainer.step = state["epoch"], state["batch"], state["step"]


def save(trainer: Trainer, keep: bool = False) -> None:
    if not trainer.env.is_main:
        return
    out = Path(trainer.config.run.output_dir)
    state = checkpoint_state(trainer)
    save_atomic(state, out / LAST)
    if keep:
        save_atomic(state, out / f"checkpoint-{trainer.epoch:04d}.pth")


def train(trainer: Trainer) -> dict[str, Any]:
    """Run (or continue) the schedule to the last epoch; returns the final epoch's metrics."""
    cfg, env = trainer.config, trainer.env
    out = Path(cfg.run.output_dir)
    writer = MetricWriter(out, enabled=env.is_main, tensorboard=cfg.run.tensorboard)
    total_steps = cfg.optim.epochs * trainer.steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * trainer.steps_per_epoch)
    chance = 1.0 / trainer.model.num_patches
    summary: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        while trainer.epoch < cfg.optim.epochs:
            epoch_metrics = run_epoch(trainer, writer, total_steps, warmup_steps)
            epoch_metrics["chance_position_accuracy"] = chance
            writer.write("epoch", trainer.epoch, epoch_metrics)
            if env.is_main:
                accuracy = epoch_metrics.get("position_accuracy")
                shown = (
                    f"position accuracy {accuracy:.3f} (chance {chance:.3f})"
                    if accuracy is not None
                    else ""
                )
                tqdm.write(
                    f"epoch {trainer.epoch + 1}/{cfg.optim.epochs}: "
                    f"loss {epoch_metrics['loss']:.4f} {shown}"
                )
            trainer.epoch, trainer.batch = trainer.epoch + 1, 0
            keep = cfg.run.keep_every_epochs and trainer.epoch % cfg.run.keep_every_epochs == 0
            save(trainer, keep=bool(keep) or trainer.epoch == cfg.optim.epochs)
            summary = epoch_metrics
    finally:
        writer.close()
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_epoch(
    trainer: Trainer, writer: MetricWriter, total_steps: int, warmup_steps: int
) -> dict[str, float]:
    cfg, env = trainer.config, trainer.env
    accum = cfg.optim.accum_steps
    sigma = cfg.model.smoothing_sigma
    if cfg.model.smoothing_decay:
        sigma = sigma_at_epoch(trainer.epoch, cfg.optim.epochs, sigma)
    set_epoch(trainer.loader, trainer.epoch, start_batch=trainer.batch)
    trainer.engine_model.train()

    epoch_sum: torch.Tensor | None = None
    window_sum: torch.Tensor | None = None
    names: list[str] = []
    epoch_count = window_count = 0
    window_images, window_start = 0, time.perf_counter()
    bar = tqdm(
        total=trainer.steps_per_epoch * accum,
        initial=trainer.batch,
        desc=f"epoch {trainer.epoch + 1}/{cfg.optim.epochs}",
        disable=not (env.is_main and cfg.run.progress),
        dynamic_ncols=True,
        leave=False,
    )
    last_batch = trainer.steps_per_epoch * accum
    for images, _, patch_noise, position_noise in trainer.loader:
        if trainer.batch >= last_batch:
            break  # the ragged tail that does not fill an accumulation cycle
        images = images.to(env.device, non_blocking=True)
        patch_noise = patch_noise.to(env.device, non_blocking=True)
        position_noise = position_noise.to(env.device, non_blocking=True)
        boundary = (trainer.batch + 1) % accum == 0
        sync = contextlib.nullcontext()
        if not boundary and isinstance(trainer.engine_model, DistributedDataParallel):
            sync = trainer.engine_model.no_sync()
        with sync:
            with autocast(env.device, trainer.precision):
                output = trainer.engine_model(
                    images, sigma=sigma, patch_noise=patch_noise, position_noise=position_noise
                )
            trainer.scaler.scale(output.loss / accum).backward()

        metrics = output.metrics()
        if boundary:
            set_lr(
                trainer.optimizer,
                lr_at_step(
                    trainer.step, total_steps, warmup_steps, trainer.peak_lr, cfg.optim.min_lr
                ),
            )
            if cfg.optim.clip_grad is not None:
                trainer.scaler.unscale_(trainer.optimizer)
                metrics["grad_norm"] = nn.utils.clip_grad_norm_(
                    trainer.model.parameters(), cfg.optim.clip_grad
                )
            trainer.scaler.step(trainer.optimizer)
            trainer.scaler.update()
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.step += 1
        if not names:
            names = [n for n in metrics if n != "grad_norm"]
        values = torch.stack([metrics[n].float() for n in names])
        epoch_sum = values if epoch_sum is None else epoch_sum + values
        window_sum = values if window_sum is None else window_sum + values
        epoch_count += 1
        window_count += 1
        window_images += images.shape[0] * env.world_size
        trainer.batch += 1
        bar.update(1)

        if boundary and trainer.step % cfg.run.log_every == 0:
            means = (mean_over_ranks(window_sum) / window_count).tolist()
            elapsed = time.perf_counter() - window_start
            record = dict(zip(names, means))
            record["lr"] = trainer.optimizer.param_groups[0]["lr"]
            record["images_per_second"] = window_images / max(elapsed, 1e-9)
            record["epoch"] = trainer.epoch + trainer.batch / last_batch
            record["sigma"] = sigma
            if "grad_norm" in metrics:
                record["grad_norm"] = float(metrics["grad_norm"])
            writer.write("step", trainer.step, record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                pos_acc=f"{record.get('position_accuracy', math.nan):.3f}",
                lr=f"{record['lr']:.2e}",
                img_s=f"{record['images_per_second']:.0f}",
            )
            window_sum, window_count = None, 0
            window_images, window_start = 0, time.perf_counter()
        if boundary and cfg.run.save_every_steps and trainer.step % cfg.run.save_every_steps == 0:
            save(trainer)
    bar.close()
    if epoch_sum is None:
        return {}
    result = dict(zip(names, (mean_over_ranks(epoch_sum) / epoch_count).tolist()))
    result["sigma"] = sigma
    result["lr"] = trainer.optimizer.param_groups[0]["lr"]
    return result


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Set up and run; the programmatic twin of `droppos pretrain`."""
    return train(setup(config))
