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

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

from droppos.engine.precision import autocast
from droppos.evaluation.position_probe import vit_patch_tokens

CONDITIONS = ("intact", "shuffled_patches", "no_positions", "tile_jigsaw")


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
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    tiles: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 (%) of the classifier under every condition, on the same images."""
    vit.eval()
    correct = dict.fromkeys(CONDITIONS, 0)
    total = 0
    generators = {c: torch.Generator().manual_seed(seed + i) for i, c in enumerate(CONDITIONS)}
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        for condition in CONDITIONS:
            with autocast(device, precision):
                logits = condition_logits(vit, images, condition, generators[condition], tiles)
            correct[condition] += int((logits.argmax(dim=1) == labels).sum())
        total += len(labels)
    top1 = {c: round(100 * correct[c] / max(total, 1), 3) for c in CONDITIONS}
    return {"top1": top1, "drop_from_intact": {c: round(top1["intact"] - top1[c], 3)
                                               for c in CONDITIONS[1:]},
            "images": total, "tiles": tiles}  # fmt: skip
