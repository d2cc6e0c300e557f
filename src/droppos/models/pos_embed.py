"""Fixed 2-D sin-cos positional embeddings (docs/method.md).

The layout follows MAE's `get_2d_sincos_pos_embed` so that freshly built tables are identical to
the ones stored in original DropPos/MAE checkpoints: the first half of the channels encodes the
column index, the second half the row index, each half as `[sin, cos]` over geometric frequencies.
"""

from __future__ import annotations

import torch


def sincos_1d(channels: int, positions: torch.Tensor) -> torch.Tensor:
    """positions: [M] -> [M, channels]."""
    if channels % 2:
        raise ValueError(f"sin-cos embedding needs an even channel count, got {channels}")
    omega = torch.arange(channels // 2, dtype=torch.float64) / (channels / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(channels: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Table for an `h x w` grid in row-major order -> [(1 if cls) + h*w, channels].

    The `[CLS]` row (first, when requested) is all zeros: it carries no position.
    """
    if channels % 4:
        raise ValueError(f"2-D sin-cos embedding needs channels divisible by 4, got {channels}")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat(
        [sincos_1d(channels // 2, cols.flatten()), sincos_1d(channels // 2, rows.flatten())], dim=1
    )
    if cls_token:
        table = torch.cat([torch.zeros(1, channels, dtype=table.dtype), table], dim=0)
    return table.float()
