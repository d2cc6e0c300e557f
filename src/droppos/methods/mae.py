"""Plain MAE under the same encoder, engine and checkpoint names as MAE's own (`decoder_*`).

The baseline DropPos is compared against: same encoder and masking, no position dropping,
normalised-pixel reconstruction of the masked patches only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from droppos.methods.base import PretrainBatch, PretrainingMethod, StepResult
from droppos.methods.registry import register_method
from droppos.models.encoder import EncoderConfig, ViTEncoder, init_weights
from droppos.models.pixel_decoder import PixelDecoderConfig, PixelDecoderParts, reconstruct_pixels
from droppos.models.sizes import demo_encoder
from droppos.objective.losses import pixel_loss
from droppos.objective.masking import gather_tokens, num_visible, random_patch_mask


@dataclass
class MAEConfig:
    """Plain MAE, the baseline (`--model.name mae`).

    `droppos pretrain` starts from the demo's values, the defaults `--help` shows; the field
    defaults, what `create_model` builds, are the ImageNet recipe."""

    name: Literal["mae"] = "mae"
    """The pre-training method (--model.name): this section's options follow it."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The ViT being pre-trained (what fine-tuning, the probes and export use)."""
    decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    """The pixel decoder."""
    patch_mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder (and reconstructed)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_mask_ratio < 1.0:
            raise ValueError(f"patch_mask_ratio must be in [0, 1), got {self.patch_mask_ratio}")

    @property
    def num_visible(self) -> int:
        return num_visible(self.encoder.num_patches, self.patch_mask_ratio)


@dataclass
class MAEOutput:
    """loss: normalised-pixel MSE on masked patches; pixel_pred [N, L, p*p*C]; masked [N, L]."""

    loss: torch.Tensor
    pixel_pred: torch.Tensor
    masked: torch.Tensor

    def global_loss(self, pixel_normaliser: torch.Tensor) -> torch.Tensor:
        """This batch's share of the loss normalised over the whole global batch."""
        return self.loss * self.masked.sum() / pixel_normaliser.clamp_min(1e-12)

    def metric_sums(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The pixel loss as (numerator, denominator) sums that add up over shards."""
        count = self.masked.sum().float()
        return {"pixel_loss": (self.loss.detach() * count, count)}


class MAEModel(ViTEncoder):
    def __init__(self, config: MAEConfig) -> None:
        super().__init__(config.encoder)
        self.config = config
        parts = PixelDecoderParts(config.encoder, config.decoder)
        parts.apply(init_weights)
        self.decoder_embed = parts.embed
        self.mask_token = parts.mask_token
        self.register_buffer("decoder_pos_embed", parts.pos_embed, persistent=True)
        self.decoder_blocks = parts.blocks
        self.decoder_norm = parts.norm
        self.decoder_pred = parts.pred

    def forward(self, images: torch.Tensor, patch_noise: torch.Tensor | None = None) -> MAEOutput:
        """images [N, C, H, W]; patch_noise [N, L] fixes the mask from outside (lower = kept)."""
        n = images.shape[0]
        if patch_noise is None:
            patch_noise = torch.rand(n, self.num_patches, device=images.device)
        if tuple(patch_noise.shape) != (n, self.num_patches):
            raise ValueError(
                f"patch_noise must have shape {(n, self.num_patches)}, "
                f"got {tuple(patch_noise.shape)}"
            )
        mask = random_patch_mask(patch_noise, self.config.num_visible)
        tokens = self.embed_patches(images) + self.pos_embed[:, 1:]
        latent = self.run_blocks(gather_tokens(tokens, mask.ids_keep))
        pred = reconstruct_pixels(
            latent,
            mask,
            self.decoder_embed,
            self.mask_token,
            self.decoder_pos_embed,
            self.decoder_blocks,
            self.decoder_norm,
            self.decoder_pred,
        )
        loss = pixel_loss(
            pred,
            images,
            mask.masked,
            self.encoder_config.patch_size,
            self.config.decoder.normalize_target,
        )
        return MAEOutput(loss=loss, pixel_pred=pred, masked=mask.masked)


@register_method
class MAE(PretrainingMethod):
    """The plain-MAE step: normalised-pixel loss over the global batch's masked patches."""

    name = "mae"
    Config = MAEConfig
    Model = MAEModel

    @classmethod
    def demo_config(cls) -> MAEConfig:
        return MAEConfig(encoder=demo_encoder(), patch_mask_ratio=0.5)

    @classmethod
    def noise_lengths(cls, config: MAEConfig) -> tuple[int, ...]:
        return (config.encoder.num_patches,)

    def ahead(
        self, engine_model: nn.Module, batch: PretrainBatch
    ) -> tuple[None, dict[str, torch.Tensor]]:
        cfg: MAEConfig = self.config.model
        masked = len(batch.images) * (cfg.encoder.num_patches - cfg.num_visible)
        return None, {"pixel": torch.full((), float(masked), device=self.device)}

    def forward(self, engine_model: nn.Module, batch: PretrainBatch, cache: None) -> Any:
        images, (patch_noise,) = batch.images, batch.noise
        output = engine_model(images, patch_noise=patch_noise)
        return StepResult(
            {"pixel": output.masked.sum().float()},
            lambda total: output.global_loss(total["pixel"]),
            output.metric_sums(),
        )
