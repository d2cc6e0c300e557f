"""Mask noise drawn in the data loader, per sample, from its SampleContext (seed, epoch, index).

Building the masks' randomness here rather than in the training step takes it off the hot path,
and makes it independent of batch composition: one process on a global batch and N DDP ranks on
its shards mask each image identically, and a resumed run masks exactly as an unbroken one. A
method says how many noise vectors it needs and how long each is (its `noise_shapes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from droppos.data.pipeline import SampleContext, sample_seed

NOISE_STREAM = 0x6D61736B  # keeps mask noise independent of the augmentation stream


class MaskNoise:
    """A sample's noise vectors, uniform in [0, 1), one per entry of `lengths`, drawn in order
    from one generator (a per-sample extra of `AugmentedDataset`)."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = tuple(int(n) for n in lengths)

    def __call__(self, context: SampleContext) -> tuple[torch.Tensor, ...]:
        seed = sample_seed(context.seed ^ NOISE_STREAM, context.epoch, context.index)
        generator = torch.Generator().manual_seed(seed)
        return tuple(torch.rand(n, generator=generator) for n in self.lengths)

    def __repr__(self) -> str:
        return f"MaskNoise({list(self.lengths)})"
