"""The backbone a command's `--model.*` options name: a checkpoint file, or a fresh encoder."""

from __future__ import annotations

from droppos.evaluation.config import BackboneSection
from droppos.interop.checkpoints import Backbone, load_backbone, random_backbone


def backbone_from(section: BackboneSection) -> Backbone:
    """The backbone a command's `--model.*` options name (see BackboneSection)."""
    if section.checkpoint == "random":
        return random_backbone(section.encoder)
    backbone = load_backbone(section.checkpoint, section.num_heads)
    if not section.random_init:
        return backbone
    fresh = random_backbone(backbone.encoder)
    fresh.source = f"random init shaped like {backbone.source}"
    fresh.mean, fresh.std = backbone.mean, backbone.std  # the data pipeline stays the same
    return fresh
