"""Tiny models shared by the tests: CPU, seconds each."""

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
