"""Frozen features, extracted once: batched, under inference_mode and autocast.

The model is a `build_vit(..., num_classes=0)` feature extractor, so its output is already the
pooled feature ([CLS] or mean of patch tokens). Under torchrun each rank reads every
world-size-th image and the shards are gathered back in dataset order, so every rank ends up
with all the features and the probes need no communication at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from droppos.data import build_loader, dist_world
from droppos.engine.precision import autocast
from droppos.evaluation.backbone import backbone_from
from droppos.evaluation.config import EvalDataSection, FeatureBackboneSection
from droppos.evaluation.datasets import eval_view, labelled_splits
from droppos.interop.checkpoints import Backbone, build_vit

POOLS = {"cls": "token", "avg": "avg"}  # our option -> timm's global_pool


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """dataset of (image tensor, label) -> features [N, D] (fp32) and labels [N], on `device`."""
    world, rank = dist_world()
    shard = Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    loader = build_loader(
        shard, batch_size, shuffle=False, num_workers=num_workers, device_type=device.type
    )
    model.eval()
    features, labels = [], []
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with autocast(device, precision):
            output = model(images.to(device, non_blocking=True))
        features.append(output.float())
        labels.append(torch.as_tensor(targets).to(device))
    local = torch.cat(features), torch.cat(labels)
    if world == 1:
        return local
    return tuple(gather_interleaved(t, len(dataset), world) for t in local)  # type: ignore[return-value]


def gather_interleaved(shard: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Rank r's row i is sample i * world + r: all-gather padded shards, re-interleave, trim."""
    rows = -(-total // world)
    padded = shard.new_zeros((rows, *shard.shape[1:]))
    padded[: len(shard)] = shard
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]


@dataclass
class FrozenFeatures:
    """Both splits' features and labels (on the compute device), and where they came from."""

    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    backbone: Backbone
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "checkpoint": self.backbone.source,
            "checkpoint_kind": self.backbone.kind,
            "feature_dim": self.train_features.shape[1],
            "train_size": len(self.train_labels),
            "val_size": len(self.val_labels),
            "num_classes": self.num_classes,
            "feature_seconds": round(self.seconds, 2),
        }


def frozen_features(
    model: FeatureBackboneSection,
    data: EvalDataSection,
    device: torch.device,
    precision: str,
    progress: bool = False,
) -> FrozenFeatures:
    """Load the backbone named by `--model.*` and extract both splits' features once.

    User mistakes (missing or foreign checkpoint, unlabelled data) raise ValueError or
    FileNotFoundError before any image is read.
    """
    backbone = backbone_from(model)
    splits = labelled_splits(data)
    extractor = build_vit(backbone, num_classes=0, global_pool=POOLS[model.feature]).to(device)
    started = time.perf_counter()
    extracted = [
        extract_features(
            extractor,
            eval_view(split, data, backbone),
            data.batch_size,
            device,
            precision,
            data.num_workers,
            progress,
            desc=f"{name} features",
        )
        for name, split in (("train", splits.train), ("val", splits.val))
    ]
    return FrozenFeatures(
        *extracted[0],
        *extracted[1],
        num_classes=splits.num_classes,
        backbone=backbone,
        seconds=time.perf_counter() - started,
    )
