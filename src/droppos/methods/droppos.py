"""DropPos: the method of docs/method.md in one module (its configuration, model and step).

Encoder (inherited, timm names) -> position decoder without positions -> classify every visible
token's grid position. The objective's pieces (masking, position filling, smoothing, attentive
weights, losses) are pure functions in `droppos.objective`; the model only wires them together,
and the step feeds it this epoch's soft targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from droppos.methods.base import PositionPretext, PretrainBatch, StepResult
from droppos.methods.registry import register_method
from droppos.models.encoder import EncoderConfig, ViTEncoder, init_weights, transformer_blocks
from droppos.models.pixel_decoder import PixelDecoderConfig, PixelDecoderParts, reconstruct_pixels
from droppos.models.sizes import demo_encoder
from droppos.objective.attentive import attentive_weights
from droppos.objective.losses import (
    confident_tokens,
    correct_positions,
    pixel_loss,
    position_loss,
    weighted_sum,
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
from droppos.objective.smoothing import smoothing_map
from droppos.visual.jigsaw import JigsawView

MaskTokenKind = Literal["learnable", "zeros", "wrong_pos"]
AttentiveSource = Literal["full_image", "visible"]


@dataclass
class DropPosConfig:
    """The DropPos model and objective (`--model.name droppos`).

    `droppos pretrain` starts from the demo's values, the defaults `--help` shows; the field
    defaults, what `create_model` builds, are the ImageNet recipe."""

    name: Literal["droppos"] = "droppos"
    """The pre-training method (--model.name): this section's options follow it."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The ViT being pre-trained (what fine-tuning, the probes and export use)."""
    decoder_embed_dim: int = 512
    """Width of the position decoder."""
    decoder_depth: int = 2
    """Transformer blocks of the position decoder."""
    decoder_num_heads: int = 16
    """Attention heads of the position decoder."""
    patch_mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder (gamma)."""
    position_drop_ratio: float = 0.75
    """Fraction of the visible patches whose positional embedding is dropped (gamma_pos)."""
    mask_token_kind: MaskTokenKind = "learnable"
    """What dropped patches get instead of their position: learnable, zeros or wrong_pos."""
    smoothing_sigma: float = 1.0
    """Initial sigma of the Gaussian position smoothing (0 = one-hot targets)."""
    smoothing_decay: bool = True
    """Decay sigma linearly to 0 over the run, once per epoch (the paper's schedule)."""
    attentive: bool = True
    """Weight the loss by each patch's similarity to [CLS] (attentive reconstruction)."""
    attentive_tau: float = 0.1
    """Temperature of the attentive weights' softmax."""
    attentive_source: AttentiveSource = "full_image"
    """full_image (the paper: an extra no-grad pass) or visible (faster: reuse the masked
    pass's features; a departure from the paper, see benchmarks/RESULTS.md)."""
    confidence_ignore: bool = False
    """Skip tokens whose probability at the true position already exceeds the target's."""
    pos_weight: float = 1.0
    """Weight of the position loss (against the pixel loss of the MAE branch)."""
    pixel_branch: PixelDecoderConfig | None = None
    """The MAE pixel-reconstruction branch (multi-task) and its decoder; null = off."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_mask_ratio < 1.0:
            raise ValueError(f"patch_mask_ratio must be in [0, 1), got {self.patch_mask_ratio}")
        # 1.0 is allowed: no visible patch keeps its position (the far end of the paper's sweep).
        if not 0.0 <= self.position_drop_ratio <= 1.0:
            raise ValueError(
                f"position_drop_ratio must be in [0, 1], got {self.position_drop_ratio}"
            )
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
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")
        if self.decoder_depth < 0 or self.decoder_embed_dim < 1:
            raise ValueError("decoder_depth must be >= 0 and decoder_embed_dim >= 1")
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

    loss: total objective (`pos_weight * position_loss [+ pixel_loss]`), each term normalised
    over this batch (`global_loss` normalises over a whole global batch instead).
    position_loss: weighted soft cross-entropy over dropped tokens.
    position_logits: [N, V, L]. ids_keep: [N, V] true positions of the visible tokens.
    position_dropped: [N, V] bool. token_weights: [N, V] the loss weights m.
    position_normaliser: sum of the attentive weights of the dropped tokens (the position
    loss's denominator; confidence-ignored tokens still count, so they add zero loss).
    pixel_loss, pixel_pred ([N, L, p*p*C]), masked_patches ([N, L] bool): MAE branch only.
    The accuracies are computed when read (`metric_sums` has them as sums, for the loop).
    """

    loss: torch.Tensor
    position_loss: torch.Tensor
    position_logits: torch.Tensor
    ids_keep: torch.Tensor
    position_dropped: torch.Tensor
    token_weights: torch.Tensor
    position_normaliser: torch.Tensor
    pos_weight: float = 1.0
    pixel_loss: torch.Tensor | None = None
    pixel_pred: torch.Tensor | None = None
    masked_patches: torch.Tensor | None = None

    @property
    def position_accuracy(self) -> torch.Tensor:
        """Plain top-1 over the dropped tokens."""
        hits, total = self.metric_sums()["position_accuracy"]
        return hits / total.clamp_min(1e-12)

    @property
    def weighted_position_accuracy(self) -> torch.Tensor:
        """Top-1 weighted like the loss."""
        hits, total = self.metric_sums()["weighted_position_accuracy"]
        return hits / total.clamp_min(1e-12)

    def global_loss(
        self, position_normaliser: torch.Tensor, pixel_normaliser: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss with each term's denominator summed over the whole global batch: this
        batch's share of it, so that the shares of all shards add up to the full-batch loss."""
        scale = self.position_normaliser / position_normaliser.clamp_min(1e-12)
        loss = self.pos_weight * self.position_loss * scale
        if self.pixel_loss is not None and self.masked_patches is not None:
            if pixel_normaliser is None:
                raise ValueError("the MAE branch needs its global normaliser too")
            pixel_scale = self.masked_patches.sum() / pixel_normaliser.clamp_min(1e-12)
            loss = loss + self.pixel_loss * pixel_scale
        return loss

    def metric_sums(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every metric as (numerator, denominator) sums, detached: they add up over shards
        and steps, so the logged figures are exact averages over the global batch."""
        correct = correct_positions(self.position_logits.detach(), self.ids_keep)
        normaliser = self.position_normaliser.detach()
        sums = {
            "position_loss": (self.position_loss.detach() * normaliser, normaliser),
            "position_accuracy": weighted_sum(correct, self.position_dropped),
            "weighted_position_accuracy": weighted_sum(correct, self.token_weights.detach()),
        }
        if self.pixel_loss is not None and self.masked_patches is not None:
            count = self.masked_patches.sum().float()
            sums["pixel_loss"] = (self.pixel_loss.detach() * count, count)
        return sums


class DropPosModel(ViTEncoder):
    """ViT encoder + position decoder (+ optional MAE pixel branch), original parameter names."""

    def __init__(self, config: DropPosConfig) -> None:
        super().__init__(config.encoder)
        self.config = config
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

    # -- masking, position dropping, encoder -----------------------------------------------

    def forward_encoder(
        self, images: torch.Tensor, mask: PatchMask, drop: PositionDrop
    ) -> torch.Tensor:
        """images [N, C, H, W] -> [N, 1+V, D]: visible patches only, dropped ones without
        their true position."""
        tokens = gather_tokens(self.embed_patches(images), mask.ids_keep)
        positions = self.pos_embed[0, 1:][mask.ids_keep]
        kind = self.config.mask_token_kind
        if kind == "wrong_pos":
            positions = fill_with_wrong_positions(positions, drop)
        elif kind == "zeros":  # zeros whatever the (unused) parameter holds, as the original
            positions = fill_with_token(positions, drop, torch.zeros_like(self.mask_pos_token))
        else:
            positions = fill_with_token(positions, drop, self.mask_pos_token)
        return self.run_blocks(tokens + positions)

    # -- position decoder ------------------------------------------------------------------

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

    # -- attentive weights and the loss ----------------------------------------------------

    def token_weights(
        self,
        images: torch.Tensor,
        mask: PatchMask,
        drop: PositionDrop,
        latent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """m = dropped * A (or dropped alone): [N, V], no gradient.

        A comes from a separate pass over the full image. The `visible` source is a
        deliberate departure for speed: it reuses the masked pass's own features `latent`
        [N, 1+V, D] (dropped positions, masked context) and saves the whole extra pass.
        """
        cfg = self.config
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

    def masks(
        self, images: torch.Tensor, patch_noise: torch.Tensor, position_noise: torch.Tensor
    ) -> tuple[PatchMask, PositionDrop]:
        """The visible patches and the dropped positions that the noise [N, L], [N, V] fixes."""
        cfg = self.config
        self._check_noise(images, patch_noise, position_noise)
        mask = random_patch_mask(patch_noise, cfg.num_visible)
        return mask, random_position_drop(position_noise, cfg.num_position_kept)

    @torch.no_grad()
    def loss_weights(
        self, images: torch.Tensor, patch_noise: torch.Tensor, position_noise: torch.Tensor
    ) -> torch.Tensor:
        """m [N, V] of `forward` with the same noise, computed ahead of it without gradient.

        With gradient accumulation the engine sums m over a whole global batch before any
        backward (the position loss's exact denominator) and passes it back with
        `forward(..., token_weights=m)`, so the attentive pass still runs once per image.
        """
        mask, drop = self.masks(images, patch_noise, position_noise)
        latent = None
        if self.config.attentive and self.config.attentive_source == "visible":
            latent = self.forward_encoder(images, mask, drop)
        return self.token_weights(images, mask, drop, latent)

    @torch.no_grad()
    def attention_map(self, images: torch.Tensor) -> torch.Tensor:
        """[N, L]: softmax over all patches of cos(f_cls, f_j) / tau on the full image."""
        every = torch.arange(self.num_patches, device=images.device).expand(len(images), -1)
        return attentive_weights(self.forward_features(images), every, self.config.attentive_tau)

    def forward(
        self,
        images: torch.Tensor,
        target_map: torch.Tensor | None = None,
        patch_noise: torch.Tensor | None = None,
        position_noise: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        output: Literal["step", "loss_weights", "attention"] = "step",
    ) -> DropPosOutput | torch.Tensor:
        """One pre-training step's forward.

        images [N, C, H, W]; target_map [L, L]: this epoch's soft targets, a tensor so that a
        compiled forward never recompiles when sigma changes (default: the config's initial
        sigma); patch_noise [N, L] and position_noise [N, V] fix the masks from outside (lower
        noise = kept); token_weights [N, V]: m from `loss_weights`, not to compute it twice.
        `output` asks for something else than the step's `DropPosOutput`: `loss_weights` (m
        [N, V], no gradient) or `attention` (the attentive weights of all L patches of the full
        image [N, L], for pictures). They go through `forward` so that the engine computes them
        through the wrapped (compiled, sharded) model, never around it.
        """
        cfg = self.config
        n, device = images.shape[0], images.device
        if output == "attention":
            return self.attention_map(images)
        if patch_noise is None:
            patch_noise = torch.rand(n, self.num_patches, device=device)
        if position_noise is None:
            position_noise = torch.rand(n, cfg.num_visible, device=device)
        if output == "loss_weights":
            return self.loss_weights(images, patch_noise, position_noise)
        if target_map is None:
            target_map = smoothing_map(self.encoder_config.grid_size, cfg.smoothing_sigma, device)
        mask, drop = self.masks(images, patch_noise, position_noise)

        latent = self.forward_encoder(images, mask, drop)
        logits = self.forward_decoder(latent)
        targets = mask.ids_keep
        weights = token_weights
        if weights is None:
            weights = self.token_weights(images, mask, drop, latent)
        normaliser = weights.float().sum()
        if cfg.confidence_ignore:  # a confident token adds zero loss but stays in the average
            weights = weights * ~confident_tokens(logits, targets, target_map)

        pos_loss = position_loss(logits, targets, weights, target_map, normaliser)
        output = DropPosOutput(
            loss=cfg.pos_weight * pos_loss,
            position_loss=pos_loss,
            position_logits=logits,
            ids_keep=targets,
            position_dropped=drop.dropped,
            token_weights=weights,
            position_normaliser=normaliser,
            pos_weight=cfg.pos_weight,
        )
        if cfg.pixel_branch is not None:
            output.pixel_pred = self.forward_pixels(latent, mask)
            output.masked_patches = mask.masked
            output.pixel_loss = pixel_loss(
                output.pixel_pred,
                images,
                mask.masked,
                self.encoder_config.patch_size,
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
            "position_noise": (n, self.config.num_visible),
        }
        for name, value in (("patch_noise", patch_noise), ("position_noise", position_noise)):
            if tuple(value.shape) != expected[name]:
                raise ValueError(
                    f"{name} must have shape {expected[name]}, got {tuple(value.shape)}"
                )


@register_method
class DropPos(PositionPretext):
    """The DropPos step: soft targets of the epoch in, global position (and pixel) loss out."""

    name = "droppos"
    Config = DropPosConfig
    Model = DropPosModel
    position_accuracy_of = "dropped tokens"

    @classmethod
    def demo_config(cls) -> DropPosConfig:
        return DropPosConfig(
            encoder=demo_encoder(),
            decoder_embed_dim=256,
            decoder_depth=2,
            decoder_num_heads=8,
            patch_mask_ratio=0.5,
        )

    @classmethod
    def config_from_options(cls, encoder: EncoderConfig, options: dict[str, Any]) -> Any:
        """As every method's, and `pixel_branch=True` adds the MAE branch (MAE's decoder)."""
        if isinstance(options.get("pixel_branch"), bool):
            options["pixel_branch"] = PixelDecoderConfig() if options["pixel_branch"] else None
        return super().config_from_options(encoder, options)

    @classmethod
    def noise_lengths(cls, config: DropPosConfig) -> tuple[int, ...]:
        return (config.encoder.num_patches, config.num_visible)

    def ahead(
        self, engine_model: nn.Module, batch: PretrainBatch
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        images, (patch_noise, position_noise) = batch.images, batch.noise
        masks = {"patch_noise": patch_noise, "position_noise": position_noise}
        weights = engine_model(images, **masks, output="loss_weights")
        normalisers = {"position": weights.float().sum()}
        cfg: DropPosConfig = self.config.model
        if cfg.pixel_branch is not None:
            masked = len(images) * (cfg.encoder.num_patches - cfg.num_visible)
            normalisers["pixel"] = torch.full((), float(masked), device=self.device)
        return weights, normalisers

    def forward(
        self, engine_model: nn.Module, batch: PretrainBatch, cache: torch.Tensor | None
    ) -> Any:
        images, (patch_noise, position_noise) = batch.images, batch.noise
        output = engine_model(
            images,
            target_map=self.target_map,
            patch_noise=patch_noise,
            position_noise=position_noise,
            token_weights=cache,
        )
        normalisers = {"position": output.position_normaliser.detach()}
        if output.masked_patches is not None:
            normalisers["pixel"] = output.masked_patches.sum().float()
        return StepResult(
            normalisers,
            lambda total: output.global_loss(total["position"], total.get("pixel")),
            output.metric_sums(),
        )

    @classmethod
    @torch.no_grad()
    def jigsaw(
        cls, model: nn.Module, images: torch.Tensor, noise: tuple[torch.Tensor, ...]
    ) -> JigsawView:
        """What the picture of the jigsaw shows: the model's guesses under `noise`, and the
        attentive weights of every patch of the full image."""
        model.eval()
        out = model(images, patch_noise=noise[0], position_noise=noise[1])
        attention = model(images, output="attention")
        return JigsawView(
            grid=model.encoder_config.grid_size,
            patch_size=model.encoder_config.patch_size,
            ids_keep=out.ids_keep,
            dropped=out.position_dropped,
            logits=out.position_logits,
            attention=attention,
        )
