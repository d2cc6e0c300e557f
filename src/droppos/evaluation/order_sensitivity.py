"""Does a fine-tuned classifier use where its patches are? Top-1 under four views of the input.

- intact: the image as it is;
- shuffled patches: every patch's content moved to a random cell before the positional
  embeddings are added (a jigsaw at patch granularity, done on the tokens);
- no positions: no patch gets its positional embedding;
- tile jigsaw: the image cut into `tiles x tiles` pieces, which are permuted in pixel space
  (local structure kept, layout lost).

A classifier that ignored positions would score the same in all four (a ViT with no positional
embedding is exactly invariant to the first three); the gaps measure how much it relies on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from droppos.engine import context as run_context
from droppos.engine.context import RunContext
from droppos.engine.logging import write_config
from droppos.engine.precision import autocast
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.datasets import (
    EvaluationConfig,
    LabelledSplits,
    eval_view,
    inference_batches,
    labelled_splits,
)
from droppos.evaluation.position_probe import vit_patch_tokens
from droppos.evaluation.report import write_results
from droppos.interop.backbone import Backbone, build_vit
from droppos.sections import RunSection

CONDITIONS = ("intact", "shuffled_patches", "no_positions", "tile_jigsaw")


@dataclass
class OrderSection:
    """How the input's order is broken."""

    tiles: int = 2
    """The tile jigsaw cuts each image into tiles x tiles pieces."""

    def validate(self) -> None:
        if self.tiles < 1:
            raise ValueError(f"--order.tiles must be >= 1, got {self.tiles}")


@dataclass
class OrderSensitivityConfig(EvaluationConfig):
    """Top-1 of a fine-tuned classifier with intact, shuffled and position-less inputs."""

    model: BackboneSection = field(
        default_factory=lambda: BackboneSection(checkpoint="runs/finetune/best.pth")
    )
    order: OrderSection = field(default_factory=OrderSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/order-sensitivity"))


def random_permutations(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[count, size] permutations, none of them the identity (for size > 1)."""
    perms = torch.stack([torch.randperm(size, generator=generator) for _ in range(count)])
    if size > 1:
        identity = (perms == torch.arange(size)).all(dim=1)
        perms[identity] = perms[identity].roll(1, dims=1)
    return perms


def tile_jigsaw(images: torch.Tensor, tiles: int, perms: torch.Tensor) -> torch.Tensor:
    """images [N, C, H, W] cut in tiles x tiles pieces; piece i of the result is piece perms[i]."""
    n, c, h, w = images.shape
    th, tw = h // tiles, w // tiles
    pieces = images.reshape(n, c, tiles, th, tiles, tw).permute(0, 2, 4, 1, 3, 5)
    pieces = pieces.reshape(n, tiles * tiles, c, th, tw)
    pieces = torch.gather(
        pieces, 1, perms.to(images.device)[:, :, None, None, None].expand_as(pieces)
    )
    pieces = pieces.reshape(n, tiles, tiles, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    return pieces.reshape(n, c, h, w)


def condition_logits(
    vit: VisionTransformer,
    images: torch.Tensor,
    condition: str,
    generator: torch.Generator,
    tiles: int = 2,
) -> torch.Tensor:
    """The classifier's logits [N, classes] for one view of `images`."""
    n, num_patches = images.shape[0], vit.patch_embed.num_patches
    if condition == "intact":
        tokens = vit_patch_tokens(vit, images)
    elif condition == "shuffled_patches":
        order = random_permutations(n, num_patches, generator).to(images.device)
        tokens = vit_patch_tokens(vit, images, order=order)
    elif condition == "no_positions":
        keep = torch.zeros(n, num_patches, dtype=torch.bool, device=images.device)
        tokens = vit_patch_tokens(vit, images, keep_position=keep)
    elif condition == "tile_jigsaw":
        perms = random_permutations(n, tiles * tiles, generator)
        tokens = vit_patch_tokens(vit, tile_jigsaw(images, tiles, perms))
    else:
        raise ValueError(f"unknown condition {condition!r}; one of {', '.join(CONDITIONS)}")
    return vit.forward_head(tokens)


@torch.inference_mode()
def order_sensitivity(
    vit: VisionTransformer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    context: RunContext,
    tiles: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 (%) of the classifier under every condition, on the same images (`batches` of
    images and labels)."""
    vit.eval()
    device = context.device
    correct = dict.fromkeys(CONDITIONS, 0)
    total = 0
    generators = {c: torch.Generator().manual_seed(seed + i) for i, c in enumerate(CONDITIONS)}
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        for condition in CONDITIONS:
            with autocast(device, context.precision):
                logits = condition_logits(vit, images, condition, generators[condition], tiles)
            correct[condition] += int((logits.argmax(dim=1) == labels).sum())
        total += len(labels)
    top1 = {c: round(100 * correct[c] / max(total, 1), 3) for c in CONDITIONS}
    return {"top1": top1, "drop_from_intact": {c: round(top1["intact"] - top1[c], 3)
                                               for c in CONDITIONS[1:]},
            "images": total, "tiles": tiles}  # fmt: skip


def check_head_classes(backbone: Backbone, splits: LabelledSplits, source: str) -> None:
    """A classifier's head scores only the classes it was fine-tuned on: the data must have as
    many, under the same names where both say them (else its accuracy means nothing)."""
    named = backbone.classes and splits.classes
    if backbone.num_classes != splits.num_classes or (named and backbone.classes != splits.classes):

        def listed(names: list[str] | None) -> str:
            return f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""

        raise ValueError(
            f"{backbone.source} classifies {backbone.num_classes} classes"
            f"{listed(backbone.classes)}, but --data.source {source} has {splits.num_classes}"
            f"{listed(splits.classes)}: score the classifier on the data it was fine-tuned on"
        )


def run(config: OrderSensitivityConfig) -> str | None:
    """`droppos order-sensitivity`: score the classifier under every condition, write
    results.json, print the table."""
    config.validate()
    context = run_context.start(config.run, "order-sensitivity")
    backbone = backbone_from(config.model)
    if backbone.num_classes == 0:
        raise ValueError(
            f"{backbone.source} has no classifier head; order-sensitivity needs a fine-tuned "
            "checkpoint (droppos finetune writes best.pth)"
        )
    splits = labelled_splits(config.data)
    check_head_classes(backbone, splits, config.data.source)
    vit = build_vit(backbone, num_classes=backbone.num_classes, global_pool=backbone.global_pool)
    val = eval_view(splits.val, config.data, backbone)
    batches = inference_batches(val, config.data, context)
    results = order_sensitivity(
        vit.to(context.device), batches, context, config.order.tiles, config.run.seed
    )
    results.update(checkpoint=backbone.source, checkpoint_kind=backbone.kind)
    if not context.is_main:
        return None
    write_config(config, config.run.output_dir)
    write_results(config.run.output_dir, "order-sensitivity", results, context.precision)
    rows = "\n".join(f"| {c} | {v:.2f} |" for c, v in results["top1"].items())
    return (
        f"top-1 of {backbone.source} on {results['images']} images:\n"
        f"| input | top-1 |\n|---|---|\n{rows}"
    )
