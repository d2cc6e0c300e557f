"""Any checkpoint -> a timm `VisionTransformer` holding its weights, for every evaluation.

Accepted files: droppos pre-training checkpoints (`last.pth`), droppos fine-tuning checkpoints
(`best.pth`, `last.pth`), checkpoints of the original DropPos and MAE code (SPEC §5, weights
under `model` or `state_dict`, maybe `module.`-prefixed), and exported `model.safetensors`.
Our encoder's names are timm's, so loading is a filter, not a conversion. The shape is read off
the tensors; the one thing no tensor shows, the number of heads, comes from the file's own
configuration, else from the standard width table, else from the user.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from droppos.evaluation.config import BackboneSection
from droppos.interop.original import describe_mismatch, load_checkpoint_object, unwrap_state_dict
from droppos.models.encoder import EncoderConfig, ViTEncoder, pair
from droppos.models.registry import ENCODER_SIZES, parse_name

ENCODER_KEY = re.compile(
    r"^(patch_embed\.|cls_token$|pos_embed$|blocks\.\d+\.|norm\.|fc_norm\.|head\.)"
)
REQUIRED = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight")
HEADS_BY_WIDTH = {s["embed_dim"]: s["num_heads"] for s in ENCODER_SIZES.values()}


@dataclass
class Backbone:
    """Encoder weights under timm names, and the shape they fit.

    `state` holds only encoder tensors, plus `fc_norm`/`head` for a fine-tuned classifier.
    `mean`/`std`/`classes` are the file's own when it records them (ours do).
    """

    encoder: EncoderConfig
    state: dict[str, torch.Tensor]
    source: str
    kind: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None

    @property
    def num_classes(self) -> int:
        head = self.state.get("head.weight")
        return 0 if head is None else int(head.shape[0])

    @property
    def has_fc_norm(self) -> bool:
        return "fc_norm.weight" in self.state

    @property
    def global_pool(self) -> str:
        """How a fine-tuned head pools (its LayerNorm marks the average-pooled MAE head)."""
        return "avg" if self.has_fc_norm else "token"


def load_backbone(
    checkpoint: str | Path, num_heads: int | None = None, random_shape: EncoderConfig | None = None
) -> Backbone:
    """A checkpoint file, or `random` (a fresh encoder of `random_shape`), as a Backbone.

    Raises FileNotFoundError for a missing file and ValueError, naming what is wrong, for a
    file that holds no ViT encoder or whose shape cannot be told.
    """
    if str(checkpoint) == "random":
        if random_shape is None:
            raise ValueError("a random backbone needs a shape")
        return random_backbone(random_shape)
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (pre-train first, or pass --model.checkpoint PATH|random)"
        )
    try:
        content = load_checkpoint_object(path)
    except Exception as error:  # a pickle of something else, a truncated file, ...
        raise ValueError(f"cannot read {path} as a checkpoint: {error}".splitlines()[0]) from None
    try:
        state = unwrap_state_dict(content)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    state = {k: v for k, v in state.items() if ENCODER_KEY.match(k)}
    meta = _metadata(content, path)
    encoder = meta.get("encoder")
    if encoder is None:
        heads = num_heads or meta.get("num_heads")
        encoder = infer_encoder(state, str(path), heads, meta.get("img_size"))
    elif num_heads is not None:
        encoder = EncoderConfig(**{**asdict(encoder), "num_heads": num_heads})
    return Backbone(
        encoder=encoder,
        state=state,
        source=str(path),
        kind=meta.get("kind", "original DropPos/MAE checkpoint"),
        mean=_tuple(meta.get("mean")),
        std=_tuple(meta.get("std")),
        classes=meta.get("classes"),
    )


def random_backbone(shape: EncoderConfig) -> Backbone:
    """A freshly initialised encoder (the pre-training init of SPEC §2): the no-pretraining
    baseline, seeded by the caller's `torch.manual_seed`."""
    encoder = ViTEncoder(shape)
    return Backbone(encoder=shape, state=encoder.state_dict(), source="random", kind="random init")


