"""DropPos: pre-train Vision Transformers by reconstructing dropped positions (NeurIPS 2023)."""

from droppos.interop.checkpoints import load_original_checkpoint
from droppos.models import (
    DropPosConfig,
    DropPosModel,
    DropPosOutput,
    EncoderConfig,
    MAEModel,
    ViTEncoder,
    create_model,
)

__version__ = "0.1.0"
__all__ = [
    "DropPosConfig",
    "DropPosModel",
    "DropPosOutput",
    "EncoderConfig",
    "MAEModel",
    "ViTEncoder",
    "create_model",
    "load_original_checkpoint",
]
