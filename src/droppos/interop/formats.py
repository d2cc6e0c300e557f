"""Other frameworks' checkpoint formats, written from a timm ViT state dict."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

# timm/MAE block names -> MMSegmentation's `MAE` backbone names (its beit2mmseg.py mapping).
MMSEG_RENAMES = (
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.ln1."),
    (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.ln2."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
    (r"^blocks\.(\d+)\.attn\.", r"layers.\1.attn."),
)


def mmseg_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm/MAE names -> MMSegmentation's `MAE` backbone names (0.x and 1.x alike).

    Its attention (`MAEAttention`) keeps timm's fused `qkv` with its bias, so only module names
    change. The final norm and any classifier are left out: that backbone has neither (it reads
    the last block's tokens before the norm). Its layer-scale (`gamma_*`, at `init_values`) and
    relative-position tables (zeros: MAE has none) are its own, by design.
    """
    return {
        mmseg_name(name): value
        for name, value in state.items()
        if not name.startswith(("norm.", "fc_norm.", "head."))
    }


def mmseg_name(name: str) -> str:
    for pattern, replacement in MMSEG_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def mae_state(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """MAE's release format, `{"model": state dict}` under timm names: what Detectron2's ViTDet
    (`train.init_checkpoint`) and MAE/BEiT-style code load."""
    return {"model": dict(state)}


# timm block names -> Hugging Face `transformers` ViTModel names (its classic layout, which every
# transformers version loads, converting to its own where it renamed them).
HF_RENAMES = (
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^norm\.", "layernorm."),
)


def hf_vit_state(
    state: Mapping[str, torch.Tensor], classifier: bool = False
) -> dict[str, torch.Tensor]:
    """A timm ViT's state dict -> Hugging Face names: the fused `qkv` is split into query, key
    and value. `classifier`: a `ViTForImageClassification` (the encoder under `vit.`, `head` as
    `classifier`), which fits only a `[CLS]`-pooled head without `fc_norm`; otherwise a
    `ViTModel`, and a classifier (`head`, `fc_norm`) is left out."""
    renamed: dict[str, torch.Tensor] = {}
    prefix = "vit." if classifier else ""
    for name, value in state.items():
        if classifier and name.startswith("head."):
            renamed[name.replace("head.", "classifier.", 1)] = value.contiguous()
            continue
        if name.startswith(("fc_norm.", "head.")):
            continue
        qkv = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
        if qkv:
            layer, kind = qkv.groups()
            for part, chunk in zip(("query", "key", "value"), value.chunk(3), strict=True):
                key = f"{prefix}encoder.layer.{layer}.attention.attention.{part}.{kind}"
                renamed[key] = chunk.clone().contiguous()
            continue
        for pattern, replacement in HF_RENAMES:
            if re.match(pattern, name):
                renamed[prefix + re.sub(pattern, replacement, name)] = value.contiguous()
                break
        else:
            raise ValueError(f"no Hugging Face name for the ViT weight {name!r}")
    return renamed


def hf_vit_config(model_args: Mapping[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
    """`config.json` of a `transformers.ViTModel` of this shape (timm's pre-norm block, GELU,
    LayerNorm eps 1e-6, biased qkv, no dropout); with `labels`, of a
    `ViTForImageClassification` over those classes."""
    height, width = model_args["img_size"]
    dim = model_args["embed_dim"]
    named = (
        {
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)},
        }
        if labels is not None
        else {}
    )
    return {
        "architectures": ["ViTForImageClassification" if labels is not None else "ViTModel"],
        **named,
        "model_type": "vit",
        "hidden_size": dim,
        "num_hidden_layers": model_args["depth"],
        "num_attention_heads": model_args["num_heads"],
        "intermediate_size": int(dim * model_args["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "image_size": height if height == width else [height, width],
        "patch_size": model_args["patch_size"],
        "num_channels": model_args["in_chans"],
        "qkv_bias": True,
    }


# ... and back: Hugging Face's saved ViT / ViTMAE names -> timm's.
FROM_HF_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)


def from_hf_vit_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `transformers` ViTModel / ViTMAEModel state dict (its saved names, with or without the
    `vit.` prefix of the *For* classes) -> timm ViT encoder names; decoders, poolers and
    classifiers are left out."""
    renamed: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        name = name.removeprefix("vit.")
        if name.startswith(("decoder.", "pooler.", "classifier.")):
            continue
        split = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(\w+)\.(\w+)$", name)
        if split:
            layer, part, kind = split.groups()
            parts.setdefault((layer, kind), {})[part] = value
            continue
        for pattern, replacement in FROM_HF_RENAMES:
            if re.match(pattern, name):
                renamed[re.sub(pattern, replacement, name)] = value
                break
    for (layer, kind), found in parts.items():
        if set(found) != {"query", "key", "value"}:
            raise ValueError(f"layer {layer} lacks a query, key or value {kind}")
        qkv = torch.cat([found["query"], found["key"], found["value"]])
        renamed[f"blocks.{layer}.attn.qkv.{kind}"] = qkv
    return renamed


# What each client's model holds, written from the client's own module definitions rather than
# from the renames above, so that a rename drifting from its client fails `export` (which checks
# every file against these before writing it) instead of a user's fine-tuning; the tests load
# each file into the real client (tests/test_export.py, tests/test_mmseg_export.py).
MAE_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
MMSEG_MAE_BLOCK = ("ln1", "attn.qkv", "attn.proj", "ln2", "ffn.layers.0.0", "ffn.layers.1")
MMSEG_MAE_OWN = (
    "gamma_1", "gamma_2", "attn.relative_position_bias_table", "attn.relative_position_index",
)  # fmt: skip
"""What MMSegmentation's `MAE` layers set themselves: layer-scale at `init_values`, and relative
position tables that MAE leaves at zero (with their index)."""
HF_VIT_BLOCK = (
    "layernorm_before", "attention.attention.query", "attention.attention.key",
    "attention.attention.value", "attention.output.dense", "layernorm_after",
    "intermediate.dense", "output.dense",
)  # fmt: skip


def weights_and_biases(prefix: str, modules: tuple[str, ...]) -> set[str]:
    return {f"{prefix}{module}.{kind}" for module in modules for kind in ("weight", "bias")}


def mae_keys(model_args: Mapping[str, Any]) -> set[str]:
    """MAE's `models_vit.VisionTransformer` (timm 0.3.2's names) of this shape: a pooled head
    (`global_pool`) swaps the final norm for `fc_norm`. ViTDet reads its patch embedding,
    positions and blocks."""
    keys = {"cls_token", "pos_embed"} | weights_and_biases("patch_embed.", ("proj",))
    for i in range(model_args["depth"]):
        keys |= weights_and_biases(f"blocks.{i}.", MAE_BLOCK)
    keys |= weights_and_biases("", ("fc_norm",) if model_args["fc_norm"] else ("norm",))
    return keys | (weights_and_biases("", ("head",)) if model_args["num_classes"] else set())


def mmseg_mae_keys(model_args: Mapping[str, Any]) -> set[str]:
    """MMSegmentation's `MAE` backbone of this shape, less what it sets itself
    (`MMSEG_MAE_OWN`): no final norm, no head."""
    keys = {"cls_token", "pos_embed"} | weights_and_biases("patch_embed.", ("projection",))
    for i in range(model_args["depth"]):
        keys |= weights_and_biases(f"layers.{i}.", MMSEG_MAE_BLOCK)
    return keys


def hf_vit_keys(model_args: Mapping[str, Any], classifier: bool = False) -> set[str]:
    """A `transformers` ViTModel without pooler (or, `classifier`, a ViTForImageClassification)
    of this shape, under the names its checkpoints have always had (transformers 5 renames them
    in memory and converts on load). An `fc_norm` classifier's encoder has no final norm."""
    keys = {"embeddings.cls_token", "embeddings.position_embeddings"}
    keys |= weights_and_biases("embeddings.patch_embeddings.", ("projection",))
    for i in range(model_args["depth"]):
        keys |= weights_and_biases(f"encoder.layer.{i}.", HF_VIT_BLOCK)
    if not model_args["fc_norm"]:
        keys |= weights_and_biases("", ("layernorm",))
    if not classifier:
        return keys
    return {f"vit.{key}" for key in keys} | weights_and_biases("", ("classifier",))
