"""The linear segmentation head on a ViT's patch tokens, and its training on cached features.

DINOv2's linear evaluation: the patch tokens of the last block (or of the last N blocks
concatenated), each through the final norm, go through BatchNorm and a 1x1 linear classifier;
the class logits are upsampled bilinearly to the label resolution. On a frozen backbone the
features are cached once and every learning rate of a sweep trains side by side on the same
batches; `SegmentationModel` is the same head on a backbone that trains with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from tqdm import tqdm

from droppos.data.segmentation import IGNORE
from droppos.engine.logging import MetricWriter
from droppos.engine.optim import lr_at_step
from droppos.evaluation.metrics import confusion_matrix


@dataclass
class ProbeHeadSection:
    """The frozen linear head's training on cached features: AdamW, warmup, half-cosine."""

    lrs: list[float] = field(default_factory=lambda: [1e-2, 3e-2, 1e-1])
    """Learning rates trained side by side on the same cached features; the best on the val
    split is reported, with all of them."""
    epochs: int = 10
    """Passes over the cached training features."""
    batch_size: int = 64
    """Images per step."""
    weight_decay: float = 1e-4
    """AdamW weight decay of the 1x1 classifier."""

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--probe.epochs and --probe.batch_size must be >= 1")
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"--probe.lrs needs positive learning rates, got {self.lrs}")
        if self.weight_decay < 0:
            raise ValueError(f"--probe.weight_decay must be >= 0, got {self.weight_decay}")


def patch_tokens(vit: nn.Module, images: torch.Tensor, blocks: int) -> torch.Tensor:
    """images [N, C, H, W] -> the patch tokens of the last `blocks` blocks of a timm ViT, each
    through its final norm, concatenated: [N, blocks x D, H/p, W/p]."""
    found = vit.forward_intermediates(  # type: ignore[operator]
        images, indices=blocks, norm=True, output_fmt="NCHW", intermediates_only=True
    )
    return torch.cat(found, dim=1)


class PatchFeatures(nn.Module):
    """A frozen ViT as a dense feature extractor (see `patch_tokens`)."""

    def __init__(self, vit: nn.Module, blocks: int) -> None:
        super().__init__()
        self.vit, self.blocks = vit, min(blocks, len(vit.blocks))  # type: ignore[arg-type]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.vit, images, self.blocks)


class LinearSegmentationHead(nn.Module):
    """Patch features [N, D, h, w] -> class logits [N, C, h, w]: BatchNorm, then a 1x1 linear
    classifier per patch (DINOv2's linear head)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.classify = nn.Conv2d(dim, num_classes, kernel_size=1)
        trunc_normal_(self.classify.weight, std=0.01)
        nn.init.zeros_(self.classify.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(features))


def upsampled(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Patch logits [N, C, h, w] -> pixel logits [N, C, size, size]: bilinear interpolation
    (`F.interpolate`'s, align_corners=False) as two small matrix products, which on a CPU run
    four to five times faster than the interpolation kernel, backward included."""
    rows = interpolation_matrix(logits.shape[-2], size, logits.device, logits.dtype)
    columns = interpolation_matrix(logits.shape[-1], size, logits.device, logits.dtype)
    return rows @ logits @ columns.T


@functools.cache
def interpolation_matrix(
    length: int, size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """[size, length]: row i holds the weights linear interpolation gives output i."""
    identity = torch.eye(length, dtype=torch.float64)[None]
    weights = F.interpolate(identity, size=size, mode="linear", align_corners=False)[0].T
    return weights.to(device=device, dtype=dtype).contiguous()


class SegmentationModel(nn.Module):
    """A ViT and a linear head trained together: images [N, C, S, S] -> logits [N, K, S, S]."""

    def __init__(self, vit: nn.Module, blocks: int, num_classes: int) -> None:
        super().__init__()
        self.vit, self.blocks = vit, min(blocks, len(vit.blocks))  # type: ignore[arg-type]
        dim = vit.embed_dim * self.blocks  # type: ignore[operator]
        self.head = LinearSegmentationHead(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return upsampled(self.head(patch_tokens(self.vit, images, self.blocks)), images.shape[-1])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}  # type: ignore[operator]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-wise lr decay's groups (timm's ViT groups under `vit.`; the head is last)."""
        return {
            "stem": r"^vit\.(?:cls_token|pos_embed|patch_embed|reg_token)",
            "blocks": [(r"^vit\.blocks\.(\d+)", None), (r"^(?:vit\.norm|head\.)", (99999,))],
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)  # type: ignore[operator]


@dataclass
class DenseFeatures:
    """One split's cached patch features [N, D, h, w] and masks [N, S, S] (uint8), in order."""

    features: torch.Tensor
    masks: torch.Tensor


def train_probe_heads(
    train: DenseFeatures, num_classes: int, section: ProbeHeadSection, seed: int,
    progress: bool = False, writer: MetricWriter | None = None,
) -> list[LinearSegmentationHead]:  # fmt: skip
    """One head per lr of `section.lrs`, all from the same init, trained side by side on the
    same mini-batches of cached features (AdamW, one epoch of warmup, half-cosine)."""
    features, masks = train.features, train.masks
    device, count, size = features.device, len(features), masks.shape[-1]
    heads = []
    for _ in section.lrs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads.append(LinearSegmentationHead(features.shape[1], num_classes).to(device))
    groups = [
        {"params": list(head.parameters()), "lr": lr, "peak_lr": lr}
        for head, lr in zip(heads, section.lrs)
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=section.weight_decay)
    batch = min(section.batch_size, count)
    steps_per_epoch = count // batch  # the ragged end is dropped: BatchNorm needs company
    total, generator, step = (
        section.epochs * steps_per_epoch,
        torch.Generator().manual_seed(seed),
        0,
    )
    for epoch in tqdm(
        range(section.epochs), desc="linear heads", disable=not progress, leave=False
    ):
        for head in heads:
            head.train()
        order = torch.randperm(count, generator=generator).to(device)
        losses = torch.zeros(len(heads), device=device)
        for i in range(steps_per_epoch):
            index = order[i * batch : (i + 1) * batch]
            x, y = features[index].float(), masks[index].long()
            for group in optimizer.param_groups:
                group["lr"] = lr_at_step(step, total, steps_per_epoch, group["peak_lr"])
            each = torch.stack(
                [F.cross_entropy(upsampled(h(x), size), y, ignore_index=IGNORE) for h in heads]
            )
            optimizer.zero_grad(set_to_none=True)
            each.sum().backward()  # heads are independent: each gets its own gradient
            optimizer.step()
            losses += each.detach()
            step += 1
        if writer is not None:
            means = (losses / max(steps_per_epoch, 1)).tolist()
            record = {f"loss_lr_{lr:g}": loss for lr, loss in zip(section.lrs, means)}
            writer.write("probe_epoch", epoch + 1, record)
    return heads


@torch.inference_mode()
def head_confusion(
    head: nn.Module, val: DenseFeatures, num_classes: int, batch: int
) -> torch.Tensor:
    head.eval()
    size, confusion = val.masks.shape[-1], None
    for start in range(0, len(val.features), batch):
        x = val.features[start : start + batch].float()
        predicted = upsampled(head(x), size).argmax(1)
        found = confusion_matrix(predicted, val.masks[start : start + batch], num_classes)
        confusion = found if confusion is None else confusion + found
    return confusion  # type: ignore[return-value]
