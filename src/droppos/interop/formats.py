"""Other frameworks' checkpoint formats, written from a timm ViT state dict."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

# timm/MAE block names -> MMSegmentation's BEiT-style `MAE` backbone names.
MMSEG_RENAMES = (
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.ln1."),
    (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.ln2."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
    (r"^blocks\.(\d+)\.attn\.", r"layers.\1.attn."),
)


def mmseg_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm/MAE names -> MMSegmentation `MAE` backbone names (its beit2mmseg.py mapping).

    Its attention has a bias-free `qkv` and separate `q_bias` and `v_bias`, so the fused bias is
    split; the key bias is left out, which changes nothing (it adds the same amount to every
    logit of a query, and the softmax does not see it). The final norm and any classifier are
    left out: that backbone has neither. MMSeg loads non-strictly, so its own layer-scale and
    relative-position tables keep their init.
    """
    renamed = {}
    for name, value in state.items():
        if name.startswith(("norm.", "fc_norm.", "head.")):
            continue
        if name.endswith("attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            prefix = name.removesuffix("qkv.bias")
            for suffix, bias in (("q_bias", q_bias), ("v_bias", v_bias)):
                renamed[mmseg_name(prefix + suffix)] = bias.clone()
            continue
        renamed[mmseg_name(name)] = value
    return renamed


def mmseg_name(name: str) -> str:
    for pattern, replacement in MMSEG_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def mae_state(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """MAE's release format, `{"model": state dict}` under timm names: what Detectron2's ViTDet
    (`train.init_checkpoint`) and MAE/BEiT-style code load."""
    return {"model": dict(state)}
