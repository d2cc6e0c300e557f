"""End-to-end fine-tuning (the MAE/DropPos recipe) on timm's VisionTransformer.

timm supplies the parts: the model (drop path, average-pooled head with LayerNorm, the
`group_matcher` that layer-wise lr decay reads), Mixup/CutMix and the weight EMA. The loop is
pre-training's (`engine.loop`): torchrun, autocast, accumulation, JSON-line/TensorBoard logs
and exact resume; this module supplies the classifier, its data and its step. Everything random
in a step (augmentation, mixup, drop path) is a pure function of (seed, epoch, index), so an
interrupted run resumes to the same weights. Each epoch ends with top-1/top-5 on the val split,
`last.pth` (to resume) and, when top-1 improved, `best.pth`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Subset

from droppos.data import (
    AugmentedDataset,
    ReplaceBadImages,
    build_loader,
    finetune_transform,
    sample_seed,
    seeded_cpu_rngs,
)
from droppos.engine.distributed import DistEnv, init_distributed, sum_over_ranks
from droppos.engine.loop import StepResult, TrainLoop, build_loop
from droppos.engine.precision import autocast, resolve_precision
from droppos.evaluation.backbone import backbone_from
from droppos.evaluation.config import FinetuneConfig
from droppos.evaluation.datasets import eval_view, labelled_splits, normalisation
from droppos.evaluation.metrics import as_percent, topk_correct
from droppos.evaluation.report import write_results
from droppos.interop.checkpoints import Backbone, build_vit, has_loaded_head

BEST = "best.pth"


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


def cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Summed (not averaged) cross-entropy, so that the loop can normalise over the global
    batch: soft targets [N, C] (mixup/cutmix, smoothing already inside) or labels [N]."""
    logits = logits.float()
    if targets.ndim == 2:
        return -(targets * F.log_softmax(logits, dim=-1)).sum()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="sum")


