"""The backbone a command's `--model.*` options name: a checkpoint file, or a fresh encoder."""

from __future__ import annotations

from dataclasses import dataclass, field

from droppos.interop.backbone import Backbone, load_backbone, random_backbone
from droppos.models.encoder import EncoderConfig
from droppos.models.sizes import demo_encoder
from droppos.sections import DEFAULT_CHECKPOINT, CheckpointSection


@dataclass
class BackboneSection(CheckpointSection):
    """Which weights to evaluate."""

    checkpoint: str = DEFAULT_CHECKPOINT
    """A droppos pre-training or fine-tuning checkpoint, an original DropPos/MAE checkpoint, an
    exported model.safetensors, or `random`: a fresh encoder shaped by name/img_size/... below."""
    random_init: bool = False
    """Keep only the checkpoint's shape and initialise afresh: the no-pretraining baseline of
    exactly the same model."""
    num_heads: int | None = None
    """Attention heads, for files that do not say (non-standard widths)."""
    encoder: EncoderConfig = field(default_factory=demo_encoder)
    """The shape of `checkpoint: random` (default: the demo's encoder)."""

    def validate(self) -> None:
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"--model.num_heads must be >= 1, got {self.num_heads}")


def backbone_from(section: BackboneSection) -> Backbone:
    """The backbone a command's `--model.*` options name (see BackboneSection)."""
    loaded = None
    if section.checkpoint != "random":
        loaded = load_backbone(section.checkpoint, section.num_heads)
        if not section.random_init:
            return loaded
    fresh = random_backbone(section.encoder if loaded is None else loaded.encoder)
    if loaded is not None:  # the no-pretraining baseline of the same model and data pipeline
        fresh.source = f"random init shaped like {loaded.source}"
        fresh.mean, fresh.std = loaded.mean, loaded.std
    return fresh
