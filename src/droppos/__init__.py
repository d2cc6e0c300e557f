"""DropPos: pre-train Vision Transformers by reconstructing dropped positions (NeurIPS 2023)."""

from droppos import _openmp  # noqa: F401  (first: before torch is imported)
from droppos._version import __version__
from droppos.interop.backbone import load_original_checkpoint
from droppos.methods import create_model, method_named, method_names, register_method
from droppos.methods.droppos import DropPosConfig, DropPosModel, DropPosOutput
from droppos.methods.mae import MAEConfig, MAEModel, MAEOutput
from droppos.methods.mp3 import MP3Config, MP3Model, MP3Output
from droppos.models import EncoderConfig, ViTEncoder

__all__ = [
    "DropPosConfig",
    "DropPosModel",
    "DropPosOutput",
    "EncoderConfig",
    "MAEConfig",
    "MAEModel",
    "MAEOutput",
    "MP3Config",
    "MP3Model",
    "MP3Output",
    "ViTEncoder",
    "__version__",
    "create_model",
    "load_original_checkpoint",
    "method_named",
    "method_names",
    "register_method",
]
