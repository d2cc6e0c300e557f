"""The networks every method shares: the ViT encoder, MAE's pixel decoder, sin-cos tables."""

from droppos.models.encoder import EncoderConfig, ViTEncoder
from droppos.models.pixel_decoder import PixelDecoderConfig
from droppos.models.sizes import ENCODER_SIZES, demo_encoder, encoder_shape

__all__ = [
    "ENCODER_SIZES",
    "EncoderConfig",
    "PixelDecoderConfig",
    "ViTEncoder",
    "demo_encoder",
    "encoder_shape",
]
