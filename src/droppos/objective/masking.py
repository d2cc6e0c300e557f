"""Which patches the encoder sees, and which of those lose their position (docs/method.md).

Pure functions over index tensors. Noise follows Hugging Face ViTMAE's convention: per sample,
the *lowest* noise values are kept. Passing the same noise reproduces the same masks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_visible(num_patches: int, patch_mask_ratio: float) -> int:
    """V = int(L * (1 - gamma)); e.g. 196 -> 49 at gamma 0.75."""
    return int(num_patches * (1 - patch_mask_ratio))


def num_position_kept(visible: int, position_drop_ratio: float) -> int:
    """K = int(V * (1 - gamma_pos)); e.g. 49 -> 12 at gamma_pos 0.75."""
    return int(visible * (1 - position_drop_ratio))


@dataclass
class PatchMask:
    """ids_keep: [N, V] positions of the visible patches, in random order (order carries no
    position). ids_restore: [N, L] inverse of the full shuffle (for decoders that unshuffle).
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor

    @property
    def masked(self) -> torch.Tensor:
        """[N, L] bool, True where a patch was hidden from the encoder."""
        return self.ids_restore >= self.ids_keep.shape[1]


def random_patch_mask(noise: torch.Tensor, num_keep: int) -> PatchMask:
    """noise: [N, L] -> the `num_keep` lowest-noise patches per sample."""
    ids_shuffle = torch.argsort(noise, dim=1)
    return PatchMask(ids_keep=ids_shuffle[:, :num_keep], ids_restore=torch.argsort(ids_shuffle, 1))


@dataclass
class PositionDrop:
    """dropped: [N, V] bool, True where the positional embedding is replaced by the mask token.
    ids_dropped: [N, V-K] indices (into the visible tokens) of the dropped ones, in noise order.
    """

    dropped: torch.Tensor
    ids_dropped: torch.Tensor


def random_position_drop(noise: torch.Tensor, num_keep: int) -> PositionDrop:
    """noise: [N, V] -> the `num_keep` lowest-noise visible tokens keep their position."""
    ids_dropped = torch.argsort(noise, dim=1)[:, num_keep:]
    dropped = torch.zeros_like(noise, dtype=torch.bool).scatter_(1, ids_dropped, True)
    return PositionDrop(dropped=dropped, ids_dropped=ids_dropped)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens: [N, L, D], ids: [N, M] -> [N, M, D] (an expanded index, never materialised)."""
    return torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


# -- position mask tokens: what a dropped token receives instead of its embedding ------------


def fill_with_token(
    positions: torch.Tensor, drop: PositionDrop, token: torch.Tensor
) -> torch.Tensor:
    """`learnable` and `zeros` kinds. positions: [N, V, D], token: [1, 1, D] -> [N, V, D]."""
    return torch.where(drop.dropped[..., None], token.to(positions.dtype), positions)


def fill_with_wrong_positions(positions: torch.Tensor, drop: PositionDrop) -> torch.Tensor:
    """`wrong_pos` kind: each dropped token gets the true embedding of another dropped token of
    the same image. The dropped tokens, already in random (noise) order, pass their embeddings one
    step along a cycle: a per-sample derangement whenever two or more are dropped, which fixes
    both defects of the original code (one permutation per batch; fixed points).
    """
    dim = positions.shape[-1]
    index = drop.ids_dropped[..., None].expand(-1, -1, dim)
    true_embeddings = torch.gather(positions, 1, index)
    return positions.scatter(1, index, true_embeddings.roll(shifts=-1, dims=1))
