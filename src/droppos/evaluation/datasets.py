"""The labelled train/val splits every evaluation reads, and the views they are seen through."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from droppos.data.catalog import build_source
from droppos.data.loader import build_loader
from droppos.data.pipeline import AugmentedDataset
from droppos.data.sources import carved_splits
from droppos.data.transforms import eval_transform
from droppos.engine.collectives import computed_by_rank0
from droppos.engine.context import RunContext
from droppos.interop.backbone import Backbone
from droppos.sections import DataSection, RunSection, Sections


@dataclass
class EvalDataSection(DataSection):
    """Where the labelled images come from, and the deterministic evaluation view."""

    batch_size: int = 256
    """Images per forward when extracting features or evaluating (per process)."""
    crop_pct: float = 0.875
    """Evaluation view: resize the shorter side to img_size / crop_pct, centre crop (256/224)."""
    val_from_train: int = 0
    """N > 0: hold out N class-balanced training images and evaluate on them instead of the
    source's val split (which is then not read): make choices (learning rate, feature, recipe)
    there and keep the test split for the number you report."""
    train_images: int = 0
    """N > 0: train on a class-balanced subset of N training images (after any held-out
    validation): a few labels, as a user with a small labelled set has. 0 = all."""
    subset_seed: int = 0
    """Seed of those picks alone (not --run.seed): every run with the same N and subset_seed
    sees the same images, whatever its own seed."""

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {self.batch_size}")
        if self.val_from_train < 0 or self.train_images < 0:
            raise ValueError("--data.val_from_train and --data.train_images must be >= 0")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"--data.crop_pct must be in (0, 1], got {self.crop_pct}")


@dataclass
class EvaluationConfig(Sections):
    """The sections every evaluation shares; each adds its backbone and its own section (and
    sets `run`'s default output folder)."""

    data: EvalDataSection = field(default_factory=EvalDataSection)
    run: RunSection = field(default_factory=RunSection)


@dataclass
class LabelledSplits:
    """Raw (image, label) splits of one source, and what the labels mean."""

    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str] | None


def labelled_splits(data: DataSection, val_may_be_train: bool = False) -> LabelledSplits:
    """Both splits of `data.source` (the kinds pre-training reads); ValueError without labels.
    With `--data.val_from_train` the val split is held out of train, with `--data.train_images`
    train is a class-balanced subset (evaluation sections only). A source without a val split
    of its own gives its training images as val: refused (a score on the training images is no
    evaluation) unless `val_may_be_train` (the caller splits them itself)."""
    source = data.source
    share = computed_by_rank0
    train = build_source(source, "train", data.max_image_pixels, share=share)
    if train.num_classes < 2:
        raise ValueError(
            f"data source {source!r} has {train.num_classes} class(es): evaluations need labels "
            "(class sub-folders, `path label` lists, Fashion-MNIST or the demo set)"
        )
    held_out = getattr(data, "val_from_train", 0)
    val = None if held_out else build_source(source, "val", data.max_image_pixels, share=share)
    if val is not None and val.origin == train.origin and not val_may_be_train:
        raise ValueError(
            f"data source {source!r} has no val split (train/ and val/ folders or lists): "
            "its val would be its training images; hold some out with --data.val_from_train N"
        )
    train, val = carved_splits(
        train, val, held_out, getattr(data, "train_images", 0), getattr(data, "subset_seed", 0)
    )
    if val.num_classes > train.num_classes:
        raise ValueError(
            f"data source {source!r}: the val split has {val.num_classes} classes, train only "
            f"{train.num_classes}"
        )
    return LabelledSplits(train, val, train.num_classes, train.classes)


def eval_view(
    dataset: Dataset,
    data: EvalDataSection,
    backbone: Backbone,
    decided: tuple[tuple[float, ...] | None, tuple[float, ...] | None] | None = None,
) -> AugmentedDataset:
    """The deterministic resize + centre-crop view at the backbone's resolution and channels,
    normalised as `decided` (a command's own choice), else as `Backbone.normalisation` says."""
    mean, std = decided if decided is not None else backbone.normalisation(data.mean, data.std)
    enc = backbone.encoder
    transform = eval_transform(enc.img_size, enc.in_chans, mean, std, crop_pct=data.crop_pct)
    return AugmentedDataset(dataset, transform)


def inference_batches(
    dataset: Dataset, data: EvalDataSection, context: RunContext, desc: str = "images"
) -> Iterator[tuple[torch.Tensor, Any]]:
    """`(images on the device, labels)` of `dataset` in order, `data.batch_size` at a time."""
    device = context.device
    loader = build_loader(
        dataset, data.batch_size, shuffle=False, num_workers=data.num_workers,
        prefetch_factor=data.prefetch_factor, device_type=device.type, timeout=data.timeout,
    )  # fmt: skip
    for images, labels in tqdm(loader, desc=desc, disable=not context.progress, leave=False):
        yield images.to(device, non_blocking=True), labels
