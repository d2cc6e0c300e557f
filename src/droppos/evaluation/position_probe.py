"""How well does a frozen ViT know where its patches are? The paper's position probe.

Every patch of an image is encoded, but a ratio of them (0.75 by default) enter without their
positional embedding (nothing is added in its place: not every backbone has a mask token). A
linear classifier is then trained on the final features of those patches to name their grid
cell, and scored on held-out images: top-1, within one cell (the 3 x 3 neighbourhood), and the
mean grid distance of its mistakes. With ratio 0 every patch keeps its embedding and all are
probed: how much of the position survives the network. Features are extracted once; the probe
trains with several seeds on them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import Dataset, Subset

from droppos.data.catalog import build_source
from droppos.engine import context as run_context
from droppos.engine.collectives import computed_by_rank0, world_and_rank
from droppos.engine.context import RunContext
from droppos.engine.logging import write_config
from droppos.engine.precision import autocast
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.datasets import (
    EvalDataSection,
    EvaluationConfig,
    eval_view,
    inference_batches,
)
from droppos.evaluation.report import RESULTS, write_results
from droppos.interop.backbone import Backbone, build_vit
from droppos.sections import RunSection


@dataclass
class PositionProbeSection:
    """The position probe: which patches lose their position, and the linear classifier."""

    drop_ratio: float = 0.75
    """Fraction of each image's patches encoded without their positional embedding (and
    probed); 0 probes every patch with its embedding, 1 drops them all."""
    seeds: int = 3
    """Probes trained on the same features with different seeds (mean and std reported)."""
    epochs: int = 30
    """Passes over the cached patch features."""
    batch_size: int = 1024
    """Patch features per probe step."""
    lr: float = 1e-3
    """AdamW learning rate (cosine to zero)."""
    weight_decay: float = 1e-4
    """AdamW weight decay of the probe."""
    holdout: float = 0.2
    """Share of the images held out for scoring when the source has no val split."""
    max_train_images: int = 10000
    """At most this many training images (a fixed random subset)."""
    max_val_images: int = 2000
    """At most this many held-out images."""

    def validate(self) -> None:
        if not 0 <= self.drop_ratio <= 1:
            raise ValueError(f"--probe.drop_ratio must be in [0, 1], got {self.drop_ratio}")
        counts = (self.seeds, self.epochs, self.batch_size, self.max_train_images)
        if min(*counts, self.max_val_images) < 1:
            raise ValueError(
                "--probe.seeds, epochs, batch_size, max_train_images and max_val_images must "
                "be >= 1"
            )
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.holdout < 1:
            raise ValueError(
                "--probe.lr must be > 0, --probe.weight_decay >= 0, --probe.holdout in (0, 1)"
            )


@dataclass
class PositionProbeConfig(EvaluationConfig):
    """Measure how well a frozen backbone knows where its patches are."""

    model: BackboneSection = field(default_factory=BackboneSection)
    probe: PositionProbeSection = field(default_factory=PositionProbeSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/probe-position"))


def vit_patch_tokens(
    vit: VisionTransformer,
    images: torch.Tensor,
    keep_position: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """images [N, C, H, W] -> all final-norm tokens [N, 1+L, D] of a timm ViT, with surgery.

    keep_position [N, L] bool: False = that patch gets no positional embedding.
    order [N, L]: patch i takes the content of patch order[i] (before positions are added), a
    jigsaw at patch granularity.
    """
    if vit.num_prefix_tokens != 1 or vit.no_embed_class or vit.pos_embed is None:
        raise ValueError("expected a timm ViT with a [CLS] token and a learned/fixed pos_embed")
    x = vit.patch_embed(images)
    if order is not None:
        x = torch.gather(x, 1, order[..., None].expand_as(x))
    positions = vit.pos_embed[:, 1:]
    if keep_position is not None:
        positions = positions * keep_position[..., None].to(positions.dtype)
    x = x + positions
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = vit.norm_pre(torch.cat([cls.to(x.dtype), x], dim=1))
    return vit.norm(vit.blocks(x))


def drop_masks(count: int, num_patches: int, ratio: float, seed: int) -> torch.Tensor:
    """[count, L] bool, True = position dropped: round(L * ratio) patches per image, chosen by
    a seeded generator (the same for every backbone, so their scores compare)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, num_patches, generator=generator)
    dropped = round(num_patches * ratio)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < dropped


