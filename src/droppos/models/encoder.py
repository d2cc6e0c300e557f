"""The ViT encoder: timm's patch embedding and pre-norm blocks, fixed 2-D sin-cos positions.

Parameter names are timm's `VisionTransformer` names and the original DropPos names:
`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.*`, `norm`. Export to timm is therefore
a copy, and original checkpoints load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from droppos.models.attention import attend
from droppos.models.pos_embed import sincos_2d


def pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


MAX_DEPTH, MAX_WIDTH, MAX_PATCHES, MAX_CHANNELS, MAX_MLP_RATIO = 256, 16384, 65536, 64, 16.0


@dataclass
class EncoderConfig:
    """Shape of the ViT encoder. Defaults are ViT-B/16 at 224."""

    img_size: int | tuple[int, int] = 224
    """Input resolution: one int, or height and width."""
    patch_size: int = 16
    """Side of the square patches."""
    in_chans: int = 3
    """Image channels the model takes (greyscale or RGB images are converted to it)."""
    embed_dim: int = 768
    """Encoder width."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of embed_dim."""

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.img_size, list):  # from YAML or JSON
            self.img_size = pair(self.img_size)
        h, w = pair(self.img_size)
        # Past these no ViT has been trained; a checkpoint's metadata that claims more is a bad
        # (or hostile) file, refused before any weight is allocated.
        side = max(1, self.patch_size)
        bounds = {"depth": (self.depth, MAX_DEPTH), "embed_dim": (self.embed_dim, MAX_WIDTH),
                  "patches": ((h // side) * (w // side), MAX_PATCHES),
                  "in_chans": (self.in_chans, MAX_CHANNELS),
                  "mlp_ratio": (self.mlp_ratio, MAX_MLP_RATIO)}  # fmt: skip
        for name, (value, bound) in bounds.items():
            if value > bound:
                raise ValueError(f"encoder {name} {value} is beyond any ViT (at most {bound})")
        if min(h, w, self.patch_size, self.in_chans, self.embed_dim, self.num_heads) < 1:
            raise ValueError(
                "encoder img_size, patch_size, in_chans, embed_dim and num_heads must be "
                f"positive, got img_size {self.img_size}, patch_size {self.patch_size}, in_chans "
                f"{self.in_chans}, embed_dim {self.embed_dim}, num_heads {self.num_heads}"
            )
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sin-cos)")

    def _check_types(self) -> None:
        """Whole numbers where whole numbers belong (a file's metadata or a `config.json` may
        say `"12"`, `12.5` or `true`): one line naming the field, not a TypeError later."""

        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        sizes = self.img_size if isinstance(self.img_size, list | tuple) else [self.img_size]
        if not (1 <= len(sizes) <= 2 and all(whole(v) for v in sizes)):
            raise ValueError(
                f"encoder img_size must be a whole number or two, got {self.img_size!r}"
            )
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if not whole(getattr(self, name)):
                raise ValueError(
                    f"encoder {name} must be a whole number, got {getattr(self, name)!r}"
                )
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0:
            raise ValueError(f"encoder mlp_ratio must be a positive number, got {ratio!r}")
        if not math.isfinite(ratio):
            raise ValueError(f"encoder mlp_ratio must be finite, got {ratio!r}")

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return pair(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return (h // self.patch_size, w // self.patch_size)

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w


def transformer_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """timm pre-norm blocks as in DropPos and MAE: qkv bias, LayerNorm eps 1e-6, fused attention
    (explicit where a training run says so: `models/attention.py`)."""
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(
        EncoderBlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)
        for _ in range(depth)
    )


def init_weights(module: nn.Module) -> None:
    """MAE/DropPos init : xavier-uniform Linear, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class EncoderBlock(Block):
    """timm's pre-norm Block (its parameter names), which can also compute only some rows."""

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, T, D] -> the block's output [N, T, D]; with `rows` [N, R] its output at those
        rows only [N, R, D]; with `context` [N, C] its output when only the rows `context` are
        attended to (keys and values from them alone; every row queries). Both through
        `forward`, so that a sharded block gathers its parameters."""
        if rows is None and context is None:
            return super().forward(x)
        return _block_at_rows(self, x, rows, context)


def _block_at_rows(
    block: Block, x: torch.Tensor, rows: torch.Tensor | None, context: torch.Tensor | None = None
) -> torch.Tensor:
    """`block(x)` [N, T, D] computed for the query rows `rows` [N, R] only (all rows when None),
    attending to the rows `context` [N, C] only (all rows when None).

    Without `context`, keys and values come from every token, so attention is exactly the full
    block's; the queries, output projection and MLP of rows nobody reads are never computed.
    With it, keys and values are computed for the context rows alone (MP3's attention).
    """
    attn = block.attn  # timm's plain Attention (`transformer_blocks` builds no gated one)

    def gather(values: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        if ids is None:
            return values
        return torch.gather(values, 1, ids[..., None].expand(-1, -1, values.shape[-1]))

    n = x.shape[0]
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim
    picked = gather(x, rows)
    normed = block.norm1(x)
    q_weight, kv_weight = attn.qkv.weight.split([width, 2 * width])
    q_bias, kv_bias = (
        (None, None) if attn.qkv.bias is None else attn.qkv.bias.split([width, 2 * width])
    )
    q = F.linear(gather(normed, rows), q_weight, q_bias).view(n, -1, heads, head_dim)
    kv = F.linear(gather(normed, context), kv_weight, kv_bias).view(n, -1, 2, heads, head_dim)
    k, v = kv.permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q.transpose(1, 2)), attn.k_norm(k)
    dropout = attn.attn_drop.p if block.training else 0.0
    out = attend(attn, q, k, v, dropout).transpose(1, 2).reshape(n, -1, width)
    out = attn.proj(getattr(attn, "norm", nn.Identity())(out))
    picked = picked + block.drop_path1(block.ls1(attn.proj_drop(out)))
    return picked + block.drop_path2(block.ls2(block.mlp(block.norm2(picked))))


class ViTEncoder(nn.Module):
    """Pre-norm ViT over `[CLS] + tokens` with a fixed sin-cos table (`[CLS]` row is zero)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.encoder_config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            embed_dim=dim,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = transformer_blocks(dim, config.depth, config.num_heads, config.mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False
        self._init_encoder()
        # A persistent buffer: fixed (never trained, never decayed), yet saved under `pos_embed`.
        self.register_buffer("pos_embed", sincos_2d(dim, config.grid_size)[None], persistent=True)

    def _init_encoder(self) -> None:
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    @property
    def num_patches(self) -> int:
        return self.encoder_config.num_patches

    # -- building blocks of every forward -------------------------------------------------

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """images: [N, C, H, W] -> patch tokens without positions [N, L, D]."""
        return self.patch_embed(images)

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """Positioned tokens [N, T, D] -> `[CLS] + tokens` [N, 1+T, D]."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls.to(tokens.dtype), tokens], dim=1)

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """Positioned tokens [N, T, D] -> `[CLS] + tokens` encoded and normed [N, 1+T, D]."""
        x = self.prepend_cls(tokens)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.norm(x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in backward instead of keeping its activations (timm's
        switch of the same name; no gradient changes)."""
        self.grad_checkpointing = enable

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Whole image, every position embedded: [N, C, H, W] -> final-norm features [N, 1+L, D]."""
        tokens = self.embed_patches(images) + self.pos_embed[:, 1:]
        return self.run_blocks(tokens)

    def forward_features_at(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Whole-image features of `[CLS]` and of the patches `ids` [N, R] only: [N, 1+R, D].

        Equals `forward_features(images)` gathered at those rows. Every block but the last still
        runs over all tokens (they are the last block's keys and values); the last block computes
        queries, projection and MLP for the requested rows alone. The attentive pass
        needs only `[CLS]` and the visible patches, so this saves most of one block's work.
        """
        x = self.prepend_cls(self.embed_patches(images) + self.pos_embed[:, 1:])
        for block in self.blocks[:-1]:
            x = block(x)
        rows = torch.cat([torch.zeros_like(ids[:, :1]), ids + 1], dim=1)
        return self.norm(self.blocks[-1](x, rows=rows))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)

    # -- timm API discipline: optimisers never parse names by hand ----------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens and fixed tables; biases and norms are excluded by dimensionality."""
        return {name for name, _ in self.named_parameters() if name.endswith("_token")} | {
            "pos_embed"
        }
