"""Typed configuration of the commands, written next to every run's outputs.

The defaults of `PretrainConfig` are the built-in demo (a tiny ViT on the embedded Fashion-MNIST
subset, minutes on a laptop CPU); the paper's ImageNet recipes are YAML presets in `configs/`.
The objective's own defaults (`DropPosConfig`) are the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from droppos.models.registry import create_model, parse_name


@dataclass
class PretrainModelSection:
    """Which model to pre-train, and the DropPos objective's options."""

    name: str = "droppos_vit_tiny_patch16"
    """droppos_vit_{tiny,small,base,large}_patch16, droppos_vit_huge_patch14, or mae_vit_* for
    the plain MAE baseline."""
    img_size: int | tuple[int, int] = 28
    """Input resolution (one int, or height and width)."""
    patch_size: int | None = 7
    """Patch size; null keeps the one in the model name."""
    in_chans: int = 1
    """Image channels the model takes (greyscale or RGB images are converted to it)."""
    embed_dim: int | None = None
    """Encoder width; null keeps the named size's."""
    depth: int | None = 4
    """Encoder blocks; null keeps the named size's."""
    num_heads: int | None = None
    """Encoder heads; null keeps the named size's."""
    decoder_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    patch_mask_ratio: float = 0.5
    """gamma: fraction of patches hidden from the encoder (the paper: 0.75)."""
    position_drop_ratio: float = 0.75
    """gamma_pos: fraction of visible patches whose positional embedding is dropped."""
    mask_token_kind: Literal["learnable", "zeros", "wrong_pos"] = "learnable"
    smoothing_sigma: float = 1.0
    """Initial sigma of the Gaussian position smoothing (0 = one-hot targets)."""
    smoothing_decay: bool = True
    """Decay sigma linearly to 0 over the run, per epoch (the paper's schedule)."""
    attentive: bool = True
    """Weight the loss by attention to [CLS] on the full image (attentive reconstruction)."""
    attentive_tau: float = 0.1
    attentive_source: Literal["full_image", "visible"] = "full_image"
    """full_image (the paper: an extra no-grad pass) or visible (faster deviation: reuse the
    masked pass's features; see benchmarks/RESULTS.md)."""
    confidence_ignore: bool = False
    pos_weight: float = 1.0
    pixel_branch: bool = False
    """Add the MAE pixel-reconstruction branch (multi-task)."""

    def build(self) -> nn.Module:
        kind, _, _ = parse_name(self.name)
        encoder: dict[str, Any] = {"img_size": self.img_size, "in_chans": self.in_chans}
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, key) is not None:
                encoder[key] = getattr(self, key)
        if kind == "mae":
            return create_model(self.name, patch_mask_ratio=self.patch_mask_ratio, **encoder)
        if kind != "droppos":
            raise ValueError(f"pretrain needs a droppos_* or mae_* model, got {self.name!r}")
        return create_model(
            self.name,
            decoder_embed_dim=self.decoder_embed_dim,
            decoder_depth=self.decoder_depth,
            decoder_num_heads=self.decoder_num_heads,
            patch_mask_ratio=self.patch_mask_ratio,
            position_drop_ratio=self.position_drop_ratio,
            mask_token_kind=self.mask_token_kind,
            smoothing_sigma=self.smoothing_sigma,
            attentive=self.attentive,
            attentive_tau=self.attentive_tau,
            attentive_source=self.attentive_source,
            confidence_ignore=self.confidence_ignore,
            pos_weight=self.pos_weight,
            pixel_branch=self.pixel_branch,
            **encoder,
        )


@dataclass
class DataSection:
    """Where the images come from."""

    source: str = "demo"
    """demo (built in), fashion-mnist[:DIR], an image folder (class sub-folders or flat; with
    train/ and val/ inside, the split is picked), or a file list (`relative/path label` lines)."""
    num_workers: int = 1
    """Loader worker processes per rank (0 loads in the training process)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """RandomResizedCrop area range (the paper and the ImageNet presets: 0.2-1)."""
    mean: tuple[float, ...] | None = None
    """Normalisation mean; null = ImageNet's for RGB, 0.5 for greyscale."""
    std: tuple[float, ...] | None = None


@dataclass
class OptimSection:
    """AdamW and the schedule (SPEC §2)."""

    epochs: int = 10
    warmup_epochs: float = 1.0
    batch_size: int = 64
    """Per process; the effective batch is batch_size x accum_steps x world size."""
    accum_steps: int = 1
    """Gradient accumulation steps per optimizer step."""
    base_lr: float = 2e-3
    """lr = base_lr x effective batch / 256 (the paper: 1.5e-4), unless lr is set."""
    lr: float | None = None
    """Absolute peak lr (overrides base_lr scaling)."""
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 5.0
    """Max gradient norm; null disables clipping."""


@dataclass
class RunSection:
    """Where outputs go, precision, checkpoints and logging."""

    output_dir: str = "runs/pretrain"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on GPUs and on CPUs with native bf16, else fp32."""
    compile: bool = False
    """torch.compile the model (pays off on GPUs for long runs)."""
    resume: str | None = "auto"
    """auto (continue from output_dir/last.pth if present), a checkpoint path, or null."""
    save_every_steps: int = 0
    """Also write last.pth every N optimizer steps (0 = at epoch ends only)."""
    keep_every_epochs: int = 0
    """Keep checkpoint-EPOCH.pth every N epochs (0 = keep only last.pth)."""
    log_every: int = 20
    """Steps between progress/JSON-line updates (each costs one host sync)."""
    tensorboard: bool = True
    progress: bool = True


@dataclass
class PretrainConfig:
    """Pre-train a ViT with DropPos."""

    model: PretrainModelSection = field(default_factory=PretrainModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        """Catch user mistakes before any work starts (each error says what to change)."""
        o = self.optim
        if o.epochs < 1:
            raise ValueError(f"--optim.epochs must be >= 1, got {o.epochs}")
        if o.batch_size < 1 or o.accum_steps < 1:
            raise ValueError("--optim.batch_size and --optim.accum_steps must be >= 1")
        if not 0 <= o.warmup_epochs <= o.epochs:
            raise ValueError(f"--optim.warmup_epochs must be in [0, epochs], got {o.warmup_epochs}")
        if self.data.num_workers < 0:
            raise ValueError("--data.num_workers must be >= 0")