@dataclass
class PatchFeatures:
    """The probed patches of a split: features [M, D] and true grid cells [M]."""

    features: torch.Tensor
    positions: torch.Tensor


@torch.inference_mode()
def probed_patch_features(
    vit: VisionTransformer,
    dataset: Dataset,
    drop_ratio: float,
    seed: int,
    data: EvalDataSection,
    context: RunContext,
    desc: str = "features",
) -> PatchFeatures:
    """Encode every image with its drop mask; keep the dropped patches (all when ratio 0)."""
    device = context.device
    num_patches = vit.patch_embed.num_patches
    masks = drop_masks(len(dataset), num_patches, drop_ratio, seed)  # type: ignore[arg-type]
    vit.eval()
    features, positions, start = [], [], 0
    cells = torch.arange(num_patches, device=device)
    for images, _ in inference_batches(dataset, data, context, desc):
        dropped = masks[start : start + len(images)].to(device)
        start += len(images)
        with autocast(device, context.precision):
            tokens = vit_patch_tokens(vit, images, keep_position=~dropped)[:, 1:]
        probed = dropped if drop_ratio > 0 else torch.ones_like(dropped)
        features.append(tokens.float()[probed])
        positions.append(cells.expand_as(probed)[probed])
    return PatchFeatures(torch.cat(features), torch.cat(positions))


