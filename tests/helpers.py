"""Tiny models shared by the tests: CPU, seconds each."""

from pathlib import Path

import torch
from PIL import Image

from droppos import create_model


def tiny_droppos(**overrides):
    """A 2-block ViT on 32x32 images with 4x4 patches: L = 64, V = 16, K = 4."""
    options = dict(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_num_heads=4,
    )
    options.update(overrides)
    return create_model("droppos_vit_tiny_patch16", **options)


def write_split_images(root: Path, train: int = 24, val: int = 8, size: int = 20) -> Path:
    """`train/` and `val/` folders of random RGB images in two classes (`a`, `b`), seeded."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            folder = root / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.rand(size, size, 3, generator=generator) * 255
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return root
