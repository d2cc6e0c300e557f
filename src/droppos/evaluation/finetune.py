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
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Subset

from droppos.data.loader import build_loader
from droppos.data.pipeline import AugmentedDataset, sample_seed, seeded_cpu_rngs
from droppos.data.transforms import finetune_transform
from droppos.engine import context as run_context
from droppos.engine.collectives import sum_over_ranks
from droppos.engine.context import RunContext
from droppos.engine.loop import StepResult, TrainLoop, build_loop, train_command
from droppos.engine.precision import autocast
from droppos.engine.strategy import Strategy, full_model_state, shards_the_model
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.datasets import (
    EvalDataSection,
    LabelledSplits,
    eval_view,
    labelled_splits,
)
from droppos.evaluation.metrics import as_percent, topk_correct
from droppos.evaluation.report import write_results
from droppos.interop.backbone import Backbone, build_vit
from droppos.interop.schema import Classifier, ClassifierWeights
from droppos.sections import OptimSection, Sections, TrainRunSection, check_crop_scale

BEST = "best.pth"
SMALL_LABELLED_SET = 1_000
"""Below this many training images the default recipe's regularisers (RandAugment, random
erasing, drop path) cost more than they give: `finetune` says so and names the preset."""


@dataclass
class FinetuneModelSection(BackboneSection):
    """Which weights to start from, and the classifier built on them."""

    global_pool: Literal["avg", "token"] = "avg"
    """avg: mean of the patch tokens through a new LayerNorm (the paper's head); token: [CLS]."""
    drop_path_rate: float = 0.1
    """Stochastic depth: the rate of the deepest block (linearly less below)."""
    ema: bool = False
    """Also keep an exponential moving average of the weights, evaluated each epoch."""
    ema_decay: float = 0.9999
    """Decay of that moving average per optimizer step."""

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"--model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class FinetuneDataSection(EvalDataSection):
    """Where the labelled images come from, the training crop and the evaluation view."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range of a training image (the recipe's is 0.08-1)."""

    def validate(self) -> None:
        super().validate()
        check_crop_scale("--data.crop_scale", self.crop_scale)


@dataclass
class AugmentSection:
    """Fine-tuning augmentation and label regularisation (the MAE recipe)."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment spec; null disables it."""
    reprob: float = 0.25
    """Random erasing probability (per image, pixel mode)."""
    mixup: float = 0.0
    """Mixup alpha (0 disables; the recipe's is 0.8)."""
    cutmix: float = 0.0
    """CutMix alpha (0 disables; the recipe's is 1.0)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (folded into the mixup targets when mixing)."""

    def validate(self) -> None:
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("--augment.mixup and --augment.cutmix must be >= 0")
        if not 0 <= self.reprob <= 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("--augment.reprob must be in [0, 1] and label_smoothing in [0, 1)")
        if self.auto_augment and not self.auto_augment.startswith("rand"):
            raise ValueError(
                f"--augment.auto_augment takes a RandAugment spec like rand-m9-mstd0.5-inc1, "
                f"got {self.auto_augment!r}"
            )


def finetune_optim() -> OptimSection:
    """The demo's fine-tuning schedule: the MAE recipe's AdamW, layer decay and no clipping,
    with a larger base lr (the recipe's is 1e-3) for 10 epochs on 4,000 small images."""
    return OptimSection(
        epochs=10,
        warmup_epochs=1.0,
        batch_size=128,
        base_lr=4e-3,
        min_lr=1e-6,
        betas=(0.9, 0.999),
        layer_decay=0.75,
        clip_grad=None,
    )


@dataclass
class FinetuneConfig(Sections):
    """Fine-tune a pre-trained ViT end to end for classification.

    The demo defaults keep the recipe's RandAugment, random erasing, label smoothing, drop path
    and layer decay, but not mixup/cutmix, and take a larger lr and milder crops: 10 epochs on
    4,000 28x28 images are far from the 100-epoch ImageNet regime those settings were tuned for.
    """

    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=finetune_optim)
    run: TrainRunSection = field(
        default_factory=lambda: TrainRunSection(output_dir="runs/finetune")
    )

    def validate(self) -> None:
        super().validate()
        if self.model.ema and shards_the_model(self.run.strategy):
            raise ValueError(
                f"--model.ema keeps a whole copy of the model, which --run.strategy "
                f"{self.run.strategy} does not hold; use ddp, or --model.ema false"
            )
        a = self.augment
        if (a.mixup > 0 or a.cutmix > 0) and self.optim.batch_size % 2:
            raise ValueError(
                "mixup/cutmix pair images within a batch: use an even --optim.batch_size"
            )


