"""The configuration sections every command shares: checkpoint, data, optimisation, run, output.

The vocabulary of the command line (`--model.checkpoint`, `--data.source`, `--run.output_dir`
mean the same in every command), so it sits below every package that has a command. One
dataclass per concept, defined once and embedded by each command's own configuration (which
lives beside the command's code); each section validates its own values, once, in `validate`.
Defaults suit the built-in demo (a tiny ViT on the embedded Fashion-MNIST subset, minutes on a
laptop CPU); the paper's ImageNet recipes are YAML presets in `configs/`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

StrategyName = Literal["auto", "ddp", "fsdp"]
"""How torchrun's processes share a model (`engine/strategy.py` has a class for each)."""

DEFAULT_CHECKPOINT = "runs/pretrain/last.pth"  # where `droppos pretrain` leaves its model
DEFAULT_MAX_IMAGE_PIXELS = 200_000_000  # 14,000 x 14,000: far above any training image


class Sections:
    """A command's configuration made of sections: validating it validates each of them."""

    def validate(self) -> None:
        """Catch user mistakes before any work starts (each error says what to change)."""
        for f in fields(self):  # type: ignore[arg-type]
            check = getattr(getattr(self, f.name), "validate", None)
            if check is not None:
                check()


@dataclass
class CheckpointSection:
    """Which checkpoint a command reads (`--model.checkpoint`, the same in every command)."""

    checkpoint: str = DEFAULT_CHECKPOINT
    """A droppos checkpoint file."""


@dataclass
class OutputSection:
    """Where a command that only writes files puts them (`--run.output_dir`, as everywhere)."""

    output_dir: str = "runs/out"
    """Folder for the files written."""

    def validate(self) -> None:
        if not self.output_dir:
            raise ValueError("--run.output_dir needs a folder")


@dataclass
class DataSection:
    """Where the images come from, and what happens to unreadable ones."""

    source: str = "demo"
    """demo (built in), fashion-mnist[:DIR], an image folder (class sub-folders, which
    evaluations need, or flat; with train/ and val/ inside, the split is picked), a file list
    (`relative/path label` lines) or a folder of tar shards."""
    num_workers: int = 1
    """Loader worker processes per rank (0 loads in the main process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (with workers): raise it when the GPU waits on
    bursts of slow images, at the cost of host memory."""
    mean: tuple[float, ...] | None = None
    """Normalisation mean; null = the checkpoint's when an evaluation reads one that records
    it, else ImageNet's for RGB and 0.5 for greyscale."""
    std: tuple[float, ...] | None = None
    """Normalisation std; null = as for mean (the checkpoint's, else the defaults)."""
    on_bad_image: Literal["skip", "fail"] = "skip"
    """A training image (pre-training, fine-tuning) that cannot be read: skip (warn, count, use
    its neighbour) or fail. Images an evaluation measures (kNN, probes, validation) always stop
    it at the first, naming the file: an accuracy over a silently changed set would be wrong."""
    max_bad_fraction: float = 0.01
    """Stop when more than this fraction of an epoch's training images were unreadable."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images with more pixels are unreadable (checked before decoding)."""
    timeout: float = 600.0
    """Seconds a loader worker may take for one batch before the command stops (0 = no
    limit; every command's loaders, evaluations included)."""

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"--data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(
                f"--data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}"
            )
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and not all(math.isfinite(v) for v in values):
                raise ValueError(f"--data.{name} must be finite numbers, got {list(values)}")
            if values is not None and not values:
                raise ValueError(f"--data.{name} needs one value per channel")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"--data.std must be > 0, got {list(self.std)}")
        if self.max_image_pixels < 1 or self.timeout < 0:
            raise ValueError("--data.max_image_pixels must be >= 1 and --data.timeout >= 0")


def check_crop_scale(option: str, scale: tuple[float, float]) -> None:
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"{option} must satisfy 0 < low <= high <= 1, got {list(scale)}")


