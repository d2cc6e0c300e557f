"""The labelled train/val splits every evaluation reads, and the views they are seen through."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from droppos.data import AugmentedDataset, build_dataset, eval_transform
from droppos.engine.config import DataSection
from droppos.evaluation.config import EvalDataSection
from droppos.interop.checkpoints import Backbone


@dataclass
class LabelledSplits:
    """Raw (PIL image, label) splits of one source, and what the labels mean."""

    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str] | None


def labelled_splits(data: DataSection) -> LabelledSplits:
    """Both splits of `data.source` (the kinds pre-training reads); ValueError without labels."""
    source = data.source
    train = build_dataset(source, "train", data.max_image_pixels)
    val = build_dataset(source, "val", data.max_image_pixels)
    num_classes = getattr(train, "num_classes", 0)
    if num_classes < 2:
        raise ValueError(
            f"data source {source!r} has {num_classes} class(es): evaluations need labels "
            "(class sub-folders, `path label` lists, Fashion-MNIST or the demo set)"
        )
    val_classes = getattr(val, "num_classes", 0)
    if val_classes > num_classes:
        raise ValueError(
            f"data source {source!r}: the val split has {val_classes} classes, train only "
            f"{num_classes}"
        )
    return LabelledSplits(train, val, num_classes, getattr(train, "classes", None))


def normalisation(
    data: EvalDataSection, backbone: Backbone
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The user's mean/std, else the ones the weights were trained with, else the defaults."""
    return (data.mean or backbone.mean, data.std or backbone.std)


def eval_view(dataset: Dataset, data: EvalDataSection, backbone: Backbone) -> AugmentedDataset:
    """The deterministic resize + centre-crop view at the backbone's resolution and channels."""
    mean, std = normalisation(data, backbone)
    enc = backbone.encoder
    transform = eval_transform(enc.img_size, enc.in_chans, mean, std, crop_pct=data.crop_pct)
    return AugmentedDataset(dataset, transform)
