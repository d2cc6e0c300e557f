"""ViT shapes by name: the standard widths (`vit_base_patch16`, ...) and the demo's encoder."""

from __future__ import annotations

import re

from droppos.models.encoder import EncoderConfig

# embed_dim, depth, num_heads; the timm model with the same encoder is `vit_{size}_patch{p}_224`.
ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}
DEFAULT_PATCH = {"huge": 14}
HEADS_BY_WIDTH = {s["embed_dim"]: s["num_heads"] for s in ENCODER_SIZES.values()}
VIT_NAME = re.compile(r"vit_(" + "|".join(ENCODER_SIZES) + r")(?:_patch(\d+))?")


def encoder_names() -> list[str]:
    """`vit_{size}_patch{p}` for every standard size, with its default patch size."""
    return [f"vit_{s}_patch{DEFAULT_PATCH.get(s, 16)}" for s in ENCODER_SIZES]


def encoder_shape(name: str) -> dict[str, int] | None:
    """`vit_base_patch16` -> {embed_dim, depth, num_heads, patch_size}; None for another name."""
    match = VIT_NAME.fullmatch(name)
    if match is None:
        return None
    size, patch = match.groups()
    return dict(ENCODER_SIZES[size], patch_size=int(patch or DEFAULT_PATCH.get(size, 16)))


def demo_encoder() -> EncoderConfig:
    """The demo's ViT: 4 blocks of ViT-Tiny width on 28x28 greyscale images, 7x7 patches."""
    return EncoderConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=192, depth=4, num_heads=3)
