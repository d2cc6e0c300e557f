"""Pre-training methods: one module each, registered by name (`methods/registry.py`).

Importing this package registers the built-in ones; a new method is its module plus one line
in the import below.
"""

from droppos.methods import droppos, mae, mp3  # noqa: F401  (registers the built-in methods)
from droppos.methods.base import PretrainingMethod
from droppos.methods.registry import (
    create_model,
    method_named,
    method_names,
    method_of,
    model_names,
    pretrained_model,
    register_method,
    unregister_method,
)

DEFAULT_METHOD = droppos.DropPos.name

__all__ = [
    "DEFAULT_METHOD",
    "PretrainingMethod",
    "create_model",
    "method_named",
    "method_names",
    "method_of",
    "model_names",
    "pretrained_model",
    "register_method",
    "unregister_method",
]
