"""Data loading: a resumable distributed sampler and one ``build_loader`` for every command.

Together with ``AugmentedDataset`` this makes the stream of training batches a function of
(seed, epoch, batch) only: a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seed + epoch shuffle, padding or drop_last) that can resume mid-epoch.

    ``set_epoch(epoch, start_batch)`` skips the first ``start_batch * batch_size`` indices of
    this rank's share of the epoch: the batches a resumed run already trained on. The skip is
    one-shot per ``set_epoch`` call, so the next epoch starts from its beginning again. The
    replicas are given, never read from a process group: one replica serves one-GPU runs.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        batch_size: int = 1,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; skip ``start_batch`` per-rank batches already consumed."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        super().set_epoch(epoch)
        self.start_batch = start_batch

    @property
    def _skip(self) -> int:
        return min(self.start_batch * self.batch_size, self.num_samples)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self._skip :])

    def __len__(self) -> int:
        return self.num_samples - self._skip


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    replicas: tuple[int, int] = (1, 0),
    device_type: str = "cpu",
    prefetch_factor: int = 2,
    collate_fn: Any = None,
    timeout: float = 0.0,
) -> DataLoader:
    """A DataLoader over a ``ResumableSampler``; ``batch_size`` is per process.

    ``replicas`` = (number of shards, this rank's shard): each rank reads its own. Pinned
    memory only pays off for CUDA copies; persistent workers avoid re-forking every epoch.
    ``drop_last`` drops both the ragged tail across ranks and the last incomplete batch.
    Without it, evaluation under DDP pads with a few repeated samples, as DistributedSampler does.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = ResumableSampler(dataset, *replicas, shuffle, seed, drop_last, batch_size)
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=device_type == "cuda",
        drop_last=drop_last,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        timeout=timeout if workers else 0.0,  # a worker stuck on one batch stops the run
        # Fixes the workers' base seed too, for transforms not run under AugmentedDataset.
        generator=torch.Generator().manual_seed(seed),
    )


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """The per-epoch hook: reorder the sampler (skipping resumed batches) and re-seed augmentation.

    Call before ``iter(loader)``; ``len(loader)`` then counts only the batches still to come.
    """
    sampler = loader.sampler
    if isinstance(sampler, ResumableSampler):
        sampler.set_epoch(epoch, start_batch)
    elif start_batch:
        raise ValueError("start_batch needs a loader built with a ResumableSampler")
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
