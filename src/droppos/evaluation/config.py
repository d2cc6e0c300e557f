"""Typed configuration of the evaluation commands: finetune, linprobe, knn, export.

Defaults are small runs on the built-in demo set that evaluate the default pre-training output
(`runs/pretrain/last.pth`); the paper's ImageNet recipes are YAML presets in `configs/`.
The demo fine-tuning keeps the recipe's RandAugment, random erasing, label smoothing, drop path
and layer decay, but not mixup/cutmix, and takes a larger lr and milder crops: 10 epochs on 4,000
28x28 images are far from the 100-epoch ImageNet regime those settings were tuned for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from droppos.engine.config import (
    DataSection,
    OptimSection,
    RunSection,
    TrainRunSection,
    check_crop_scale,
    demo_encoder,
)
from droppos.models.encoder import EncoderConfig

DEFAULT_CHECKPOINT = "runs/pretrain/last.pth"


@dataclass
class BackboneSection:
    """Which weights to evaluate."""

    checkpoint: str = DEFAULT_CHECKPOINT
    """A droppos pre-training or fine-tuning checkpoint, an original DropPos/MAE checkpoint, an
    exported model.safetensors, or `random`: a fresh encoder shaped by name/img_size/... below."""
    random_init: bool = False
    """Keep only the checkpoint's shape and initialise afresh: the no-pretraining baseline of
    exactly the same model."""
    num_heads: int | None = None
    """Attention heads, for files that do not say (non-standard widths)."""
    encoder: EncoderConfig = field(default_factory=demo_encoder)
    """The shape of `checkpoint: random` (default: the demo's encoder)."""


@dataclass
class FeatureBackboneSection(BackboneSection):
    """Which weights, and which of their outputs the frozen-feature evaluations read."""

    feature: Literal["cls", "avg"] = "avg"
    """avg: the mean of the patch tokens (the default: DropPos trains the patch tokens, and
    benchmarks/STUDY.md finds it ahead of [CLS]); cls: the final-norm [CLS] token (MAE's
    linear probe, which the ImageNet presets keep)."""


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


@dataclass
class EvalDataSection(DataSection):
    """Where the labelled images come from, and the deterministic evaluation view."""

    source: str = "demo"
    """demo (built in), fashion-mnist[:DIR], an image folder (class sub-folders; with train/
    and val/ inside, the split is picked), or a labelled file list (`path label` lines)."""
    mean: tuple[float, ...] | None = None
    """Normalisation mean; null = the checkpoint's (if it says), else ImageNet's for RGB and
    0.5 for greyscale."""
    std: tuple[float, ...] | None = None
    """Normalisation std; null = the checkpoint's, else the defaults as for mean."""
    batch_size: int = 256
    """Images per forward when extracting features or evaluating (per process)."""
    crop_pct: float = 0.875
    """Evaluation view: resize the shorter side to img_size / crop_pct, centre crop (256/224)."""

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"--data.crop_pct must be in (0, 1], got {self.crop_pct}")


@dataclass
class AugmentSection:
    """Fine-tuning augmentation and label regularisation (the MAE recipe)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range (the recipe's is 0.08-1)."""
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
class FinetuneConfig:
    """Fine-tune a pre-trained ViT end to end for classification."""

    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=finetune_optim)
    run: TrainRunSection = field(
        default_factory=lambda: TrainRunSection(output_dir="runs/finetune")
    )

    def validate(self) -> None:
        o, a = self.optim, self.augment
        o.validate()
        self.run.validate()
        check_crop_scale("--augment.crop_scale", a.crop_scale)
        if a.mixup < 0 or a.cutmix < 0:
            raise ValueError("--augment.mixup and --augment.cutmix must be >= 0")
        if (a.mixup > 0 or a.cutmix > 0) and o.batch_size % 2:
            raise ValueError(
                "mixup/cutmix pair images within a batch: use an even --optim.batch_size"
            )
        if not 0 <= a.reprob <= 1 or not 0 <= a.label_smoothing < 1:
            raise ValueError("--augment.reprob must be in [0, 1] and label_smoothing in [0, 1)")
        if a.auto_augment and not a.auto_augment.startswith("rand"):
            raise ValueError(
                f"--augment.auto_augment takes a RandAugment spec like rand-m9-mstd0.5-inc1, "
                f"got {a.auto_augment!r}"
            )
        _validate_common(self.data, self.model)