def infer_encoder(
    state: Mapping[str, torch.Tensor],
    where: str,
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> EncoderConfig:
    """Read a ViT's shape off its tensors; `num_heads` defaults by width (ViT-Ti/S/B/L/H)."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"{where} holds no ViT encoder (missing {', '.join(missing)}); expected a droppos, "
            "DropPos or MAE checkpoint or an exported model.safetensors"
        )
    embed_dim, in_chans, patch_h, patch_w = state["patch_embed.proj.weight"].shape
    if patch_h != patch_w:
        raise ValueError(f"{where}: non-square patches {patch_h}x{patch_w} are not supported")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    positions = state["pos_embed"].shape[1] - 1  # the [CLS] row comes first
    if img_size is None:
        side = math.isqrt(positions)
        if side * side != positions:
            raise ValueError(
                f"{where}: pos_embed has {positions} patch positions, not a square grid; "
                "cannot tell the image size"
            )
        img_size = side * patch_h
    heads = num_heads or HEADS_BY_WIDTH.get(embed_dim)
    if heads is None:
        raise ValueError(
            f"{where}: cannot tell the number of attention heads of a {embed_dim}-wide "
            "encoder; pass --model.num_heads (or --num_heads)"
        )
    return EncoderConfig(
        img_size=img_size,
        patch_size=patch_h,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
    )


def build_vit(
    backbone: Backbone,
    num_classes: int = 0,
    global_pool: str = "token",
    fc_norm: bool | None = None,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """timm's VisionTransformer with the backbone's weights.

    `num_classes=0` gives a feature extractor whose output is the pooled feature. `fc_norm`
    (default: as in the file) puts a LayerNorm after pooling instead of the final norm: the
    MAE fine-tuning head, which drops the pre-trained final norm. A head is new (to be
    initialised by the caller) unless the file has one of the same size; anything else that
    does not fit raises ValueError naming the keys.
    """
    enc = backbone.encoder
    model = VisionTransformer(
        img_size=pair(enc.img_size),
        patch_size=enc.patch_size,
        in_chans=enc.in_chans,
        embed_dim=enc.embed_dim,
        depth=enc.depth,
        num_heads=enc.num_heads,
        mlp_ratio=enc.mlp_ratio,
        qkv_bias=True,
        global_pool=global_pool,
        fc_norm=backbone.has_fc_norm if fc_norm is None else fc_norm,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
    )
    own = model.state_dict()
    state = dict(backbone.state)
    for prefix in ("norm.", "fc_norm.", "head."):  # whichever the new head does not use
        if not any(k.startswith(prefix) for k in own):
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if "head.weight" in state and state["head.weight"].shape != own["head.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(("head.", "fc_norm.")))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{backbone.source}: " + describe_mismatch(missing, unexpected, mismatched)
        )
    model.load_state_dict(state, strict=False)
    return model


def has_loaded_head(backbone: Backbone, model: nn.Module) -> bool:
    """Whether `build_vit` kept the file's classifier (same class count) rather than a new one."""
    head = getattr(model, "head", None)
    weight = backbone.state.get("head.weight")
    return isinstance(head, nn.Linear) and weight is not None and weight.shape == head.weight.shape


# -- what each kind of file says about itself -------------------------------------------------


def _metadata(content: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Shape, normalisation and classes recorded by droppos files; {} for foreign ones."""
    if content.get("droppos") == "finetune":  # ours, written by `droppos finetune`
        return {
            "kind": "droppos fine-tuned classifier",
            "encoder": EncoderConfig(**content["encoder"]),
            "mean": content.get("mean"),
            "std": content.get("std"),
            "classes": content.get("classes"),
        }
    config = content.get("config")
    if isinstance(config, Mapping) and "model_name" in content:  # ours, `droppos pretrain`
        section = config.get("model", {})
        _, _, shape = parse_name(content["model_name"])
        data = config.get("data", {})
        return {
            "kind": f"droppos pre-training checkpoint ({content['model_name']})",
            "num_heads": section.get("num_heads") or shape["num_heads"],
            "img_size": section.get("img_size"),
            "mean": data.get("mean"),
            "std": data.get("std"),
        }
    sidecar = path.with_name("config.json")
    if path.suffix == ".safetensors" and sidecar.is_file():  # ours, `droppos export`
        exported = json.loads(sidecar.read_text())
        args = exported.get("model_args", {})
        cfg = exported.get("pretrained_cfg", {})
        return {
            "kind": "exported model",
            "num_heads": args.get("num_heads"),
            "img_size": args.get("img_size"),
            "mean": cfg.get("mean"),
            "std": cfg.get("std"),
            "classes": exported.get("label_names"),
        }
    return {}


def _tuple(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


def backbone_from(section: BackboneSection) -> Backbone:
    """The backbone a command's `--model.*` options name (see BackboneSection)."""
    if section.checkpoint == "random":
        return random_backbone(section.random_shape())
    backbone = load_backbone(section.checkpoint, section.num_heads)
    if not section.random_init:
        return backbone
    fresh = random_backbone(backbone.encoder)
    fresh.source = f"random init shaped like {backbone.source}"
    fresh.mean, fresh.std = backbone.mean, backbone.std  # the data pipeline stays the same
    return fresh
