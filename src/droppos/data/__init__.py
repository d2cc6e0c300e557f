"""Data: datasets of ``(PIL.Image, label)``, the transforms, and resumable loaders."""

from droppos.data.datasets import (
    FASHION_MNIST_CLASSES,
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
    "DemoDataset",
    "FashionMNISTDataset",
    "FileListDataset",
    "ImageFolderDataset",
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
    "sample_seed",
    "seeded_cpu_rngs",
    "set_epoch",
]
