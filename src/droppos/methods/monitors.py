"""What the features are worth while pre-training runs: a kNN and a position probe.

A position pretext's loss says little about its features, so every `--run.monitor_every` epochs
(and after the last) the encoder is measured as the evaluations would measure it, on a small
fixed sample: a kNN top-1 on labelled held-out images (the source's val split, else a fixed
sample of its training split) and the top-1 of a linear position probe on the patches whose
positional embedding was dropped (0.75 of them). Both are cheap approximations of `droppos knn`
and `droppos probe-position` (fewer images; the probe is a closed-form ridge regression, not
an AdamW-trained layer), so compare a monitor with a monitor, not with those commands.

A monitor never changes training: it runs without gradient in eval mode, draws nothing from the
generators training uses (every random state is restored), and reads images through its own
loader. Under torchrun each rank extracts its share of the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from droppos.data.pipeline import AugmentedDataset
from droppos.data.transforms import eval_transform, mean_std
from droppos.engine.collectives import world_and_rank
from droppos.engine.context import RunContext
from droppos.engine.strategy import Strategy
from droppos.evaluation.datasets import EvalDataSection, labelled_splits
from droppos.evaluation.features import extract_features
from droppos.evaluation.knn import knn_accuracy
from droppos.evaluation.position_probe import drop_masks

BANK, QUERIES, PROBE_IMAGES = 2000, 1000, 500  # images: kNN bank and queries, probe per split
DROP_RATIO, RIDGE = 0.75, 1e-2


def evenly(pool: list[int], most: int) -> list[int]:
    """At most `most` of `pool`, spread evenly over it: a fixed sample, no generator."""
    if len(pool) <= most:
        return list(pool)
    return [pool[i * len(pool) // most] for i in range(most)]


class _Pooled(nn.Module):
    """The encoder's mean final-norm patch token (what `knn` reads by default)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(images)[:, 1:].mean(dim=1)


class _DroppedTokens(nn.Module):
    """Final-norm patch tokens [N, L, D] with the positional embedding of `dropped` [N, L]
    patches left out (the images come in dataset order, `start` counts them)."""

    def __init__(self, encoder: nn.Module, dropped: torch.Tensor) -> None:
        super().__init__()
        world, rank = world_and_rank()  # this rank extracts samples rank, rank + world, ...
        self.encoder, self.dropped, self.start = encoder, dropped[rank::world], 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        keep = ~self.dropped[self.start : self.start + len(images)].to(images.device)
        self.start += len(images)
        positions = encoder.pos_embed[:, 1:] * keep[..., None].to(encoder.pos_embed.dtype)
        return encoder.run_blocks(encoder.embed_patches(images) + positions)[:, 1:]


@dataclass
class Monitors:
    """The monitors of one pre-training run (built once; `measure` at an epoch's end)."""

    splits: Any
    pools: tuple[list[int], list[int]]
    """The indices of the training and the held-out split the samples are drawn from."""
    data: EvalDataSection
    context: RunContext
    img_size: Any
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_run(cls, config: Any, context: RunContext) -> Monitors | None:
        """None, with a one-line note, when the source has no labels to monitor with."""
        data = config.data
        section = EvalDataSection(
            source=data.source, num_workers=0, batch_size=256, mean=data.mean, std=data.std,
            max_image_pixels=data.max_image_pixels, timeout=data.timeout,
        )  # fmt: skip
        try:
            splits = labelled_splits(section, val_may_be_train=True)
        except ValueError as error:
            context.say(f"note: no monitors ({error})")
            return None
        encoder = config.model.encoder
        mean, std = mean_std(encoder.in_chans, data.mean, data.std)
        train, val = range(len(splits.train)), range(len(splits.val))
        origin = getattr(splits.train, "origin", None)
        if origin is not None and origin == getattr(splits.val, "origin", None):
            # No held-out split: the training images, halved (even ones for the bank).
            train, val = train[::2], val[1::2]
        pools = (list(train), list(val))
        return cls(splits, pools, section, context, encoder.img_size, encoder.in_chans, mean, std)

    def view(self, dataset: Any, indices: list[int]) -> AugmentedDataset:
        """The evaluation view of `indices`; an unreadable image gives way to its neighbour
        (a monitor is no reason to stop a run)."""
        transform = eval_transform(self.img_size, self.in_chans, self.mean, self.std)
        return AugmentedDataset(Subset(dataset, indices), transform, on_bad_image="skip")

    @torch.no_grad()
    def measure(self, encoder: nn.Module, strategy: Strategy) -> dict[str, float]:
        """{"monitor_knn_top1", "monitor_position_top1"} (%) of `encoder` as it is now (the
        strategy hands it over whole: the monitors call its parts, not its forward)."""
        devices = [self.context.device] if self.context.device.type == "cuda" else []
        was_training = encoder.training
        with torch.random.fork_rng(devices=devices), strategy.gathered(encoder) as whole:
            try:
                whole.eval()
                return {**self._knn(whole), **self._position_probe(whole)}
            finally:
                whole.train(was_training)

    def _knn(self, encoder: nn.Module) -> dict[str, float]:
        train, val = self.splits.train, self.splits.val
        pooled = _Pooled(encoder)
        bank = extract_features(pooled, self.view(train, evenly(self.pools[0], BANK)), self.data,
                                self.context, "monitor bank")  # fmt: skip
        queries = extract_features(pooled, self.view(val, evenly(self.pools[1], QUERIES)),
                                   self.data, self.context, "monitor queries")  # fmt: skip
        found = knn_accuracy(*bank, *queries, self.splits.num_classes)
        return {"monitor_knn_top1": found["top1"]}

    def _position_probe(self, encoder: nn.Module) -> dict[str, float]:
        length = encoder.num_patches
        fitted: list[tuple[torch.Tensor, torch.Tensor]] = []
        for seed, (dataset, pool) in enumerate(
            zip((self.splits.train, self.splits.val), self.pools)
        ):
            indices = evenly(pool, PROBE_IMAGES)
            dropped = drop_masks(len(indices), length, DROP_RATIO, seed)
            tokens, _ = extract_features(_DroppedTokens(encoder, dropped),
                                         self.view(dataset, indices), self.data, self.context,
                                         "monitor patches")  # fmt: skip
            cells = torch.arange(length, device=tokens.device).expand(len(indices), -1)
            picked = dropped.to(tokens.device)
            fitted.append((tokens[picked].double(), cells[picked]))
        (x, y), (x_val, y_val) = fitted
        mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
        x, x_val = (x - mean) / std, (x_val - mean) / std
        targets = torch.nn.functional.one_hot(y, length).double()
        gram = x.T @ x + RIDGE * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        weights = torch.linalg.solve(gram, x.T @ targets)
        top1 = (x_val @ weights).argmax(dim=1).eq(y_val).double().mean() * 100
        return {"monitor_position_top1": float(top1)}