@dataclass
class ProbeSection:
    """The linear probe (MAE protocol): BatchNorm without affine + Linear, LARS, cosine."""

    optimizer: Literal["lars", "sgd"] = "lars"
    """LARS (the MAE linear probe) or plain SGD with momentum."""
    base_lrs: list[float] = field(default_factory=lambda: [3.0, 10.0, 30.0, 100.0])
    """Every base lr is trained side by side on the same cached features (lr = base_lr x batch
    / 256); the best is reported, together with all of them."""
    epochs: int = 90
    """Passes over the cached training features."""
    warmup_epochs: float = 10.0
    """Epochs of linear lr warmup before the cosine."""
    batch_size: int = 256
    """Features per probe step."""
    weight_decay: float = 0.0
    """Weight decay of the probe."""
    momentum: float = 0.9
    """Momentum of LARS/SGD."""


@dataclass
class LinprobeConfig:
    """Linear probe on frozen features."""

    model: FeatureBackboneSection = field(default_factory=FeatureBackboneSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/linprobe"))

    def validate(self) -> None:
        p = self.probe
        if p.epochs < 1 or p.batch_size < 1:
            raise ValueError("--probe.epochs and --probe.batch_size must be >= 1")
        if not p.base_lrs or min(p.base_lrs) <= 0:
            raise ValueError(f"--probe.base_lrs needs positive learning rates, got {p.base_lrs}")
        if not 0 <= p.warmup_epochs <= p.epochs:
            raise ValueError(f"--probe.warmup_epochs must be in [0, epochs], got {p.warmup_epochs}")
        _validate_common(self.data, self.model)


@dataclass
class KnnSection:
    """Weighted k-nearest-neighbour vote on L2-normalised features."""

    k: int = 20
    """Neighbours that vote."""
    temperature: float = 0.07
    """Neighbour weight exp(cosine / temperature)."""
    query_batch: int = 1024
    """Queries per similarity matrix product (bounds memory at query_batch x train size)."""


@dataclass
class KnnConfig:
    """Weighted kNN classification on frozen features."""

    model: FeatureBackboneSection = field(default_factory=FeatureBackboneSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    knn: KnnSection = field(default_factory=KnnSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/knn"))

    def validate(self) -> None:
        if self.knn.k < 1 or self.knn.query_batch < 1:
            raise ValueError("--knn.k and --knn.query_batch must be >= 1")
        if self.knn.temperature <= 0:
            raise ValueError(f"--knn.temperature must be > 0, got {self.knn.temperature}")
        _validate_common(self.data, self.model)


@dataclass
class PositionProbeSection:
    """The position probe: which patches lose their position, and the linear classifier."""

    drop_ratio: float = 0.75
    """Fraction of each image's patches encoded without their positional embedding (and
    probed); 0 probes every patch with its embedding, 1 drops them all."""
    seeds: int = 3
    """Probes trained on the same features with different seeds (mean and std reported)."""
    epochs: int = 30
    """Passes over the cached patch features."""
    batch_size: int = 1024
    """Patch features per probe step."""
    lr: float = 1e-3
    """AdamW learning rate (cosine to zero)."""
    weight_decay: float = 1e-4
    """AdamW weight decay of the probe."""
    holdout: float = 0.2
    """Share of the images held out for scoring when the source has no val split."""
    max_train_images: int = 10000
    """At most this many training images (a fixed random subset)."""
    max_val_images: int = 2000
    """At most this many held-out images."""


@dataclass
class PositionProbeConfig:
    """Measure how well a frozen backbone knows where its patches are."""

    model: BackboneSection = field(default_factory=BackboneSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    probe: PositionProbeSection = field(default_factory=PositionProbeSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/probe-position"))

    def validate(self) -> None:
        p = self.probe
        if not 0 <= p.drop_ratio <= 1:
            raise ValueError(f"--probe.drop_ratio must be in [0, 1], got {p.drop_ratio}")
        if min(p.seeds, p.epochs, p.batch_size, p.max_train_images, p.max_val_images) < 1:
            raise ValueError(
                "--probe.seeds, epochs, batch_size, max_train_images and max_val_images must "
                "be >= 1"
            )
        if p.lr <= 0 or p.weight_decay < 0 or not 0 < p.holdout < 1:
            raise ValueError(
                "--probe.lr must be > 0, --probe.weight_decay >= 0, --probe.holdout in (0, 1)"
            )
        _validate_common(self.data, self.model)


@dataclass
class OrderSection:
    """How the input's order is broken."""

    tiles: int = 2
    """The tile jigsaw cuts each image into tiles x tiles pieces."""


@dataclass
class OrderSensitivityConfig:
    """Top-1 of a fine-tuned classifier with intact, shuffled and position-less inputs."""

    model: BackboneSection = field(
        default_factory=lambda: BackboneSection(checkpoint="runs/finetune/best.pth")
    )
    data: EvalDataSection = field(default_factory=EvalDataSection)
    order: OrderSection = field(default_factory=OrderSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/order-sensitivity"))

    def validate(self) -> None:
        if self.order.tiles < 1:
            raise ValueError(f"--order.tiles must be >= 1, got {self.order.tiles}")
        _validate_common(self.data, self.model)


@dataclass
class VisualizeConfig:
    """Pictures of the jigsaw a DropPos checkpoint solves."""

    checkpoint: str = DEFAULT_CHECKPOINT
    """A droppos pre-training checkpoint of a DropPos model (the decoder is needed)."""
    source: str = "demo"
    """Images to draw (the val split when the source has one)."""
    images: int = 4
    """How many images: one PNG each."""
    output: str = "runs/visualize"
    """Folder for the pictures."""
    seed: int = 0
    """Seed of the masks drawn for the pictures."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = a GPU when there is one, else the CPU."""

    def validate(self) -> None:
        if self.images < 1:
            raise ValueError(f"--images must be >= 1, got {self.images}")


@dataclass
class WriteShardsConfig:
    """Write a data source as WebDataset-style tar shards (fewer, larger files)."""

    source: str = "demo"
    """Any data source droppos reads (image folder, file list, fashion-mnist, demo)."""
    output: str = "shards"
    """Folder for {split}-NNNNNN.tar, their indexes and classes.txt."""
    shard_size: int = 1000
    """Images per shard."""

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1, got {self.shard_size}")


@dataclass
class ExportConfig:
    """Export a checkpoint's encoder (or fine-tuned classifier) for timm, Detectron2, MMSeg."""

    checkpoint: str = DEFAULT_CHECKPOINT
    """A droppos pre-training or fine-tuning checkpoint, an original DropPos/MAE checkpoint, or
    an exported model.safetensors."""
    output: str = "runs/export"
    """Folder for model.safetensors, config.json, mae_format.pth and mmseg_mae.pth."""
    timm_name: str | None = None
    """timm architecture recorded in config.json; null = vit_{size}_patch{p}_224 by width."""
    num_heads: int | None = None
    """Attention heads, for files that do not say (non-standard widths)."""

    def validate(self) -> None:
        if self.checkpoint == "random":
            raise ValueError("export needs a checkpoint file, not `random`")
        if not self.output:
            raise ValueError("--output needs a folder")


def _validate_common(data: EvalDataSection, model: BackboneSection) -> None:
    data.validate()
    if model.num_heads is not None and model.num_heads < 1:
        raise ValueError(f"--model.num_heads must be >= 1, got {model.num_heads}")
    drop_path = getattr(model, "drop_path_rate", 0.0)
    if not 0 <= drop_path < 1:
        raise ValueError(f"--model.drop_path_rate must be in [0, 1), got {drop_path}")
