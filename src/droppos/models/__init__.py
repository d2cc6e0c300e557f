"""ViT encoder, DropPos and MAE pre-training models, and the name registry."""

from droppos.models.droppos import DropPosConfig, DropPosModel, DropPosOutput
from droppos.models.encoder import EncoderConfig, ViTEncoder
from droppos.models.mae import MAEConfig, MAEModel, MAEOutput
from droppos.models.pixel_decoder import PixelDecoderConfig
from droppos.models.registry import create_model, model_names

__all__ = [
    "DropPosConfig",
    "DropPosModel",
    "DropPosOutput",
    "EncoderConfig",
    "MAEConfig",
    "MAEModel",
    "MAEOutput",
    "PixelDecoderConfig",
    "ViTEncoder",
    "create_model",
    "model_names",
]
