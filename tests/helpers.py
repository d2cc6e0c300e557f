"""Tiny models shared by the tests: CPU, seconds each."""

from pathlib import Path

import torch
from PIL import Image

from droppos import create_model
from droppos.interop.schema import Progress, TrainingCheckpoint


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


def assert_trained_alike(weights, reference) -> None:
    """Two trainings that differ only in float rounding (a batch summed in another order, a
    compiled graph) end with the same weights to 1e-6, except the key third of each `qkv`
    bias: it has no gradient in exact arithmetic (softmax ignores a shift shared by every key),
    so AdamW turns each path's rounding noise there into full-size steps."""
    for name, value in weights.items():
        expected = reference[name]
        if name.endswith("attn.qkv.bias"):
            dim = len(value) // 3
            value = torch.cat([value[:dim], value[2 * dim :]])
            expected = torch.cat([expected[:dim], expected[2 * dim :]])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)


def progress_of(checkpoint: Path) -> Progress:
    """Where the run that wrote `checkpoint` stood, read through the checkpoint schema."""
    return TrainingCheckpoint.read(checkpoint).progress
