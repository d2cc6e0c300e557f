"""Frozen features, extracted once: batched, under inference_mode and autocast.

The model is a `build_vit(..., num_classes=0)` feature extractor, so its output is already the
pooled feature ([CLS] or mean of patch tokens). Under torchrun each rank reads every
world-size-th image and the shards are gathered back in dataset order, so every rank ends up
with all the features and the probes need no communication at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from droppos.engine import context as run_context
from droppos.engine.collectives import gather_interleaved, world_and_rank
from droppos.engine.context import RunContext
from droppos.engine.logging import write_config
from droppos.engine.precision import autocast
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.datasets import (
    EvalDataSection,
    eval_view,
    inference_batches,
    labelled_splits,
)
from droppos.evaluation.report import write_results
from droppos.interop.backbone import Backbone, build_vit

POOLS = {"cls": "token", "avg": "avg"}  # our option -> timm's global_pool


@dataclass
class FeatureBackboneSection(BackboneSection):
    """Which weights, and which of their outputs the frozen-feature evaluations read."""

    feature: Literal["cls", "avg", "cls+avg"] = "avg"
    """avg: the mean of the patch tokens (the default: DropPos trains the patch tokens, and
    benchmarks/STUDY.md finds it ahead of [CLS]); cls: the final-norm [CLS] token (MAE's
    linear probe, which the ImageNet presets keep); cls+avg: both, from each of the last
    feature_blocks blocks, concatenated (the DINO / DINOv2 linear evaluation)."""
    feature_blocks: int = 4
    """cls+avg: how many of the last blocks give their [CLS] and mean patch token (each
    through the final norm; DINO reads 4 for ViT-S/16); at most the encoder's depth."""

    def validate(self) -> None:
        super().validate()
        if self.feature_blocks < 1:
            raise ValueError(f"--model.feature_blocks must be >= 1, got {self.feature_blocks}")


class LastBlocksFeatures(nn.Module):
    """The DINO / DINOv2 linear-evaluation feature of a timm ViT: for each of its last `blocks`
    blocks, the [CLS] token and the mean of the patch tokens, both through the final norm,
    concatenated ([N, 2 x blocks x D]). Richer than one token, and still a frozen feature."""

    def __init__(self, vit: nn.Module, blocks: int) -> None:
        super().__init__()
        self.vit, self.blocks = vit, min(blocks, len(vit.blocks))  # type: ignore[arg-type]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        found = self.vit.forward_intermediates(  # type: ignore[operator]
            images, indices=self.blocks, return_prefix_tokens=True, norm=True,
            output_fmt="NLC", intermediates_only=True,
        )  # fmt: skip
        parts = []
        for patches, prefix in found:
            parts += [prefix[:, 0], patches.mean(dim=1)]
        return torch.cat(parts, dim=-1)


def feature_extractor(backbone: Backbone, model: FeatureBackboneSection) -> nn.Module:
    """The frozen model whose output is the feature `--model.feature` names."""
    if model.feature == "cls+avg":
        vit = build_vit(backbone, num_classes=0, global_pool="token")  # keeps the final norm
        return LastBlocksFeatures(vit, model.feature_blocks)
    return build_vit(backbone, num_classes=0, global_pool=POOLS[model.feature])


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    data: EvalDataSection,
    context: RunContext,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """dataset of (image tensor, label) -> features [N, D] (fp32) and labels [N], on the
    context's device."""
    world, rank = world_and_rank()
    device = context.device
    shard = Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    model.eval()
    features, labels = [], []
    for images, targets in inference_batches(shard, data, context, desc):
        with autocast(device, context.precision):
            output = model(images)
        features.append(output.float())
        labels.append(torch.as_tensor(targets).to(device))
    total = len(dataset)  # type: ignore[arg-type]
    return gather_interleaved(torch.cat(features), total), gather_interleaved(
        torch.cat(labels), total
    )


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
    context: RunContext,
    check_train_size: Callable[[int], None] | None = None,
) -> FrozenFeatures:
    """Load the backbone named by `--model.*` and extract both splits' features once.

    User mistakes (missing or foreign checkpoint, unlabelled data, an option the training split
    is too small for: `check_train_size`) raise ValueError or FileNotFoundError before any image
    is read.
    """
    backbone = backbone_from(model)
    splits = labelled_splits(data)
    if check_train_size is not None:
        check_train_size(len(splits.train))
    extractor = feature_extractor(backbone, model).to(context.device)
    started = time.perf_counter()
    extracted = [
        extract_features(extractor, view, data, context, f"{name} features")
        for name, view in (
            ("train", eval_view(splits.train, data, backbone)),
            ("val", eval_view(splits.val, data, backbone)),
        )
    ]
    return FrozenFeatures(
        *extracted[0],
        *extracted[1],
        num_classes=splits.num_classes,
        backbone=backbone,
        seconds=time.perf_counter() - started,
    )


def evaluate_frozen_features(
    config: Any,
    command: str,
    score: Callable[[FrozenFeatures, bool], dict[str, Any]],
    check_train_size: Callable[[int], None] | None = None,
) -> tuple[FrozenFeatures, dict[str, Any], Path] | None:
    """What `knn` and `linprobe` do around their own scoring: validate, start, extract both
    splits' features once (sharded over ranks), `score(features, progress)`, and write
    config.yaml and results.json. Returns (features, results, results path) on the main
    process, None on the others."""
    config.validate()
    context = run_context.start(config.run, command)
    features = frozen_features(config.model, config.data, context, check_train_size)
    results = score(features, context.progress)
    if not context.is_main:
        return None
    write_config(config, config.run.output_dir)
    written = write_results(config.run.output_dir, command, results, context.precision)
    return features, results, written
