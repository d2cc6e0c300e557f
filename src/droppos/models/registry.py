"""Models by name: `droppos_vit_base_patch16`, `mae_vit_large_patch16`, `vit_tiny_patch16`, ..."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from droppos.models.droppos import DropPosConfig, DropPosModel
from droppos.models.encoder import EncoderConfig, ViTEncoder
from droppos.models.mae import MAEConfig, MAEModel
from droppos.models.pixel_decoder import PixelDecoderConfig

# embed_dim, depth, num_heads; the timm model with the same encoder is `vit_{size}_patch{p}_224`.
ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}
DEFAULT_PATCH = {"huge": 14}
NAME = re.compile(r"^(?:(droppos|mae)_)?vit_(" + "|".join(ENCODER_SIZES) + r")(?:_patch(\d+))?$")


def model_names() -> list[str]:
    """Every name `create_model` accepts, with the default patch size."""
    sizes = [f"vit_{s}_patch{DEFAULT_PATCH.get(s, 16)}" for s in ENCODER_SIZES]
    return [f"{kind}_{s}" for kind in ("droppos", "mae") for s in sizes] + sizes


def parse_name(name: str) -> tuple[str, str, dict[str, int]]:
    """name -> (kind: droppos | mae | encoder, size, encoder shape)."""
    match = NAME.match(name)
    if match is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    kind, size, patch = match.groups()
    shape = dict(ENCODER_SIZES[size], patch_size=int(patch or DEFAULT_PATCH.get(size, 16)))
    return kind or "encoder", size, shape


def _split(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: overrides.pop(k) for k in list(overrides) if k in names}


def create_model(name: str, **overrides: Any) -> DropPosModel | MAEModel | ViTEncoder:
    """Build a model by name; keyword overrides go to the encoder or the objective config.

    `create_model("droppos_vit_base_patch16", img_size=(224, 320), in_chans=1, decoder_depth=8)`.
    `pixel_branch=True` (or a PixelDecoderConfig) adds the multi-task MAE branch.
    """
    kind, _, shape = parse_name(name)
    overrides = dict(overrides)
    encoder = EncoderConfig(**{**shape, **_split(EncoderConfig, overrides)})
    if kind == "encoder":
        _reject(name, overrides)
        return ViTEncoder(encoder)
    if kind == "mae":
        decoder = PixelDecoderConfig(**_split(PixelDecoderConfig, overrides))
        config = MAEConfig(encoder=encoder, decoder=decoder, **_split(MAEConfig, overrides))
        _reject(name, overrides)
        return MAEModel(config)
    if overrides.get("pixel_branch") is True:
        overrides["pixel_branch"] = PixelDecoderConfig()
    elif overrides.get("pixel_branch") is False:
        overrides["pixel_branch"] = None
    config = DropPosConfig(encoder=encoder, **_split(DropPosConfig, overrides))
    _reject(name, overrides)
    return DropPosModel(config)


def _reject(name: str, leftover: dict[str, Any]) -> None:
    if leftover:
        raise ValueError(f"{name} does not take option(s): {', '.join(sorted(leftover))}")