@dataclass
class FinetuneMethod:
    """The fine-tuning step, the per-epoch evaluation, the EMA and the best checkpoint."""

    model: VisionTransformer
    config: FinetuneConfig
    env: DistEnv
    backbone: Backbone
    val_loader: DataLoader
    num_classes: int
    classes: list[str] | None
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    precision: str = "fp32"
    # drop path and mixup draw from generators seeded per (epoch, batch, rank)
    split_invariant: bool = False
    epoch: int = 0
    batch: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    last_metrics: dict[str, Any] = field(default_factory=dict)

    def start_epoch(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def ahead(self, batch: Any) -> tuple[None, dict[str, torch.Tensor]]:
        return None, {"images": torch.tensor(float(len(batch[1])), device=self.env.device)}

    def forward(self, engine_model: nn.Module, batch: Any, cache: None) -> StepResult:
        device, env = self.env.device, self.env
        images = batch[0].to(device, non_blocking=True)
        labels = batch[1].to(device, non_blocking=True)
        step_seed = sample_seed(
            self.config.run.seed, self.epoch, self.batch * env.world_size + env.rank
        )
        self.batch += 1
        torch.manual_seed(step_seed)
        targets = labels
        if self.mixup is not None:
            with seeded_cpu_rngs(step_seed):
                images, targets = self.mixup(images, labels)
        loss_sum = cross_entropy_sum(
            engine_model(images), targets, self.config.augment.label_smoothing
        )
        return StepResult(
            normalisers={"images": torch.tensor(float(len(labels)), device=device)},
            share=lambda total: loss_sum / total["images"],
            metrics={},
        )

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        found = self.evaluate(self.model)
        if self.ema is not None:
            found.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        files = {}
        if found["top1"] > self.best_top1:
            self.best_top1, self.best_epoch = found["top1"], epoch
            files[BEST] = {  # weights only: what export, kNN and the probes read
                **self.describe(),
                "model": self.model.state_dict(),
                "model_ema": None if self.ema is None else self.ema.module.state_dict(),
                "epoch": epoch + 1,
                "top1": self.best_top1,
            }
        self.last_metrics = {**metrics, **found}
        return {"metrics": found, "files": files}

    def epoch_line(self, metrics: dict[str, float]) -> str:
        ema = f", EMA top-1 {metrics['ema_top1']:.2f}" if "ema_top1" in metrics else ""
        return (
            f"loss {metrics['loss']:.4f}, val top-1 {metrics['top1']:.2f} "
            f"top-5 {metrics['top5']:.2f}{ema}"
        )

    @torch.inference_mode()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5 (%) on the whole val split: per-rank counts, summed over ranks."""
        model.eval()
        device = self.env.device
        counts = torch.zeros(3, device=device, dtype=torch.float64)  # top1, top5, total
        for images, labels in self.val_loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, self.precision):
                logits = model(images)
            counts[:2] += topk_correct(logits.float(), labels)
            counts[2] += len(labels)
        counts = sum_over_ranks({"counts": counts})["counts"]
        model.train()
        return as_percent(counts[:2], int(counts[2].item()))

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_ema": None if self.ema is None else self.ema.module.state_dict(),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "last_metrics": self.last_metrics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("model_ema") is not None:
            self.ema.module.load_state_dict(state["model_ema"])
        self.best_top1 = state.get("best_top1", -1.0)
        self.best_epoch = state.get("best_epoch", -1)
        self.last_metrics = state.get("last_metrics") or {}

    def describe(self) -> dict[str, Any]:
        """What a fine-tuned file says about itself, so that every command can read it back."""
        mean, std = normalisation(self.config.data, self.backbone)
        return {
            "droppos": "finetune",
            "encoder": asdict(self.backbone.encoder),
            "global_pool": self.config.model.global_pool,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "mean": mean,
            "std": std,
            "source_checkpoint": self.backbone.source,
        }


def setup(config: FinetuneConfig) -> TrainLoop:
    """Validate, load the backbone and data, build the classifier and optimizer, maybe resume.

    User mistakes (bad options, missing or foreign checkpoint, unlabelled data) raise
    ValueError/FileNotFoundError from here, before any training.
    """
    config.validate()
    env = init_distributed(config.run.device)
    precision = resolve_precision(config.run.precision, env.device)
    torch.manual_seed(config.run.seed)  # the same new head (and random backbone) on every rank
    backbone = backbone_from(config.model)
    splits = labelled_splits(config.data)
    model = classifier(backbone, config, splits.num_classes).to(env.device)

    enc = backbone.encoder
    mean, std = normalisation(config.data, backbone)
    aug = config.augment
    transform = finetune_transform(
        enc.img_size, enc.in_chans, mean, std, aug.crop_scale, aug.auto_augment, aug.reprob
    )
    val = eval_view(splits.val, config.data, backbone)
    val_loader = build_loader(
        Subset(val, range(env.rank, len(val), env.world_size)),
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
    method = FinetuneMethod(
        model=model,
        config=config,
        env=env,
        backbone=backbone,
        val_loader=val_loader,
        num_classes=splits.num_classes,
        classes=splits.classes,
        mixup=mixup,
        ema=ModelEmaV3(model, decay=config.model.ema_decay) if config.model.ema else None,
        precision=precision,
    )
    augmented = AugmentedDataset(splits.train, transform, seed=config.run.seed)
    train_set = ReplaceBadImages(augmented, config.data.on_bad_image)
    return build_loop(method, env, config, train_set, precision)


def results(loop: TrainLoop, train_seconds: float) -> dict[str, Any]:
    """What `results.json` records of a finished fine-tuning run."""
    method: FinetuneMethod = loop.method  # type: ignore[assignment]
    last = method.last_metrics
    return {
        "top1": last.get("top1"),
        "top5": last.get("top5"),
        "best_top1": method.best_top1,
        "best_epoch": method.best_epoch + 1,
        **({"ema_top1": last.get("ema_top1")} if method.ema is not None else {}),
        "epochs": loop.optim.epochs,
        "checkpoint": method.backbone.source,
        "checkpoint_kind": method.backbone.kind,
        "num_classes": method.num_classes,
        "train_size": len(loop.loader.dataset),  # type: ignore[arg-type]
        "val_size": len(method.val_loader.dataset),  # type: ignore[arg-type]
        "train_seconds": round(train_seconds, 2),
    }


def train(loop: TrainLoop) -> dict[str, Any]:
    """Run (or continue) the schedule; return and write the results."""
    started = time.perf_counter()
    loop.run()
    found = results(loop, time.perf_counter() - started)
    if loop.env.is_main:
        write_results(loop.output_dir, "finetune", found)
    return found


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Set up and run; the programmatic twin of `droppos finetune` (releases the output folder
    however the run ends)."""
    loop = setup(config)
    try:
        return train(loop)
    finally:
        loop.close()
