"""Typed configuration of the evaluation commands: finetune, linprobe, knn, export.

Defaults are small runs on the built-in demo set that evaluate the default pre-training output
(`runs/pretrain/last.pth`); the paper's ImageNet recipes (SPEC §2) are YAML presets in `configs/`.
The demo fine-tuning keeps the recipe's RandAugment, random erasing, label smoothing, drop path
and layer decay, but not mixup/cutmix, and takes a larger lr and milder crops: 10 epochs on 4,000
28x28 images are far from the 100-epoch ImageNet regime those settings were tuned for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from droppos.engine.config import PretrainModelSection, RunSection
from droppos.models.encoder import EncoderConfig
from droppos.models.registry import parse_name

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
    """Attention heads, for files that do not say (non-standard widths); also shapes `random`."""
    # The shape of `checkpoint: random`; defaults follow `droppos pretrain`'s demo model.
    name: str = PretrainModelSection.name
    """A model name whose encoder shape `random` takes (vit_base_patch16, ...)."""
    img_size: int | tuple[int, int] = PretrainModelSection.img_size
    patch_size: int | None = PretrainModelSection.patch_size
    in_chans: int = PretrainModelSection.in_chans
    embed_dim: int | None = PretrainModelSection.embed_dim
    depth: int | None = PretrainModelSection.depth

    def random_shape(self) -> EncoderConfig:
        """The encoder shape `checkpoint: random` stands for."""
        _, _, shape = parse_name(self.name)
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, key) is not None:
                shape[key] = getattr(self, key)
        return EncoderConfig(img_size=self.img_size, in_chans=self.in_chans, **shape)


@dataclass
class FeatureBackboneSection(BackboneSection):
    """Which weights, and which of their outputs the frozen-feature evaluations read."""

    feature: Literal["cls", "avg"] = "cls"
    """cls: the final-norm [CLS] token (MAE's linear probe); avg: the mean of the patch tokens."""


@dataclass
class FinetuneModelSection(BackboneSection):
    """Which weights to start from, and the classifier built on them (SPEC §2)."""

    global_pool: Literal["avg", "token"] = "avg"
    """avg: mean of the patch tokens through a new LayerNorm (the paper's head); token: [CLS]."""
    drop_path_rate: float = 0.1
    ema: bool = False
    """Also keep an exponential moving average of the weights, evaluated each epoch."""
    ema_decay: float = 0.9999


@dataclass
class EvalDataSection:
    """Where the labelled images come from, and the deterministic evaluation view."""

    source: str = "demo"
    """demo (built in), fashion-mnist[:DIR], an image folder (class sub-folders; with train/
    and val/ inside, the split is picked), or a labelled file list (`path label` lines)."""
    num_workers: int = 1
    batch_size: int = 256
    """Images per forward when extracting features or evaluating (per process)."""
    mean: tuple[float, ...] | None = None
    """Normalisation mean; null = the checkpoint's (if it says), else ImageNet's for RGB and
    0.5 for greyscale."""
    std: tuple[float, ...] | None = None
    crop_pct: float = 0.875
    """Evaluation view: resize the shorter side to img_size / crop_pct, centre crop (256/224)."""


@dataclass
class AugmentSection:
    """Fine-tuning augmentation and label regularisation (the MAE recipe, SPEC §2)."""

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


@dataclass
class FinetuneOptimSection:
    """AdamW with layer-wise lr decay and a per-iteration warmup + half-cosine schedule."""

    epochs: int = 10
    warmup_epochs: float = 1.0
    batch_size: int = 128
    """Per process; the effective batch is batch_size x accum_steps x world size."""
    accum_steps: int = 1
    base_lr: float = 4e-3
    """lr = base_lr x effective batch / 256, unless lr is set (the recipe's base is 1e-3)."""
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.75
    """lr scale decay per block from the head down to the patch embedding (1 = off)."""
    clip_grad: float | None = None
    """Max gradient norm; null disables clipping (the recipe does not clip)."""


@dataclass
class FinetuneConfig:
    """Fine-tune a pre-trained ViT end to end for classification."""

    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: FinetuneOptimSection = field(default_factory=FinetuneOptimSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/finetune"))

    def validate(self) -> None:
        o, a = self.optim, self.augment
        if o.epochs < 1:
            raise ValueError(f"--optim.epochs must be >= 1, got {o.epochs}")
        if o.batch_size < 1 or o.accum_steps < 1:
            raise ValueError("--optim.batch_size and --optim.accum_steps must be >= 1")
        if not 0 <= o.warmup_epochs <= o.epochs:
            raise ValueError(f"--optim.warmup_epochs must be in [0, epochs], got {o.warmup_epochs}")
        if not 0 < o.layer_decay <= 1:
            raise ValueError(f"--optim.layer_decay must be in (0, 1], got {o.layer_decay}")
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
class EvalRunSection:
    """Where results go, and how to compute."""

    output_dir: str = "runs/eval"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Of the feature extraction; the probes themselves train in fp32."""
    progress: bool = True


@dataclass
class ProbeSection:
    """The linear probe (MAE protocol): BatchNorm without affine + Linear, LARS, cosine."""

    optimizer: Literal["lars", "sgd"] = "lars"
    base_lrs: list[float] = field(default_factory=lambda: [3.0, 10.0, 30.0, 100.0])
    """Every base lr is trained side by side on the same cached features (lr = base_lr x batch
    / 256); the best is reported, together with all of them."""
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 256
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass
class LinprobeConfig:
    """Linear probe on frozen features."""

    model: FeatureBackboneSection = field(default_factory=FeatureBackboneSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    run: EvalRunSection = field(default_factory=lambda: EvalRunSection(output_dir="runs/linprobe"))

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
    run: EvalRunSection = field(default_factory=lambda: EvalRunSection(output_dir="runs/knn"))

    def validate(self) -> None:
        if self.knn.k < 1 or self.knn.query_batch < 1:
            raise ValueError("--knn.k and --knn.query_batch must be >= 1")
        if self.knn.temperature <= 0:
            raise ValueError(f"--knn.temperature must be > 0, got {self.knn.temperature}")
        _validate_common(self.data, self.model)


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
    if data.num_workers < 0 or data.batch_size < 1:
        raise ValueError("--data.num_workers must be >= 0 and --data.batch_size >= 1")
    if not 0 < data.crop_pct <= 1:
        raise ValueError(f"--data.crop_pct must be in (0, 1], got {data.crop_pct}")
    drop_path = getattr(model, "drop_path_rate", 0.0)
    if not 0 <= drop_path < 1:
        raise ValueError(f"--model.drop_path_rate must be in [0, 1), got {drop_path}")
