"""Data: datasets of ``(PIL.Image, label)``, the transforms, and resumable loaders."""

from droppos.data.bad_images import ReplaceBadImages, replaced_images
from droppos.data.datasets import (
    FASHION_MNIST_CLASSES,
    BadImageError,
    DemoDataset,
    FashionMNISTDataset,
    FileListDataset,
    ImageFolderDataset,
    build_dataset,
    load_image,
    read_idx,
)
from droppos.data.loader import ResumableSampler, build_loader, dist_world, set_epoch
from droppos.data.transforms import (
    AugmentedDataset,
    default_mean_std,
    eval_transform,
    finetune_transform,
    pretrain_transform,
    sample_seed,
    seeded_cpu_rngs,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "AugmentedDataset",
    "BadImageError",
    "DemoDataset",
    "FashionMNISTDataset",
    "FileListDataset",
    "ImageFolderDataset",
    "ReplaceBadImages",
    "ResumableSampler",
    "build_dataset",
    "build_loader",
    "default_mean_std",
    "dist_world",
    "eval_transform",
    "finetune_transform",
    "load_image",
    "pretrain_transform",
    "read_idx",
    "replaced_images",
    "sample_seed",
    "seeded_cpu_rngs",
    "set_epoch",
]