def position_scores(
    logits: torch.Tensor, positions: torch.Tensor, grid_size: tuple[int, int]
) -> dict[str, float]:
    """Top-1, within one cell (Chebyshev distance <= 1) and the mean Euclidean grid distance
    of the errors (0 when there are none)."""
    width = grid_size[1]
    predicted = logits.argmax(dim=1)
    dy = (predicted // width - positions // width).float()
    dx = (predicted % width - positions % width).float()
    wrong = predicted != positions
    distance = torch.sqrt(dy.square() + dx.square())
    return {
        "top1": float((~wrong).float().mean() * 100),
        "within_one_cell": float((torch.maximum(dy.abs(), dx.abs()) <= 1).float().mean() * 100),
        "mean_error_distance": float(distance[wrong].mean()) if wrong.any() else 0.0,
    }


def train_position_probe(
    train: PatchFeatures,
    val: PatchFeatures,
    num_positions: int,
    grid_size: tuple[int, int],
    section: PositionProbeSection,
    seed: int,
) -> dict[str, float]:
    """One linear probe (features standardised with the training statistics, AdamW, cosine)."""
    torch.manual_seed(seed)
    device = train.features.device
    mean = train.features.mean(dim=0)
    std = train.features.std(dim=0).clamp_min(1e-6)
    probe = nn.Linear(train.features.shape[1], num_positions).to(device)
    optimizer = torch.optim.AdamW(
        probe.parameters(), lr=section.lr, weight_decay=section.weight_decay
    )
    steps_per_epoch = math.ceil(len(train.positions) / section.batch_size)
    total = section.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(section.epochs):
        order = torch.randperm(len(train.positions), generator=generator).to(device)
        for batch in order.split(section.batch_size):
            inputs = (train.features[batch] - mean) / std
            loss = F.cross_entropy(probe(inputs), train.positions[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        logits = probe((val.features - mean) / std)
    return position_scores(logits, val.positions, grid_size)


def probe_splits(config: PositionProbeConfig) -> tuple[Dataset, Dataset]:
    """Train and held-out images of `--data.source` (labels are not needed). A source with no
    separate val split is split itself (`--probe.holdout`); both are capped in size."""
    data, probe = config.data, config.probe
    train = build_source(data.source, "train", data.max_image_pixels, share=computed_by_rank0)
    val = build_source(data.source, "val", data.max_image_pixels, share=computed_by_rank0)
    generator = torch.Generator().manual_seed(config.run.seed)
    if train.origin == val.origin:  # one set of images read as both: split it
        order = torch.randperm(len(train), generator=generator).tolist()  # type: ignore[arg-type]
        cut = max(1, int(len(order) * probe.holdout))
        train, val = Subset(train, order[cut:]), Subset(val, order[:cut])

    def capped(dataset: Dataset, limit: int) -> Dataset:
        if len(dataset) <= limit:  # type: ignore[arg-type]
            return dataset
        picked = torch.randperm(len(dataset), generator=generator)[:limit]  # type: ignore[arg-type]
        return Subset(dataset, sorted(picked.tolist()))

    return capped(train, probe.max_train_images), capped(val, probe.max_val_images)


def run_position_probe(
    config: PositionProbeConfig,
    backbone: Backbone,
    vit: VisionTransformer,
    context: RunContext,
) -> dict[str, Any]:
    """Extract both splits' probed patches once, train one probe per seed, report."""
    probe = config.probe
    train_set, val_set = probe_splits(config)
    started = time.perf_counter()
    splits = [
        probed_patch_features(
            vit,
            eval_view(dataset, config.data, backbone),
            probe.drop_ratio,
            config.run.seed + offset,
            config.data,
            context,
            desc=f"{name} patch features",
        )
        for offset, (name, dataset) in enumerate((("train", train_set), ("val", val_set)))
    ]
    feature_seconds = time.perf_counter() - started
    grid = backbone.encoder.grid_size
    runs = [
        train_position_probe(*splits, backbone.encoder.num_patches, grid, probe, seed)
        for seed in range(config.run.seed, config.run.seed + probe.seeds)
    ]
    summary: dict[str, Any] = {}
    for key in runs[0]:
        values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        summary[key] = round(float(values.mean()), 3)
        summary[f"{key}_std"] = round(float(values.std()) if len(runs) > 1 else 0.0, 3)
    return {
        **summary,
        "chance_top1": round(100 / backbone.encoder.num_patches, 3),
        "drop_ratio": probe.drop_ratio,
        "seeds": [r["top1"] for r in runs],
        "grid": list(grid),
        "train_images": len(train_set),  # type: ignore[arg-type]
        "val_images": len(val_set),  # type: ignore[arg-type]
        "train_patches": len(splits[0].positions),
        "val_patches": len(splits[1].positions),
        "checkpoint": backbone.source,
        "checkpoint_kind": backbone.kind,
        "feature_seconds": round(feature_seconds, 2),
        "probe_seconds": round(time.perf_counter() - started - feature_seconds, 2),
    }


def position_probe(config: PositionProbeConfig, context: RunContext) -> dict[str, Any]:
    """The programmatic twin of `droppos probe-position`: probes the backbone `config.model`
    names, writes results.json (from rank 0) and returns what it records."""
    config.validate()
    return _probe(config, context)


def _probe(config: PositionProbeConfig, context: RunContext) -> dict[str, Any]:
    backbone = backbone_from(config.model)
    vit = build_vit(backbone, num_classes=0).to(context.device)
    results = run_position_probe(config, backbone, vit, context)
    if world_and_rank()[1] == 0:
        write_results(config.run.output_dir, "probe-position", results, context.precision)
    return results


def run(config: PositionProbeConfig) -> str | None:
    """`droppos probe-position`: probe, write results.json, say the scores."""
    config.validate()
    context = run_context.start(config.run, "probe-position")
    if context.is_main:
        write_config(config, config.run.output_dir)
    results = _probe(config, context)
    if not context.is_main:
        return None
    path = Path(config.run.output_dir) / RESULTS
    return (
        f"position probe of {results['checkpoint']} ({results['drop_ratio']:g} of positions "
        f"dropped, {len(results['seeds'])} seeds): top-1 {results['top1']:.2f} +- "
        f"{results['top1_std']:.2f} (chance {results['chance_top1']:.2f}), within one cell "
        f"{results['within_one_cell']:.2f}, mean error distance "
        f"{results['mean_error_distance']:.2f} cells; {path}"
    )
