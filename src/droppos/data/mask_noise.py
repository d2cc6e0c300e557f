"""Mask noise drawn in the data loader, per sample, from (seed, epoch, index).

Building the masks' randomness here rather than in the training step takes it off the hot path,
and makes it independent of batch composition: one process on a global batch and N DDP ranks on
its shards mask each image identically, and a resumed run masks exactly as an unbroken one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from droppos.data.transforms import sample_seed

NOISE_STREAM = 0x6D61736B  # keeps mask noise independent of the augmentation stream


class MaskNoiseDataset(Dataset):
    """Items of an AugmentedDataset (or a wrapper with its seed and epoch) plus their mask noise:
    `(image, label, patch_noise [L], position_noise [V])`."""

    def __init__(self, dataset: Dataset, num_patches: int, num_visible: int) -> None:
        self.dataset = dataset
        self.num_patches = num_patches
        self.num_visible = num_visible

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        seed = sample_seed(self.dataset.seed ^ NOISE_STREAM, self.dataset.epoch, index)
        generator = torch.Generator().manual_seed(seed)
        patch_noise = torch.rand(self.num_patches, generator=generator)
        position_noise = torch.rand(self.num_visible, generator=generator)
        return image, label, patch_noise, position_noise
