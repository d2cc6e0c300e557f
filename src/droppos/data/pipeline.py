"""From a source to training samples: seeded augmentation, per-sample draws, bad-image skipping.

Everything random about a sample is a pure function of its `SampleContext` (seed, epoch, index):
the augmentation, and whatever else a method draws per sample (`extras`, e.g. its mask noise).
So a sample does not depend on the number of workers or ranks, or on whether the run was
interrupted and resumed. The epoch lives in a shared-memory tensor, so persistent loader workers
see `set_epoch` from the main process.

Unreadable images: with `on_bad_image="skip"`, index i takes the next readable sample (i+1,
i+2, ..., augmented as that index always is) in place of a bad one, so batches keep their size
and a resumed run sees exactly the same replacement; workers count what they replaced in a
shared-memory tensor (one slot per worker, so no two processes write the same memory), which the
training loop reads to report the count and to stop a run whose bad fraction passes
`--data.max_bad_fraction`. Without a policy a bad image raises, naming the file.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from droppos.data.decode import BadImageError

OnBadImage = Literal["skip", "fail"]
T = TypeVar("T")
MAX_SLOTS = 256  # worker processes per rank that can count; more share the last slot
MAX_TRIES = 16  # consecutive bad files before the data source itself is suspect


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch, index): nearby triples share no streams."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, index])
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded_cpu_rngs(seed: int, torch_only: bool = False) -> Iterator[None]:
    """Seed torch's CPU generator (and, unless `torch_only`, `random` and numpy's global RNG,
    which timm's RandAugment draws from); restore them afterwards.

    Only the CPU generator: torch.manual_seed would also reseed CUDA, which would clobber the
    training process's own draws when the loader runs in the main process (num_workers=0).
    """
    py_state, np_state = (None, None) if torch_only else (random.getstate(), np.random.get_state())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            if not torch_only:
                random.seed(seed)
                np.random.seed(seed & 0xFFFFFFFF)
            yield
    finally:
        if not torch_only:
            random.setstate(py_state)
            np.random.set_state(np_state)


@dataclass(frozen=True)
class SampleContext:
    """Which sample, of which epoch, of which run: all a per-sample draw may depend on."""

    seed: int
    epoch: int
    index: int


class AugmentedDataset(Dataset):
    """`(transform(image), label, *extras)` of a source, each a function of its SampleContext.

    `transform` runs with the CPU generators seeded from (seed, epoch, index) (`torch_rng_only`:
    only torch's, for transforms that draw nothing else: a tenth of a millisecond per image);
    each of `extras` is called with the context of the *requested* index and returns tensors
    appended to the item. Call `set_epoch` before iterating a loader (`data/loader.py:set_epoch`
    does both hooks).
    """

    def __init__(
        self,
        source: Dataset,
        transform: Callable[[Any], Any],
        seed: int = 0,
        torch_rng_only: bool = False,
        on_bad_image: OnBadImage | None = None,
        extras: Sequence[Callable[[SampleContext], tuple[torch.Tensor, ...]]] = (),
    ) -> None:
        if on_bad_image not in (None, "skip", "fail"):
            raise ValueError(f"--data.on_bad_image must be skip or fail, got {on_bad_image!r}")
        self.source = source
        self.transform = transform
        self.seed = seed
        self.torch_rng_only = torch_rng_only
        self.on_bad_image = on_bad_image
        self.extras = tuple(extras)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._counts = torch.zeros(MAX_SLOTS + 1, dtype=torch.int64).share_memory_()
        self._warned: set[str] = set()

    @property
    def num_classes(self) -> int:
        return getattr(self.source, "num_classes", 0)

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.source, "classes", None)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def replaced(self) -> int:
        """Bad images replaced so far, over every worker of this rank."""
        return int(self._counts.sum())

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def augmented(self, index: int) -> tuple[Any, int]:
        """Sample `index` of the source, augmented as that index always is (a transform that
        `takes_context` also receives the sample's SampleContext)."""
        image, label = self.source[index]
        seed = sample_seed(self.seed, self.epoch, index)
        with seeded_cpu_rngs(seed, torch_only=self.torch_rng_only):
            if getattr(self.transform, "takes_context", False):
                return self.transform(image, SampleContext(self.seed, self.epoch, index)), label
            return self.transform(image), label

    def replacement(self, index: int, error: BadImageError, accept: Callable[[Any], T]) -> T:
        """For sample `index`, found unreadable after the loader (decoded on the device): what
        `__getitem__` does for a file unreadable in the worker. It is noted (counted, warned
        about), and the next neighbour (index+1, ...), augmented as its own index, that
        `accept` takes (it raises BadImageError for one it cannot use) comes instead."""
        if self.on_bad_image is None:
            raise error
        return self._first_readable(index, lambda item: accept(item[0]), error)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self._readable(index)
        if not self.extras:
            return item
        context = SampleContext(self.seed, self.epoch, index)
        return (*item, *(t for extra in self.extras for t in extra(context)))

    def _readable(self, index: int) -> tuple[Any, int]:
        if self.on_bad_image is None:
            return self.augmented(index)
        return self._first_readable(index, lambda item: item)

    def _first_readable(
        self, index: int, accept: Callable[[Any], T], error: BadImageError | None = None
    ) -> T:
        """`accept` of the first readable sample among index, index+1, ... (`error`: index's
        own failure, when it was met already), each failure noted or, with `fail`, raised."""
        size = len(self)
        for attempt in range(min(MAX_TRIES, size)):
            if attempt or error is None:
                try:
                    return accept(self.augmented((index + attempt) % size))
                except BadImageError as failed:
                    error = failed
            if self.on_bad_image == "fail":
                raise BadImageError(
                    f"{error} (--data.on_bad_image fail; use skip to train past it)"
                ) from None
            self._note(error, own=attempt == 0)
        raise BadImageError(
            f"{MAX_TRIES} consecutive unreadable images from index {index}: is the data "
            "source the right folder?"
        )

    def _note(self, error: BadImageError, own: bool) -> None:
        """Warn once per file; count a file only as its own index's failure (`own`), so that a
        bad file is counted once an epoch however many bad neighbours' indices reach it."""
        if own:
            info = get_worker_info()
            slot = MAX_SLOTS if info is None else min(info.id, MAX_SLOTS - 1)
            self._counts[slot] += 1
        if error.path not in self._warned:
            self._warned.add(error.path)
            print(f"warning: skipping {error}; a neighbour image takes its place", file=sys.stderr)