def near_zero_head(head: nn.Linear) -> None:
    """MAE's start for a new classifier head: weights N(0, 2e-5) truncated, zero bias."""
    trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)


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
    context: RunContext
    backbone: Backbone
    splits: LabelledSplits
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    """The normalisation the run decided (`normalisation`): training, validation, the file."""
    # drop path and mixup draw from generators seeded per (epoch, batch, rank)
    split_invariant: bool = False
    epoch: int = 0
    batch: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    last_metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        config, env = self.config, self.context.env
        val = eval_view(self.splits.val, config.data, self.backbone, (self.mean, self.std))
        self.val_size = len(val)  # the whole split; each rank's loader holds its share
        self.val_loader = build_loader(
            Subset(val, range(env.rank, len(val), env.world_size)),
            config.data.batch_size,
            shuffle=False,
            num_workers=config.data.num_workers,
            prefetch_factor=config.data.prefetch_factor,
            device_type=env.device.type,
            timeout=config.data.timeout,
        )
        aug = config.augment
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=aug.mixup,
                cutmix_alpha=aug.cutmix,
                label_smoothing=aug.label_smoothing,
                num_classes=self.num_classes,
            )
        self.ema = (
            ModelEmaV3(self.model, decay=config.model.ema_decay) if config.model.ema else None
        )

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def classes(self) -> list[str] | None:
        return self.splits.classes

    def start_epoch(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of a loader batch on the device, once per micro-batch."""
        device = self.context.device
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    def ahead(self, engine_model: nn.Module, batch: Any) -> tuple[None, dict[str, torch.Tensor]]:
        count = float(len(batch[1]))
        return None, {"images": torch.full((), count, device=self.context.device)}

    def forward(self, engine_model: nn.Module, batch: Any, cache: None) -> StepResult:
        env = self.context.env
        images, labels = batch
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
            normalisers={"images": torch.full((), float(len(labels)), device=labels.device)},
            share=lambda total: loss_sum / total["images"],
            metrics={},
        )

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def end_epoch(
        self, strategy: Strategy, epoch: int, metrics: dict[str, float]
    ) -> dict[str, Any]:
        found = self.evaluate(self.model)
        if self.ema is not None:
            found.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        files = {}
        if found["top1"] > self.best_top1:
            self.best_top1, self.best_epoch = found["top1"], epoch
            best = ClassifierWeights(
                header=self.describe(),
                model=full_model_state(self.model),  # gathered on every rank under FSDP
                model_ema=None if self.ema is None else self.ema.module.state_dict(),
                epoch=epoch + 1,
                top1=self.best_top1,
            )
            files[BEST] = best.to_dict()
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
        device = self.context.device
        counts = torch.zeros(3, device=device, dtype=torch.float64)  # top1, top5, total
        for images, labels in self.val_loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, self.context.precision):
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

    def describe(self) -> Classifier:
        """What a fine-tuned file says about itself, so that every command can read it back."""
        return Classifier(
            encoder=self.backbone.encoder,
            global_pool=self.config.model.global_pool,
            num_classes=self.num_classes,
            classes=self.classes,
            mean=self.mean,
            std=self.std,
            source_checkpoint=self.backbone.source,
        )


def finetuning_loop(config: FinetuneConfig) -> TrainLoop:
    """Validate, load the backbone and data, build the classifier and optimizer, maybe resume.

    User mistakes (bad options, missing or foreign checkpoint, unlabelled data) raise
    ValueError/FileNotFoundError from here, before any training.
    """
    config.validate()
    context = run_context.start(
        config.run, "finetune"
    )  # the same new head (and random backbone) everywhere
    splits = labelled_splits(config.data)
    backbone = backbone_from(config.model)
    mean, std = backbone.normalisation(
        config.data.mean, config.data.std
    )  # decided once: training, val, the file
    # The recipe's classifier: pooled tokens -> (LayerNorm) -> Linear, a new head near zero; its
    # positional embedding becomes learnable (fixed sin-cos in pre-training, as in MAE).
    pool = config.model.global_pool
    model = build_vit(
        backbone,
        num_classes=splits.num_classes,
        global_pool=pool,
        fc_norm=pool == "avg",
        drop_path_rate=config.model.drop_path_rate,
        init_new_head=near_zero_head,
    ).to(context.device)
    enc, aug = backbone.encoder, config.augment
    transform = finetune_transform(
        enc.img_size, enc.in_chans, mean, std, config.data.crop_scale, aug.auto_augment, aug.reprob
    )
    method = FinetuneMethod(model, config, context, backbone, splits, mean, std)
    train_set = AugmentedDataset(
        splits.train, transform, seed=config.run.seed, on_bad_image=config.data.on_bad_image
    )
    loop = build_loop(method, context, config, train_set)
    images = len(splits.train)  # type: ignore[arg-type]
    if images < SMALL_LABELLED_SET and aug.auto_augment:
        loop.notes.append(
            f"{images} training images: a recipe made for large sets (RandAugment, "
            "random erasing, drop path); `--config finetune_few_labels` fits a small labelled "
            "set better (the user guide's evaluation page, 'Few labels')"
        )
    return loop


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
        "val_size": method.val_size,
        "train_seconds": round(train_seconds, 2),
    }


def train(loop: TrainLoop) -> dict[str, Any]:
    """Run (or continue) the schedule; return and write the results."""
    started = time.perf_counter()
    loop.run()
    found = results(loop, time.perf_counter() - started)
    if loop.env.is_main:
        write_results(loop.output_dir, "finetune", found, loop.precision)
    return found


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Set up and run; the programmatic twin of `droppos finetune` (releases the output folder
    however the run ends)."""
    loop = finetuning_loop(config)
    try:
        return train(loop)
    finally:
        loop.close()


def run(config: FinetuneConfig) -> str | None:
    """The command: announce, fine-tune, and say how it scored."""
    loop = finetuning_loop(config)
    what = f"fine-tuning {config.model.checkpoint} on {config.data.source}"
    found = train_command("finetune", config, loop, what, train)
    if found is None or not loop.context.is_main:
        return None
    return (
        f"done: val top-1 {found['top1']:.2f}, top-5 {found['top5']:.2f} "
        f"(best top-1 {found['best_top1']:.2f} at epoch {found['best_epoch']}); "
        f"{loop.output_dir / 'results.json'}"
    )
