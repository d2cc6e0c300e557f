"""Any ViT checkpoint as a `Backbone`, in the style of timm's `checkpoint_filter_fn`.

Reads droppos pre-training checkpoints (of any registered method), droppos fine-tuned
classifiers, checkpoints of the original DropPos and MAE code (weights under `model` or
`state_dict`, maybe `module.`-prefixed; names are ours, see docs/method.md), exported
`model.safetensors`, and any timm ViT state dict, as encoder weights under timm names plus the
shape they fit. The shape is read off the tensors; the one thing no tensor shows, the number of
heads, comes from the file's own configuration, else from the standard width table, else from
the user. `build_vit` turns a backbone into timm's `VisionTransformer`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from droppos.interop.formats import from_hf_vit_state
from droppos.interop.schema import (
    ExportSidecar,
    PretrainedModel,
    Segmenter,
    header_of,
    legacy_pretraining,
    load_object,
    normalisation_of,
)
from droppos.models.encoder import EncoderConfig, ViTEncoder
from droppos.models.sizes import HEADS_BY_WIDTH

WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
PREFIXES = ("module.", "_orig_mod.")
ENCODER_KEY = re.compile(
    r"^(patch_embed\.|cls_token$|pos_embed$|blocks\.\d+\.|norm\.|fc_norm\.|head\.)"
)
REQUIRED = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight")


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint object and strip DDP/compile prefixes."""
    state: Mapping[str, Any] = checkpoint
    for key in WRAPPER_KEYS:
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner:
            state = inner
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            "no tensors found in checkpoint (looked at the top level and under "
            f"{', '.join(WRAPPER_KEYS)})"
        )
    cleaned = {}
    for name, value in tensors.items():
        for prefix in PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        cleaned[name] = value
    return cleaned


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.pth`/`.pt` (torch pickle, weights only) or `.safetensors` file -> a clean state dict."""
    return unwrap_state_dict(load_object(path))


def load_original_checkpoint(
    model: nn.Module, source: str | Path | Mapping[str, Any], strict: bool = True
) -> nn.modules.module._IncompatibleKeys:
    """Load an original DropPos/MAE checkpoint (path or loaded object) into `model`.

    On a mismatch, the error names the missing and unexpected keys so the user can tell which
    configuration the file was trained with (decoder depth, MAE branch, model size).
    """
    state = unwrap_state_dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    missing, unexpected, mismatched = key_differences(model.state_dict(), state)
    if strict and (missing or unexpected or mismatched):
        raise ValueError(describe_mismatch(missing, unexpected, mismatched))
    return model.load_state_dict(state, strict=strict)


def key_differences(
    expected: Mapping[str, torch.Tensor] | Iterable[str], state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """The keys of `state` that `expected` (a model's state dict, or just its names) lacks or
    holds and `state` does not, and where `expected` has tensors, those of another shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = expected if isinstance(expected, Mapping) else {}
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(shapes[k].shape)}"
        for k in set(shapes) & set(state)
        if state[k].shape != shapes[k].shape
    )
    return missing, unexpected, mismatched


def describe_mismatch(
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    lead: str = "checkpoint does not match this model configuration",
) -> str:
    """One line naming (the first few) missing, unexpected and mis-shaped keys."""

    def head(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

    parts = [lead]
    if missing:
        parts.append(f"missing from file: {head(missing)}")
    if unexpected:
        parts.append(f"not in model: {head(unexpected)}")
    if mismatched:
        parts.append(f"shape differs: {head(mismatched)}")
    return "; ".join(parts)


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
        """How the exported model pools: a fine-tuned head as it was trained (its LayerNorm
        marks MAE's average-pooled head, else `[CLS]`); an encoder without a head by the mean
        final-norm patch token, the feature droppos's kNN and linear probe read by default, so
        that a timm user gets the feature behind droppos's numbers."""
        return "avg" if self.has_fc_norm or self.num_classes == 0 else "token"

    def normalisation(
        self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
    ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """The user's `mean`/`std` where given, else the ones the weights were trained with;
        None leaves the default of the channel count (`data/transforms.py:mean_std`)."""
        return (mean or self.mean, std or self.std)


def load_backbone(checkpoint: str | Path, num_heads: int | None = None) -> Backbone:
    """A checkpoint file (or a Hugging Face folder) as a Backbone; a fresh encoder is
    `random_backbone`'s.

    Raises FileNotFoundError for a missing file and ValueError, naming what is wrong, for a
    file that holds no ViT encoder or whose shape cannot be told.
    """
    path = Path(checkpoint)
    if path.is_dir() and (path / "config.json").is_file():
        return hf_backbone(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (pre-train first, or pass --model.checkpoint PATH|random)"
        )
    content = load_object(path)
    try:
        state = unwrap_state_dict(content)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if isinstance(header_of(content), Segmenter):  # the encoder of a segmentation model
        state = {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
    state = {k: v for k, v in state.items() if ENCODER_KEY.match(k)}
    if isinstance(header_of(content), PretrainedModel):  # a method's own head is no classifier
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise ValueError(
            f"{path} holds NaN or infinite weights ({', '.join(broken[:3])}"
            f"{', ...' if len(broken) > 3 else ''}): it comes from a diverged run"
        )
    meta = _metadata(content, path)
    encoder = meta.get("encoder")
    if encoder is None:
        heads = num_heads or meta.get("num_heads")
        encoder = infer_encoder(state, str(path), heads, meta.get("img_size"))
    elif num_heads is not None:
        encoder = EncoderConfig(**{**asdict(encoder), "num_heads": num_heads})
    check_fits(encoder, state, str(path))
    return Backbone(
        encoder=encoder,
        state=state,
        source=str(path),
        kind=meta.get("kind", "original DropPos/MAE checkpoint"),
        mean=_tuple(meta.get("mean")),
        std=_tuple(meta.get("std")),
        classes=meta.get("classes"),
    )


HF_KINDS = {"vit": "Hugging Face ViTModel", "vit_mae": "Hugging Face ViTMAEModel"}


def hf_backbone(folder: Path) -> Backbone:
    """A folder saved by `transformers` (`save_pretrained`) of a ViTModel or a ViTMAEModel (or
    their *For* classes): the encoder under timm's names, its shape from `config.json`. Its
    LayerNorm eps is droppos's 1e-6 (ViTMAE's config says 1e-12: a difference below 1e-5 in the
    features). ValueError, naming the folder, for any other kind or shape."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder}/config.json is not readable JSON ({error})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in HF_KINDS:
        raise ValueError(
            f"{folder} holds a Hugging Face {kind!r} model; droppos reads ViT and ViTMAE folders"
        )
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
        raise ValueError(f"{folder}: only GELU ViTs with a biased qkv are droppos encoders")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{folder} has no model.safetensors (save it with safe_serialization)")
    state = from_hf_vit_state(load_object(weights))
    encoder = hf_encoder(config, folder)
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise ValueError(f"{folder} holds NaN or infinite weights ({', '.join(broken[:3])})")
    check_fits(encoder, state, str(folder))
    return Backbone(encoder=encoder, state=state, source=str(folder), kind=HF_KINDS[kind])


def hf_encoder(config: dict[str, Any], folder: Path) -> EncoderConfig:
    """The encoder shape a Hugging Face `config.json` declares; ValueError naming the field for
    a missing one or a wrong type (a string, a float layer count, `true` as a head count)."""

    def read(name: str, default: Any = None) -> Any:
        if name not in config and default is None:
            raise ValueError(f"{folder}/config.json has no {name!r}")
        value = config.get(name, default)
        whole = isinstance(value, int) and not isinstance(value, bool)
        pair = isinstance(value, list) and name == "image_size"
        if not (whole or pair) or (whole and value < 1):
            raise ValueError(
                f"{folder}/config.json: {name!r} must be a positive whole number, got {value!r}"
            )
        return tuple(value) if pair else value

    width, hidden = read("hidden_size"), read("intermediate_size")
    try:
        return EncoderConfig(
            img_size=read("image_size", 224),
            patch_size=read("patch_size", 16),
            in_chans=read("num_channels", 3),
            embed_dim=width,
            depth=read("num_hidden_layers"),
            num_heads=read("num_attention_heads"),
            mlp_ratio=hidden / width,
        )
    except ValueError as error:
        raise ValueError(f"{folder}/config.json: {error}") from None


def check_fits(encoder: EncoderConfig, state: Mapping[str, torch.Tensor], where: str) -> None:
    """The shape a file declares (its metadata, a `config.json`) against the tensors it holds,
    before a model of that shape is built: a few lines of metadata must not make droppos
    allocate a model (hundreds of GB) that the weights on disk could never fill."""
    dim, patch = encoder.embed_dim, encoder.patch_size
    expected = {
        "patch_embed.proj.weight": (dim, encoder.in_chans, patch, patch),
        "blocks.0.mlp.fc1.weight": (int(dim * encoder.mlp_ratio), dim),
        "pos_embed": (1, encoder.num_patches + 1, dim),
    }
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise ValueError(
                f"{where} declares an encoder ({encoder.depth} blocks of width {dim}) whose "
                f"{key} is {list(shape)}, but holds {list(state[key].shape)}"
            )
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks and len(blocks) != encoder.depth:
        raise ValueError(
            f"{where} declares {encoder.depth} encoder blocks, but holds {len(blocks)}"
        )


def random_backbone(shape: EncoderConfig) -> Backbone:
    """A freshly initialised encoder (the pre-training init of docs/method.md): the no-pretraining
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
            "encoder; pass --model.num_heads"
        )
    # EncoderConfig's fields in order: img_size, patch_size, in_chans, embed_dim, depth, heads
    return EncoderConfig(img_size, patch_h, in_chans, embed_dim, depth, heads, mlp_ratio)


def build_vit(
    backbone: Backbone,
    num_classes: int = 0,
    global_pool: str = "token",
    fc_norm: bool | None = None,
    drop_path_rate: float = 0.0,
    init_new_head: Callable[[nn.Linear], None] | None = None,
    dynamic_img_size: bool = False,
) -> VisionTransformer:
    """timm's VisionTransformer with the backbone's weights.

    `num_classes=0` gives a feature extractor whose output is the pooled feature. `fc_norm`
    (default: as in the file) puts a LayerNorm after pooling instead of the final norm: the
    MAE fine-tuning head, which drops the pre-trained final norm. The file's head is kept when
    it has the same size; otherwise the head is new, and `init_new_head` (if given) initialises
    it. Anything else that does not fit raises ValueError naming the keys. `dynamic_img_size`
    takes images of any size (a multiple of the patch), the positional embedding interpolated to
    their grid (timm's).
    """
    enc = backbone.encoder
    model = VisionTransformer(
        img_size=enc.image_size,
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
        dynamic_img_size=dynamic_img_size,
    )
    own = model.state_dict()
    state = dict(backbone.state)
    for prefix in ("norm.", "fc_norm.", "head."):  # whichever the new head does not use
        if not any(k.startswith(prefix) for k in own):
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if "head.weight" in state and state["head.weight"].shape != own["head.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    new_head = num_classes > 0 and "head.weight" not in state
    missing, unexpected, mismatched = key_differences(own, state)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]  # a new head
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{backbone.source}: " + describe_mismatch(missing, unexpected, mismatched)
        )
    model.load_state_dict(state, strict=False)
    if new_head and init_new_head is not None:
        init_new_head(model.head)
    return model


def _metadata(content: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Shape, normalisation and classes recorded by droppos files; {} for foreign ones."""
    header = header_of(content)
    if header is not None:  # ours: a pre-training checkpoint or a fine-tuned classifier
        mean, std = normalisation_of(content)
        return {
            "kind": header.label,
            "encoder": header.encoder,
            "mean": mean,
            "std": std,
            "classes": getattr(header, "classes", None),
        }
    legacy = legacy_pretraining(content)
    if legacy is not None:  # ours, droppos 0.1
        return legacy
    exported = ExportSidecar.beside(path)
    if exported is not None:  # ours, `droppos export`
        return {"kind": "exported model", **exported}
    return {}


def _tuple(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)
