"""MP3 (Zhai et al., ICML 2022, "Position Prediction as an Effective Pretraining Strategy").

The ViT sees its patches without any positional embedding. A random subset of them, the
context, supplies the keys and values of every attention layer; every patch (in the context or
not) only queries. A linear head then classifies each patch's position among all grid
positions. With no position to read and only a quarter of the image to attend to, the model
must place each patch from its content and its neighbours'. `docs/method.md` gives the
equations, the defaults and where this implementation departs from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from droppos.methods.base import PositionPretext, PretrainBatch, StepResult
from droppos.methods.registry import register_method
from droppos.models.encoder import EncoderConfig, ViTEncoder, init_weights
from droppos.models.sizes import demo_encoder
from droppos.objective.losses import correct_positions, position_loss
from droppos.objective.masking import num_visible, random_patch_mask
from droppos.visual.jigsaw import JigsawView


@dataclass
class MP3Config:
    """MP3: positions from content alone (`--model.name mp3`).

    `droppos pretrain` starts from the demo's values, the defaults `--help` shows; the field
    defaults, what `create_model` builds, are the ImageNet recipe."""

    name: Literal["mp3"] = "mp3"
    """The pre-training method (--model.name): this section's options follow it."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The ViT being pre-trained (what fine-tuning, the probes and export use)."""
    patch_mask_ratio: float = 0.75
    """Fraction of patches left out of the context: they still query (and have their
    position predicted), but no token attends to them."""
    smoothing_sigma: float = 0.0
    """Gaussian smoothing of the position targets, as DropPos's (0: one-hot, the paper's)."""
    smoothing_decay: bool = True
    """Decay smoothing_sigma linearly to 0 over the epochs (when it is above 0)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_mask_ratio < 1.0:
            raise ValueError(f"patch_mask_ratio must be in [0, 1), got {self.patch_mask_ratio}")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")

    @property
    def num_context(self) -> int:
        return num_visible(self.encoder.num_patches, self.patch_mask_ratio)


@dataclass
class MP3Output:
    """position_logits [N, L, L] (every patch, every position); context [N, L] (1 = in it);
    position_loss: the batch's mean cross-entropy over its patches."""

    position_loss: torch.Tensor
    position_logits: torch.Tensor
    context: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.position_loss

    @property
    def patches(self) -> torch.Tensor:
        """How many patches this batch's loss averages over (a float tensor)."""
        return torch.full((), float(self.context.numel()), device=self.context.device)

    def global_loss(self, normaliser: torch.Tensor) -> torch.Tensor:
        """This batch's share of the loss normalised over the whole global batch."""
        return self.position_loss * self.patches / normaliser.clamp_min(1e-12)

    def metric_sums(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        truth = torch.arange(self.context.shape[1], device=self.context.device)
        correct = correct_positions(self.position_logits.detach(), truth.expand_as(self.context))
        outside = 1.0 - self.context
        count = self.patches
        return {
            "position_loss": (self.position_loss.detach() * count, count),
            "position_accuracy": (correct.sum(), count),
            "outside_context_accuracy": ((correct * outside).sum(), outside.sum()),
        }


class MP3Model(ViTEncoder):
    """The encoder (timm names) and a linear position head. Its `pos_embed` is all zeros: the
    encoder is trained without positions, so that every reader of its checkpoint (the probes,
    fine-tuning, export) sees the features it learnt; a timm model built from the export
    learns its position embedding from zero, as the paper fine-tunes."""

    def __init__(self, config: MP3Config) -> None:
        super().__init__(config.encoder)
        self.config = config
        self.pos_embed.zero_()
        self.position_head = nn.Linear(config.encoder.embed_dim, config.encoder.num_patches)
        self.position_head.apply(init_weights)

    def forward(
        self,
        images: torch.Tensor,
        target_map: torch.Tensor | None = None,
        patch_noise: torch.Tensor | None = None,
    ) -> MP3Output:
        """images [N, C, H, W]; target_map [L, L] soft targets (identity: one-hot);
        patch_noise [N, L] fixes the context from outside (lower = in it)."""
        n, length = images.shape[0], self.num_patches
        if patch_noise is None:
            patch_noise = torch.rand(n, length, device=images.device)
        if tuple(patch_noise.shape) != (n, length):
            raise ValueError(
                f"patch_noise must have shape {(n, length)}, got {tuple(patch_noise.shape)}"
            )
        mask = random_patch_mask(patch_noise, self.config.num_context)
        # [CLS] (row 0) is always context; patch j is row j + 1.
        rows = torch.cat([torch.zeros_like(mask.ids_keep[:, :1]), mask.ids_keep + 1], dim=1)
        x = self.prepend_cls(self.embed_patches(images))  # no positions
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, context=rows, use_reentrant=False)
            else:
                x = block(x, context=rows)
        logits = self.position_head(self.norm(x)[:, 1:])
        if target_map is None:
            target_map = torch.eye(length, device=images.device)
        truth = torch.arange(length, device=images.device).expand(n, -1)
        ones = torch.ones(n, length, device=images.device)
        loss = position_loss(logits, truth, ones, target_map)
        return MP3Output(position_loss=loss, position_logits=logits, context=(~mask.masked).float())


@register_method
class MP3(PositionPretext):
    """The MP3 step: cross-entropy over every patch of the global batch."""

    name = "mp3"
    Config = MP3Config
    Model = MP3Model
    position_accuracy_of = "every patch"

    @classmethod
    def demo_config(cls) -> MP3Config:
        return MP3Config(encoder=demo_encoder(), patch_mask_ratio=0.5)

    @classmethod
    def noise_lengths(cls, config: MP3Config) -> tuple[int, ...]:
        return (config.encoder.num_patches,)

    def ahead(
        self, engine_model: nn.Module, batch: PretrainBatch
    ) -> tuple[None, dict[str, torch.Tensor]]:
        patches = len(batch.images) * self.config.model.encoder.num_patches
        return None, {"position": torch.full((), float(patches), device=self.device)}

    def forward(self, engine_model: nn.Module, batch: PretrainBatch, cache: None) -> Any:
        images, (patch_noise,) = batch.images, batch.noise
        output = engine_model(images, target_map=self.target_map, patch_noise=patch_noise)
        return StepResult(
            {"position": output.patches},
            lambda total: output.global_loss(total["position"]),
            output.metric_sums(),
        )

    @classmethod
    @torch.no_grad()
    def jigsaw(
        cls, model: nn.Module, images: torch.Tensor, noise: tuple[torch.Tensor, ...]
    ) -> JigsawView:
        """Every patch placed by the model under the context `noise` fixes; the heat map shows
        the context (the patches every patch could attend to)."""
        model.eval()
        out = model(images, patch_noise=noise[0])
        n, length = out.context.shape
        every = torch.arange(length, device=images.device).expand(n, -1)
        return JigsawView(
            grid=model.encoder_config.grid_size,
            patch_size=model.encoder_config.patch_size,
            ids_keep=every,
            dropped=torch.ones_like(out.context, dtype=torch.bool),
            logits=out.position_logits,
            attention=out.context,
            titles=("input", "every patch placed", "predicted places", "error (cells)", "context"),
            heat_label="context",
            heat_states=("not in the context", "in the context"),
        )
