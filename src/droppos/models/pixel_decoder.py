"""MAE's pixel decoder, shared by the DropPos multi-task branch and the plain-MAE baseline.

The two models keep their parts under different names (`aux_decoder_*` in DropPos checkpoints,
`decoder_*` in MAE's), so the parts live on the model and this module supplies what they are and
how they run. Unlike the position decoder, this one *does* use sin-cos positions and mask tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from droppos.models.encoder import EncoderConfig, transformer_blocks
from droppos.models.pos_embed import sincos_2d
from droppos.objective.masking import PatchMask


@dataclass
class PixelDecoderConfig:
    """MAE's decoder defaults: 8 blocks, 512 wide, 16 heads; normalised-pixel targets."""

    embed_dim: int = 512
    """Width of the pixel decoder."""
    depth: int = 8
    """Transformer blocks of the pixel decoder."""
    num_heads: int = 16
    """Attention heads of the pixel decoder."""
    normalize_target: bool = True
    """Predict each patch's pixels standardised by its own mean and variance."""


class PixelDecoderParts(nn.Module):
    """Container used only at construction; the model re-registers each part under its name."""

    def __init__(self, encoder: EncoderConfig, config: PixelDecoderConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = sincos_2d(dim, encoder.grid_size)[None]
        self.blocks = transformer_blocks(dim, config.depth, config.num_heads, encoder.mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, encoder.patch_size**2 * encoder.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)


def reconstruct_pixels(
    latent: torch.Tensor,
    mask: PatchMask,
    embed: nn.Module,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
    blocks: nn.ModuleList,
    norm: nn.Module,
    pred: nn.Module,
) -> torch.Tensor:
    """latent: [N, 1+V, D] -> predicted patches [N, L, p*p*C] (MAE's forward_decoder)."""
    x = embed(latent)
    n, visible_plus_cls, dim = x.shape
    num_masked = mask.ids_restore.shape[1] - (visible_plus_cls - 1)
    tokens = torch.cat([x[:, 1:], mask_token.to(x.dtype).expand(n, num_masked, dim)], dim=1)
    index = mask.ids_restore[..., None].expand(-1, -1, dim)
    tokens = torch.gather(tokens, 1, index)
    x = torch.cat([x[:, :1], tokens], dim=1) + pos_embed
    for block in blocks:
        x = block(x)
    return pred(norm(x))[:, 1:]