@dataclass
class OptimSection:
    """AdamW and its per-iteration schedule: linear warmup, then a half-cosine to min_lr."""

    epochs: int = 10
    """Passes over the training set."""
    warmup_epochs: float = 1.0
    """Epochs of linear lr warmup (fractions allowed)."""
    batch_size: int = 64
    """Images per process per forward; the effective batch is batch_size x accum_steps x
    world size."""
    accum_steps: int = 1
    """Forward/backward passes per optimizer step (gradient accumulation)."""
    base_lr: float = 2e-3
    """lr = base_lr x effective batch / 256, unless lr is set."""
    lr: float | None = None
    """Absolute peak lr (overrides base_lr scaling)."""
    min_lr: float = 0.0
    """lr at the end of the cosine."""
    weight_decay: float = 0.05
    """AdamW weight decay (never on biases, norms, tokens and fixed tables)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    layer_decay: float = 1.0
    """lr scale decay per block from the head down to the patch embedding (1 = off;
    fine-tuning recipes: 0.75)."""
    clip_grad: float | None = 5.0
    """Max gradient norm; null disables clipping."""
    min_steps: int = 0
    """Train at least this many optimiser steps: a training set too small for them in `epochs`
    gets more epochs (said at the start; 0 = `epochs` as given). What a schedule made for a few
    hundred images needs, so that a smaller set is not under-trained."""

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--optim.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.accum_steps < 1:
            raise ValueError("--optim.batch_size and --optim.accum_steps must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"--optim.warmup_epochs must be in [0, epochs], got {self.warmup_epochs}"
            )
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.base_lr <= 0 or (self.lr is not None and self.lr <= 0) or self.min_lr < 0:
            raise ValueError("--optim.base_lr and --optim.lr must be > 0, --optim.min_lr >= 0")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--optim.clip_grad must be > 0 or null, got {self.clip_grad}")
        if self.min_steps < 0:
            raise ValueError(f"--optim.min_steps must be >= 0, got {self.min_steps}")


@dataclass
class RunSection:
    """Where outputs go, and how to compute."""

    output_dir: str = "runs/eval"
    """Folder for this run's outputs."""
    reuse_folder: bool = False
    """Write into an output folder that already holds files but no droppos run (they may be
    overwritten); without it such a folder is refused."""
    seed: int = 0
    """Seed of everything random (augmentation, masks, initialisation)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = this process's GPU when there is one, else the CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on GPUs and on CPUs with native bf16, else fp32."""
    progress: bool = True
    """Progress bars (only when the output is a terminal; plain lines otherwise)."""
    threads: int = 0
    """CPU threads of this process's arithmetic; 0 = auto: the cores it may use, shared among
    torchrun's processes on the machine. Ignored when OMP_NUM_THREADS is set."""

    def validate(self) -> None:
        if self.threads < 0:
            raise ValueError(f"--run.threads must be >= 0 (0 = auto), got {self.threads}")


@dataclass
class TrainRunSection(RunSection):
    """Where outputs go, precision, checkpoints and logging of a training run."""

    output_dir: str = "runs/pretrain"
    """Folder for this run's outputs (config, metrics, checkpoints)."""
    compile: bool = False
    """torch.compile the model (pays off on GPUs for long runs)."""
    strategy: StrategyName = "auto"
    """How torchrun's processes share the model: ddp (a full replica each; auto's choice under
    torchrun), fsdp (parameters, gradients and optimiser state sharded: for models one GPU
    cannot hold). auto without torchrun: one process."""
    activation_checkpointing: bool = False
    """Recompute the encoder blocks' activations in backward instead of keeping them (less
    memory, about a third more compute)."""
    resume: str | None = "auto"
    """auto (continue from output_dir/last.pth if present), a checkpoint path, or null."""
    save_every_steps: int = 0
    """Also write last.pth every N optimizer steps (0 = at epoch ends only)."""
    keep_every_epochs: int = 0
    """Also keep checkpoint-EPOCH.pth every N epochs (0 = keep only last.pth)."""
    log_every: int = 20
    """Optimizer steps between progress/JSON-line updates (each costs one host sync)."""
    tensorboard: bool = True
    """Mirror the metrics to TensorBoard (output_dir/tensorboard)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: stop (nothing non-finite is saved) or skip the step
    (reads one value from the device per step)."""
    max_skipped_steps: int = 5
    """With on_nonfinite skip: this many non-finite steps in a row stop the run."""

    def validate(self) -> None:
        super().validate()
        if self.max_skipped_steps < 1:
            raise ValueError(f"--run.max_skipped_steps must be >= 1, got {self.max_skipped_steps}")
        if min(self.save_every_steps, self.keep_every_epochs) < 0:
            raise ValueError("--run.save_every_steps and --run.keep_every_epochs must be >= 0")
        if self.log_every < 1:
            raise ValueError(f"--run.log_every must be >= 1, got {self.log_every}")
