"""Export a checkpoint for the frameworks people transfer with, no conversion script needed.

One `droppos export` writes, into one folder:

- `model.safetensors` + `config.json`: a timm `VisionTransformer` state dict and timm's own
  Hugging Face-style config (architecture, `model_args`, `pretrained_cfg` with the input size
  and normalisation), plus a `droppos` block with provenance. Loads with
  `timm.create_model("local-dir:FOLDER", pretrained=True)` or, naming the file,
  `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), **model_args)`
  (no missing keys but the classifier head).
- `mae_format.pth`: `{"model": state dict}` with timm/MAE names, the file MAE releases: what
  Detectron2's ViTDet (`train.init_checkpoint`) and MAE/BEiT-style code load.
- `mmseg_mae.pth`: the same weights under MMSegmentation's `MAE` backbone names (what its
  `beit2mmseg.py` converter would write), for `model.pretrained` in its MAE configs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

import droppos
from droppos.data.transforms import default_mean_std
from droppos.interop.checkpoints import Backbone, build_vit, load_backbone, mae_state, mmseg_state
from droppos.models.encoder import EncoderConfig, pair
from droppos.models.registry import ENCODER_SIZES

WEIGHTS, CONFIG, MAE_FORMAT, MMSEG_FORMAT = (
    "model.safetensors",
    "config.json",
    "mae_format.pth",
    "mmseg_mae.pth",
)


@dataclass
class ExportedFiles:
    folder: Path
    weights: Path
    config: Path
    mae_format: Path
    mmseg_format: Path
    timm_name: str
    model_args: dict[str, Any]


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    timm_name: str | None = None,
    num_heads: int | None = None,
) -> ExportedFiles:
    """Write the four files for `checkpoint` into `output` (created if needed).

    A pre-training checkpoint exports its encoder (no head); a fine-tuned one its classifier
    (average pool, `fc_norm`, `head`). ValueError/FileNotFoundError for a user mistake.
    """
    if str(checkpoint) == "random":
        raise ValueError("export needs a checkpoint file, not `random`")
    backbone = load_backbone(checkpoint, num_heads)
    name = timm_name or timm_architecture(backbone.encoder)
    if not (name.startswith("vit_") and timm.is_model(name)):
        raise ValueError(
            f"--timm_name {name!r} is not a timm VisionTransformer (try vit_base_patch16_224)"
        )
    model = build_vit(
        backbone,
        num_classes=backbone.num_classes,
        global_pool=backbone.global_pool,
        fc_norm=backbone.has_fc_norm,
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    files = ExportedFiles(
        folder=folder,
        weights=folder / WEIGHTS,
        config=folder / CONFIG,
        mae_format=folder / MAE_FORMAT,
        mmseg_format=folder / MMSEG_FORMAT,
        timm_name=name,
        model_args=model_args(backbone),
    )
    save_file(state, str(files.weights), metadata={"format": "pt"})
    config = timm_config(backbone, name, provenance(Path(checkpoint), backbone))
    files.config.write_text(json.dumps(config, indent=2) + "\n")
    torch.save(mae_state(state), files.mae_format)
    torch.save(mmseg_state(state), files.mmseg_format)
    return files


def timm_architecture(encoder: EncoderConfig) -> str:
    """The registered timm ViT closest to this shape (`model_args` carry the exact shape)."""
    size = min(ENCODER_SIZES, key=lambda s: abs(ENCODER_SIZES[s]["embed_dim"] - encoder.embed_dim))
    height, width = pair(encoder.img_size)
    exact = f"vit_{size}_patch{encoder.patch_size}_{height}"
    if height == width and timm.is_model(exact):
        return exact
    return "vit_huge_patch14_224" if size == "huge" else f"vit_{size}_patch16_224"


def model_args(backbone: Backbone) -> dict[str, Any]:
    """Keyword arguments that make any timm `vit_*` entry point this exact model."""
    enc = backbone.encoder
    return {
        "img_size": list(pair(enc.img_size)),
        "patch_size": enc.patch_size,
        "in_chans": enc.in_chans,
        "embed_dim": enc.embed_dim,
        "depth": enc.depth,
        "num_heads": enc.num_heads,
        "mlp_ratio": enc.mlp_ratio,
        "global_pool": backbone.global_pool,
        "fc_norm": backbone.has_fc_norm,
        "num_classes": backbone.num_classes,
    }


def timm_config(backbone: Backbone, name: str, source: dict[str, Any]) -> dict[str, Any]:
    """timm's Hugging Face-style config.json (what `timm.create_model("local-dir:...")` reads)."""
    enc = backbone.encoder
    default_mean, default_std = default_mean_std(enc.in_chans)
    config: dict[str, Any] = {
        "architecture": name,
        "num_classes": backbone.num_classes,
        "num_features": enc.embed_dim,
        "global_pool": backbone.global_pool,
        "model_args": model_args(backbone),
        "pretrained_cfg": {
            "tag": "droppos",
            "custom_load": False,
            "input_size": [enc.in_chans, *pair(enc.img_size)],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": list(backbone.mean or default_mean),
            "std": list(backbone.std or default_std),
            "num_classes": backbone.num_classes,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "droppos": source,
    }
    if backbone.classes and len(backbone.classes) == backbone.num_classes:
        config["label_names"] = list(backbone.classes)
    return config


def provenance(path: Path, backbone: Backbone) -> dict[str, Any]:
    """Where the weights came from, exactly, and what made the files."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "source_checkpoint": str(path.resolve()),
        "source_sha256": digest.hexdigest(),
        "source_kind": backbone.kind,
        "droppos_version": droppos.__version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
