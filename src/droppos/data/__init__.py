"""Data: sources of `(image, label)`, decoding, augmentation and per-sample draws, loaders."""

from droppos.data.catalog import build_source, source_splits
from droppos.data.decode import BadImageError, LazyImage, load_image
from droppos.data.loader import ResumableSampler, build_loader, set_epoch
from droppos.data.pipeline import AugmentedDataset, SampleContext, sample_seed, seeded_cpu_rngs
from droppos.data.sources import (
    FASHION_MNIST_CLASSES,
    DemoDataset,
    FashionMNISTDataset,
    FileListDataset,
    ImageFolderDataset,
    ImageSource,
    read_idx,
)
from droppos.data.transforms import (
    default_mean_std,
    eval_transform,
    finetune_transform,
    pretrain_transform,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "AugmentedDataset",
    "BadImageError",
    "DemoDataset",
    "FashionMNISTDataset",
    "FileListDataset",
    "ImageFolderDataset",
    "ImageSource",
    "LazyImage",
    "ResumableSampler",
    "SampleContext",
    "build_loader",
    "build_source",
    "default_mean_std",
    "eval_transform",
    "finetune_transform",
    "load_image",
    "pretrain_transform",
    "read_idx",
    "sample_seed",
    "seeded_cpu_rngs",
    "set_epoch",
    "source_splits",
]
