"""Unreadable images in a training set: replaced by a readable neighbour, warned about and counted.

A days-long pre-training run must not die at one truncated JPEG, yet a folder of mostly broken
files must not train silently either. `ReplaceBadImages` wraps the augmented dataset (so an
image that fails while decoding inside the transform is caught too) and gives index i the next
readable sample (i+1, i+2, ..., augmented as that index always is) in place of a bad one, so
batches keep their size and a resumed run sees exactly the same replacement. Workers count what
they replaced in a shared-memory tensor (one slot per worker, so no two processes write the same
memory), which the training loop reads to report the count and to stop a run whose bad fraction
passes `--data.max_bad_fraction`.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, get_worker_info

from droppos.data.datasets import BadImageError, DatasetWrapper

OnBadImage = Literal["skip", "fail"]
MAX_SLOTS = 256  # worker processes per rank that can count; more share the last slot
MAX_TRIES = 16  # consecutive bad files before the data source itself is suspect


class ReplaceBadImages(DatasetWrapper):
    """`dataset[i]`, or with `skip` the next readable item when it is unreadable."""

    def __init__(self, dataset: Dataset, policy: OnBadImage = "skip") -> None:
        if policy not in ("skip", "fail"):
            raise ValueError(f"--data.on_bad_image must be skip or fail, got {policy!r}")
        super().__init__(dataset)
        self.policy = policy
        self._counts = torch.zeros(MAX_SLOTS + 1, dtype=torch.int64).share_memory_()
        self._warned: set[str] = set()

    # The epoch API of an AugmentedDataset inside, for MaskNoiseDataset and set_epoch above.
    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    @property
    def seed(self) -> int:
        return self.dataset.seed  # type: ignore[attr-defined]

    @property
    def epoch(self) -> int:
        return self.dataset.epoch  # type: ignore[attr-defined]

    @property
    def replaced(self) -> int:
        """Bad images replaced so far, over every worker of this rank."""
        return int(self._counts.sum())

    def __getitem__(self, index: int) -> Any:
        size = len(self)
        for attempt in range(min(MAX_TRIES, size)):
            try:
                return self.dataset[(index + attempt) % size]
            except BadImageError as error:
                if self.policy == "fail":
                    raise BadImageError(
                        f"{error} (--data.on_bad_image fail; use skip to train past it)"
                    ) from None
                self._note(error)
        raise BadImageError(
            f"{MAX_TRIES} consecutive unreadable images from index {index}: is the data "
            "source the right folder?"
        )

    def _note(self, error: BadImageError) -> None:
        info = get_worker_info()
        slot = MAX_SLOTS if info is None else min(info.id, MAX_SLOTS - 1)
        self._counts[slot] += 1
        if error.path not in self._warned:
            self._warned.add(error.path)
            print(f"warning: skipping {error}; a neighbour image takes its place", file=sys.stderr)


def replaced_images(dataset: Dataset) -> int:
    """What the `ReplaceBadImages` inside `dataset` (wrapped or not) has replaced, else 0."""
    seen = 0
    while dataset is not None and seen < 16:
        if isinstance(dataset, ReplaceBadImages):
            return dataset.replaced
        dataset = getattr(dataset, "dataset", None)
        seen += 1
    return 0
