"""The DropPos pre-training model: SPEC §1 in one screen.

Encoder (inherited, timm names) -> position decoder without positions -> classify every visible
token's grid position. The objective's pieces (masking, position filling, smoothing, attentive
weights, losses) are pure functions in `droppos.objective`; this class only wires them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from droppos.models.encoder import EncoderConfig, ViTEncoder, init_weights, transformer_blocks
from droppos.models.pixel_decoder import PixelDecoderConfig, PixelDecoderParts, reconstruct_pixels
from droppos.objective.attentive import attentive_weights
from droppos.objective.losses import (
    confident_tokens,
    pixel_loss,
    position_accuracy,
    position_loss,
)
from droppos.objective.masking import (
    PatchMask,
    PositionDrop,
    fill_with_token,
    fill_with_wrong_positions,
    gather_tokens,
    num_position_kept,
    num_visible,
    random_patch_mask,
    random_position_drop,
)
from droppos.objective.smoothing import SmoothingMaps

MaskTokenKind = Literal["learnable", "zeros", "wrong_pos"]
AttentiveSource = Literal["full_image", "visible"]


@dataclass
class DropPosConfig:
    """Pre-training model and objective; defaults are the paper's (SPEC §2)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_embed_dim: int = 512
    decoder_depth: int = 2
    decoder_num_heads: int = 16
    patch_mask_ratio: float = 0.75
    position_drop_ratio: float = 0.75
    mask_token_kind: MaskTokenKind = "learnable"
    smoothing_sigma: float = 1.0
    attentive: bool = True
    attentive_tau: float = 0.1
    attentive_source: AttentiveSource = "full_image"
    confidence_ignore: bool = False
    pos_weight: float = 1.0
    pixel_branch: PixelDecoderConfig | None = None

    def __post_init__(self) -> None:
        for name in ("patch_mask_ratio", "position_drop_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.mask_token_kind not in ("learnable", "zeros", "wrong_pos"):
            raise ValueError(
                f"mask_token_kind must be learnable, zeros or wrong_pos, "
                f"got {self.mask_token_kind!r}"
            )
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("decoder_embed_dim must be divisible by decoder_num_heads")
        if self.attentive_source not in ("full_image", "visible"):
            raise ValueError(
                f"attentive_source must be full_image or visible, got {self.attentive_source!r}"
            )
        if self.attentive_tau <= 0:
            raise ValueError(f"attentive_tau must be > 0, got {self.attentive_tau}")
        if num_visible(self.encoder.num_patches, self.patch_mask_ratio) < 1:
            raise ValueError("patch_mask_ratio leaves no visible patch; lower it")

    @property
    def num_visible(self) -> int:
        return num_visible(self.encoder.num_patches, self.patch_mask_ratio)

    @property
    def num_position_kept(self) -> int:
        return num_position_kept(self.num_visible, self.position_drop_ratio)


@dataclass
class DropPosOutput:
    """What one pre-training forward returns; every field stays on the device.

    loss: total objective (`pos_weight * position_loss [+ pixel_loss]`).
    position_loss: weighted soft cross-entropy over dropped tokens (SPEC §1.9).
    position_accuracy: plain top-1 over the dropped tokens.
    weighted_position_accuracy: top-1 weighted like the loss.
    position_logits: [N, V, L]. ids_keep: [N, V] true positions of the visible tokens.
    position_dropped: [N, V] bool. token_weights: [N, V] the loss weights m.
    pixel_loss, pixel_pred ([N, L, p*p*C]): only with the MAE branch.
    """

    loss: torch.Tensor
    position_loss: torch.Tensor
    position_accuracy: torch.Tensor
    weighted_position_accuracy: torch.Tensor
    position_logits: torch.Tensor
    ids_keep: torch.Tensor
    position_dropped: torch.Tensor
    token_weights: torch.Tensor
    pixel_loss: torch.Tensor | None = None
    pixel_pred: torch.Tensor | None = None

    def metrics(self) -> dict[str, torch.Tensor]:
        """Scalars to log, detached, still on the device (the caller decides when to sync)."""
        found = {
            "loss": self.loss,
            "position_loss": self.position_loss,
            "position_accuracy": self.position_accuracy,
            "weighted_position_accuracy": self.weighted_position_accuracy,
        }
        if self.pixel_loss is not None:
            found["pixel_loss"] = self.pixel_loss
        return {name: value.detach() for name, value in found.items()}


class DropPosModel(ViTEncoder):
    """ViT encoder + position decoder (+ optional MAE pixel branch), original parameter names."""

    def __init__(self, config: DropPosConfig) -> None:
        super().__init__(config.encoder)
        self.droppos_config = config
        enc, dim = config.encoder, config.decoder_embed_dim
        self.mask_pos_token = nn.Parameter(
            torch.zeros(1, 1, enc.embed_dim), requires_grad=config.mask_token_kind == "learnable"
        )
        self.decoder_embed = nn.Linear(enc.embed_dim, dim)
        self.decoder_blocks = transformer_blocks(
            dim, config.decoder_depth, config.decoder_num_heads, enc.mlp_ratio
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, enc.num_patches)
        for module in (
            self.decoder_embed,
            self.decoder_blocks,
            self.decoder_norm,
            self.decoder_pred,
        ):
            module.apply(init_weights)
        if config.mask_token_kind == "learnable":
            nn.init.normal_(self.mask_pos_token, std=0.02)
        if config.pixel_branch is not None:
            parts = PixelDecoderParts(enc, config.pixel_branch)
            parts.apply(init_weights)
            self.aux_decoder_embed = parts.embed
            self.mask_token = parts.mask_token
            self.register_buffer("aux_decoder_pos_embed", parts.pos_embed, persistent=True)
            self.aux_decoder_blocks = parts.blocks
            self.aux_decoder_norm = parts.norm
            self.aux_decoder_pred = parts.pred
        self.smoothing_maps = SmoothingMaps(enc.grid_size)

    # -- SPEC §1.2-1.4 ---------------------------------------------------------------------

    def forward_encoder(
        self, images: torch.Tensor, mask: PatchMask, drop: PositionDrop
    ) -> torch.Tensor:
        """images [N, C, H, W] -> [N, 1+V, D]: visible patches only, dropped ones without
        their true position."""
        tokens = gather_tokens(self.embed_patches(images), mask.ids_keep)
        positions = self.pos_embed[0, 1:][mask.ids_keep]
        if self.droppos_config.mask_token_kind == "wrong_pos":
            positions = fill_with_wrong_positions(positions, drop)
        else:  # learnable, or zeros (a frozen all-zero token)
            positions = fill_with_token(positions, drop, self.mask_pos_token)
        return self.run_blocks(tokens + positions)

    # -- SPEC §1.5 -------------------------------------------------------------------------

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+V, D] -> position logits [N, V, L]. No positions, no mask tokens:
        the decoder is permutation-equivariant, so token order cannot leak positions."""
        x = self.decoder_embed(latent)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_pixels(self, latent: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """The MAE branch: latent [N, 1+V, D] -> predicted patches [N, L, p*p*C]."""
        return reconstruct_pixels(
            latent,
            mask,
            self.aux_decoder_embed,
            self.mask_token,
            self.aux_decoder_pos_embed,
            self.aux_decoder_blocks,
            self.aux_decoder_norm,
            self.aux_decoder_pred,
        )

    # -- SPEC §1.8-1.9 ---------------------------------------------------------------------

    def token_weights(
        self,
        images: torch.Tensor,
        mask: PatchMask,
        drop: PositionDrop,
        latent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """m = dropped * A (or dropped alone): [N, V], no gradient.

        A comes from a separate pass over the full image (SPEC §1.8). The `visible` source is a
        deliberate departure for speed: it reuses the masked pass's own features `latent`
        [N, 1+V, D] (dropped positions, masked context) and saves the whole extra pass.
        """
        cfg = self.droppos_config
        dropped = drop.dropped.float()
        if not cfg.attentive:
            return dropped
        with torch.no_grad():
            if cfg.attentive_source == "visible" and latent is not None:
                features = latent.detach()
            else:  # only [CLS] and the visible patches are read: compute just their rows
                features = self.forward_features_at(images, mask.ids_keep)
            rows = torch.arange(mask.ids_keep.shape[1], device=features.device)
            weights = attentive_weights(features, rows.expand_as(mask.ids_keep), cfg.attentive_tau)
        return dropped * weights

    def forward(
        self,
        images: torch.Tensor,
        sigma: float | None = None,
        patch_noise: torch.Tensor | None = None,
        position_noise: torch.Tensor | None = None,
    ) -> DropPosOutput:
        """One pre-training step's forward. images [N, C, H, W]; sigma: smoothing for this epoch
        (default the config's initial sigma); patch_noise [N, L] and position_noise [N, V] fix the
        masks from outside (lower noise = kept)."""
        cfg = self.droppos_config
        n, device = images.shape[0], images.device
        if patch_noise is None:
            patch_noise = torch.rand(n, self.num_patches, device=device)
        if position_noise is None:
            position_noise = torch.rand(n, cfg.num_visible, device=device)
        self._check_noise(images, patch_noise, position_noise)
        mask = random_patch_mask(patch_noise, cfg.num_visible)
        drop = random_position_drop(position_noise, cfg.num_position_kept)

        latent = self.forward_encoder(images, mask, drop)
        logits = self.forward_decoder(latent)
        targets = mask.ids_keep
        smoothing = self.smoothing_maps(cfg.smoothing_sigma if sigma is None else sigma, device)
        weights = self.token_weights(images, mask, drop, latent)
        if cfg.confidence_ignore:
            weights = weights * ~confident_tokens(logits, targets, smoothing)

        pos_loss = position_loss(logits, targets, weights, smoothing)
        output = DropPosOutput(
            loss=cfg.pos_weight * pos_loss,
            position_loss=pos_loss,
            position_accuracy=position_accuracy(logits.detach(), targets, drop.dropped),
            weighted_position_accuracy=position_accuracy(logits.detach(), targets, weights),
            position_logits=logits,
            ids_keep=targets,
            position_dropped=drop.dropped,
            token_weights=weights,
        )
        if cfg.pixel_branch is not None:
            output.pixel_pred = self.forward_pixels(latent, mask)
            output.pixel_loss = pixel_loss(
                output.pixel_pred,
                images,
                mask.masked,
                self.config.patch_size,
                cfg.pixel_branch.normalize_target,
            )
            output.loss = output.loss + output.pixel_loss
        return output

    def _check_noise(
        self, images: torch.Tensor, patch_noise: torch.Tensor, position_noise: torch.Tensor
    ) -> None:
        n = images.shape[0]
        expected = {
            "patch_noise": (n, self.num_patches),
            "position_noise": (n, self.droppos_config.num_visible),
        }
        for name, value in (("patch_noise", patch_noise), ("position_noise", position_noise)):
            if tuple(value.shape) != expected[name]:
                raise ValueError(
                    f"{name} must have shape {expected[name]}, got {tuple(value.shape)}"
                )
