"""Which attention kernel a training run uses: PyTorch's fused one, or q k^T, softmax, v.

timm's attention modules (and droppos's own row-restricted attention, which follows them) hold
the choice in `fused_attn`. The fused kernel (`scaled_dot_product_attention`) is the right one on
GPUs and in fp32. On a CPU under bf16 autocast its backward is slow: measured on a 2-core AMD
EPYC with AVX-512 bf16, forward and backward of one attention took 8.0 ms fused against 0.7 ms
explicit at the demo's shape (64 x 3 heads x 9 tokens x 64) and 75 ms against 21 ms at ViT-B's
(16 x 12 x 197 x 64); in fp32 the two were within 10 %. So a run that trains on a CPU in bf16
computes attention explicitly, keeping each block's attention matrix for the backward (N x heads
x tokens^2 in bf16: 60 MB a block for a ViT-B batch of 64 at 224, nothing at the demo's size),
and every other run, and the evaluation commands, keep the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fused_attention_pays(device: torch.device, precision: str) -> bool:
    """Whether training on `device` at `precision` (resolved: fp32, bf16, fp16) should use the
    fused kernel: everywhere but a CPU in bf16."""
    return not (device.type == "cpu" and precision == "bf16")


def use_fused_attention(model: nn.Module, fused: bool) -> int:
    """Set every attention module of `model` to the fused (True) or explicit kernel; returns
    how many were set. Call it before the model is compiled."""
    modules = [module for module in model.modules() if hasattr(module, "fused_attn")]
    for module in modules:
        module.fused_attn = fused
    return len(modules)


def attend(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [N, H, Q, d], k and v [N, H, K, d], by the kernel
    `attn` (a timm attention module) is set to, as timm's own forward computes it."""
    if getattr(attn, "fused_attn", True):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v
