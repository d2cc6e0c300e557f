"""End-to-end fine-tuning (the MAE/DropPos recipe, SPEC §2) on timm's VisionTransformer.

timm supplies the parts: the model (drop path, average-pooled head with LayerNorm, the
`group_matcher` that layer-wise lr decay reads), Mixup/CutMix, the losses and the weight EMA.
The engine is pre-training's: torchrun, autocast, accumulation, JSON-line/TensorBoard logs and
exact resume. Everything random in a step (augmentation, mixup, drop path) is a pure function
of (seed, epoch, index), so an interrupted run resumes to the same weights. Each epoch ends with
top-1/top-5 on the val split, `last.pth` (to resume) and, when top-1 improved, `best.pth`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from droppos.data import (
    AugmentedDataset,
    build_loader,
    finetune_transform,
    sample_seed,
    seeded_cpu_rngs,
    set_epoch,
)
from droppos.engine.checkpoint import LAST, find_resume, load_checkpoint, save_atomic
from droppos.engine.distributed import DistEnv, init_distributed, mean_over_ranks
from droppos.engine.logging import MetricWriter
from droppos.engine.optim import lr_at_step, set_lr
from droppos.engine.precision import autocast, grad_scaler, resolve_precision
from droppos.engine.training import (
    adamw_for_run,
    optimizer_steps_per_epoch,
    prepare_for_training,
)
from droppos.evaluation.backbone import Backbone, backbone_from, build_vit, has_loaded_head
from droppos.evaluation.config import FinetuneConfig
from droppos.evaluation.datasets import eval_view, labelled_splits, normalisation
from droppos.evaluation.metrics import as_percent, topk_correct
from droppos.evaluation.report import write_results

BEST = "best.pth"


@dataclass
class FinetuneRun:
    """Everything a fine-tuning run holds; built by `setup`, driven by `train`."""

    config: FinetuneConfig
    env: DistEnv
    backbone: Backbone
    model: VisionTransformer  # the bare model (saved, exported)
    engine_model: nn.Module  # what the step calls: compiled and/or DDP-wrapped
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoader
    val_loader: DataLoader
    val_size: int
    mixup: Mixup | None
    criterion: nn.Module
    precision: str
    peak_lr: float
    steps_per_epoch: int
    num_classes: int
    classes: list[str] | None
    epoch: int = 0
    batch: int = 0  # next batch within `epoch` (non-zero after a mid-epoch resume)
    step: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    best_epoch: int = -1
    last_metrics: dict[str, Any] | None = None


def setup(config: FinetuneConfig) -> FinetuneRun:
    """Validate, load the backbone and data, build the classifier and optimizer, maybe resume.

    User mistakes (bad options, missing or foreign checkpoint, unlabelled data) raise
    ValueError/FileNotFoundError from here, before any training.
    """
    config.validate()
    env = init_distributed(config.run.device)
    precision = resolve_precision(config.run.precision, env.device)
    torch.manual_seed(config.run.seed)  # the same new head (and random backbone) on every rank
    backbone = backbone_from(config.model)
    splits = labelled_splits(config.data.source)
    model = classifier(backbone, config, splits.num_classes)

    enc = backbone.encoder
    mean, std = normalisation(config.data, backbone)
    aug = config.augment
    transform = finetune_transform(
        enc.img_size, enc.in_chans, mean, std, aug.crop_scale, aug.auto_augment, aug.reprob
    )
    loader = build_loader(
        AugmentedDataset(splits.train, transform, seed=config.run.seed),
        config.optim.batch_size,
        shuffle=True,
        seed=config.run.seed,
        num_workers=config.data.num_workers,
        drop_last=True,
        distributed=env.distributed,
        device_type=env.device.type,
    )
    batches = len(loader)
    optimizer_steps_per_epoch(batches, config.optim.batch_size, config.optim.accum_steps)
    val = eval_view(splits.val, config.data, backbone)
    shard = Subset(val, range(env.rank, len(val), env.world_size))
    val_loader = build_loader(
        shard,
        config.data.batch_size,
        shuffle=False,
        num_workers=config.data.num_workers,
        device_type=env.device.type,
    )

    mixup = None
    if aug.mixup > 0 or aug.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=aug.mixup,
            cutmix_alpha=aug.cutmix,
            label_smoothing=aug.label_smoothing,
            num_classes=splits.num_classes,
        )
        criterion: nn.Module = SoftTargetCrossEntropy()  # smoothing is in mixup's targets
    elif aug.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=aug.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    model.to(env.device)
    optimizer, peak_lr = adamw_for_run(
        model, config.optim, env.world_size, layer_decay=config.optim.layer_decay
    )
    ema = ModelEmaV3(model, decay=config.model.ema_decay) if config.model.ema else None
    engine_model = prepare_for_training(model, env, config.run.compile)
    run = FinetuneRun(
        config=config,
        env=env,
        backbone=backbone,
        model=model,
        engine_model=engine_model,
        ema=ema,
        optimizer=optimizer,
        scaler=grad_scaler(env.device, precision),
        loader=loader,
        val_loader=val_loader,
        val_size=len(val),
        mixup=mixup,
        criterion=criterion.to(env.device),
        precision=precision,
        peak_lr=peak_lr,
        steps_per_epoch=batches // config.optim.accum_steps,
        num_classes=splits.num_classes,
        classes=splits.classes,
    )
    resume = find_resume(config.run.output_dir, config.run.resume)
    if resume is not None:
        restore(run, load_checkpoint(resume), resume)
    return run


def classifier(backbone: Backbone, config: FinetuneConfig, num_classes: int) -> VisionTransformer:
    """The backbone with the recipe's head: pooled tokens -> (LayerNorm) -> Linear.

    The positional embedding becomes a learnable parameter (fixed sin-cos in pre-training,
    learnable in fine-tuning, as in MAE). A new head starts near zero (MAE: std 2e-5).
    """
    pool = config.model.global_pool
    model = build_vit(
        backbone,
        num_classes=num_classes,
        global_pool=pool,
        fc_norm=pool == "avg",
        drop_path_rate=config.model.drop_path_rate,
    )
    if not has_loaded_head(backbone, model):
        trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    return model


# -- checkpoints ------------------------------------------------------------------------------


def describe_weights(run: FinetuneRun) -> dict[str, Any]:
    """What a fine-tuned file says about itself, so that every command can read it back."""
    mean, std = normalisation(run.config.data, run.backbone)
    return {
        "droppos": "finetune",
        "encoder": asdict(run.backbone.encoder),
        "global_pool": run.config.model.global_pool,
        "num_classes": run.num_classes,
        "classes": run.classes,
        "mean": mean,
        "std": std,
        "source_checkpoint": run.backbone.source,
        "config": asdict(run.config),
    }


def checkpoint_state(run: FinetuneRun) -> dict[str, Any]:
    return {
        **describe_weights(run),
        "model": run.model.state_dict(),
        "model_ema": None if run.ema is None else run.ema.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": run.epoch,
        "batch": run.batch,
        "step": run.step,
        "best_top1": run.best_top1,
        "best_epoch": run.best_epoch,
        "last_metrics": run.last_metrics,
    }


def restore(run: FinetuneRun, state: dict[str, Any], path: Path) -> None:
    try:
        run.model.load_state_dict(state["model"])
        if run.ema is not None and state.get("model_ema") is not None:
            run.ema.module.load_state_dict(state["model_ema"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"--run.resume: {path} is not a checkpoint of this fine-tuning run "
            f"({str(error).splitlines()[0][:200]}); pick another --run.output_dir or set "
            "--run.resume null"
        ) from None
    run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.batch, run.step = state["epoch"], state["batch"], state["step"]
    run.best_top1, run.best_epoch = state["best_top1"], state["best_epoch"]
    run.last_metrics = state.get("last_metrics")


def save(run: FinetuneRun, best: bool = False) -> None:
    if not run.env.is_main:
        return
    out = Path(run.config.run.output_dir)
    save_atomic(checkpoint_state(run), out / LAST)
    if best:  # weights only: what export, kNN and the probe read
        weights = {
            **describe_weights(run),
            "model": run.model.state_dict(),
            "model_ema": None if run.ema is None else run.ema.module.state_dict(),
            "epoch": run.epoch,
            "top1": run.best_top1,
        }
        save_atomic(weights, out / BEST)


# -- the loop ---------------------------------------------------------------------------------


def train(run: FinetuneRun) -> dict[str, Any]:
    """Run (or continue) the schedule; evaluate every epoch; return and write the results."""
    cfg, env = run.config, run.env
    out = Path(cfg.run.output_dir)
    writer = MetricWriter(out, enabled=env.is_main, tensorboard=cfg.run.tensorboard)
    total_steps = cfg.optim.epochs * run.steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * run.steps_per_epoch)
    started = time.perf_counter()
    try:
        while run.epoch < cfg.optim.epochs:
            metrics = run_epoch(run, writer, total_steps, warmup_steps)
            metrics.update(evaluate(run, run.model))
            if run.ema is not None:
                ema = evaluate(run, run.ema.module)
                metrics.update({f"ema_{k}": v for k, v in ema.items()})
            writer.write("epoch", run.epoch, metrics)
            improved = metrics["top1"] > run.best_top1
            if improved:
                run.best_top1, run.best_epoch = metrics["top1"], run.epoch
            if env.is_main:
                ema_note = f", EMA top-1 {metrics['ema_top1']:.2f}" if run.ema is not None else ""
                tqdm.write(
                    f"epoch {run.epoch + 1}/{cfg.optim.epochs}: loss {metrics['loss']:.4f}, "
                    f"val top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}{ema_note}"
                )
            run.last_metrics = metrics
            run.epoch, run.batch = run.epoch + 1, 0
            save(run, best=improved)
    finally:
        writer.close()
    last = run.last_metrics or {}
    results = {
        "top1": last.get("top1"),
        "top5": last.get("top5"),
        "best_top1": run.best_top1,
        "best_epoch": run.best_epoch + 1,
        **({"ema_top1": last.get("ema_top1")} if run.ema is not None else {}),
        "epochs": cfg.optim.epochs,
        "checkpoint": run.backbone.source,
        "checkpoint_kind": run.backbone.kind,
        "num_classes": run.num_classes,
        "train_size": len(run.loader.dataset),  # type: ignore[arg-type]
        "val_size": run.val_size,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    if env.is_main:
        write_results(out, "finetune", results)
    return results


def run_epoch(
    run: FinetuneRun, writer: MetricWriter, total_steps: int, warmup_steps: int
) -> dict[str, float]:
    cfg, env = run.config, run.env
    accum = cfg.optim.accum_steps
    set_epoch(run.loader, run.epoch, start_batch=run.batch)
    run.engine_model.train()
    last_batch = run.steps_per_epoch * accum
    epoch_loss = window_loss = torch.zeros((), device=env.device)
    epoch_count = window_count = window_images = 0
    window_start = time.perf_counter()
    bar = tqdm(
        total=last_batch,
        initial=run.batch,
        desc=f"epoch {run.epoch + 1}/{cfg.optim.epochs}",
        disable=not (env.is_main and cfg.run.progress),
        dynamic_ncols=True,
        leave=False,
    )
    for images, labels in run.loader:
        if run.batch >= last_batch:
            break  # the ragged tail that does not fill an accumulation cycle
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        # Drop path and mixup draw from generators seeded per (epoch, batch, rank).
        step_seed = sample_seed(cfg.run.seed, run.epoch, run.batch * env.world_size + env.rank)
        torch.manual_seed(step_seed)
        targets: torch.Tensor = labels
        if run.mixup is not None:
            with seeded_cpu_rngs(step_seed):
                images, targets = run.mixup(images, labels)
        boundary = (run.batch + 1) % accum == 0
        sync = contextlib.nullcontext()
        if not boundary and isinstance(run.engine_model, DistributedDataParallel):
            sync = run.engine_model.no_sync()
        with sync:
            with autocast(env.device, run.precision):
                loss = run.criterion(run.engine_model(images), targets)
            run.scaler.scale(loss / accum).backward()
        if boundary:
            lr = lr_at_step(run.step, total_steps, warmup_steps, run.peak_lr, cfg.optim.min_lr)
            set_lr(run.optimizer, lr)
            if cfg.optim.clip_grad is not None:
                run.scaler.unscale_(run.optimizer)
                nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            if run.ema is not None:
                run.ema.update(run.model, step=run.step)
        loss = loss.detach().float()
        epoch_loss, window_loss = epoch_loss + loss, window_loss + loss
        epoch_count, window_count = epoch_count + 1, window_count + 1
        window_images += images.shape[0] * env.world_size
        run.batch += 1
        bar.update(1)

        if boundary and run.step % cfg.run.log_every == 0:
            record = {
                "loss": float(mean_over_ranks(window_loss / window_count)),
                "lr": max(g["lr"] for g in run.optimizer.param_groups),  # the head's, unscaled
                "images_per_second": window_images / max(time.perf_counter() - window_start, 1e-9),
                "epoch": run.epoch + run.batch / last_batch,
            }
            writer.write("step", run.step, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            window_loss, window_count, window_images = torch.zeros_like(window_loss), 0, 0
            window_start = time.perf_counter()
        if boundary and cfg.run.save_every_steps and run.step % cfg.run.save_every_steps == 0:
            save(run)
    bar.close()
    mean_loss = float(mean_over_ranks(epoch_loss / max(epoch_count, 1)))
    return {"loss": mean_loss, "lr": max(g["lr"] for g in run.optimizer.param_groups)}


@torch.inference_mode()
def evaluate(run: FinetuneRun, model: nn.Module) -> dict[str, float]:
    """Top-1/top-5 (%) on the whole val split: per-rank counts, summed over ranks."""
    model.eval()
    counts = torch.zeros(3, device=run.env.device, dtype=torch.float64)  # top1, top5, total
    for images, labels in run.val_loader:
        images = images.to(run.env.device, non_blocking=True)
        labels = labels.to(run.env.device, non_blocking=True)
        with autocast(run.env.device, run.precision):
            logits = model(images)
        counts[:2] += topk_correct(logits.float(), labels)
        counts[2] += len(labels)
    counts = mean_over_ranks(counts) * run.env.world_size
    return as_percent(counts[:2], int(counts[2].item()))


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Set up and run; the programmatic twin of `droppos finetune`."""
    return train(setup(config))
