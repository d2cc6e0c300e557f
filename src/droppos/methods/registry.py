"""Pre-training methods by name: the one table every command looks a method up in.

`@register_method` adds a `PretrainingMethod` subclass; `methods/__init__.py` imports the
built-in ones. `create_model("droppos_vit_base_patch16", ...)` builds any registered method's
model (`{method}_vit_{size}_patch{p}`) or a bare encoder (`vit_{size}_patch{p}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from droppos.interop.schema import PretrainedModel, header_of, load_object
from droppos.methods.base import PretrainingMethod
from droppos.models.encoder import EncoderConfig, ViTEncoder
from droppos.models.sizes import encoder_names, encoder_shape

_METHODS: dict[str, type[PretrainingMethod]] = {}


def register_method(cls: type[PretrainingMethod]) -> type[PretrainingMethod]:
    """Make `cls` a method droppos knows by `cls.name` (a class decorator)."""
    config_name = next((f.default for f in fields(cls.Config) if f.name == "name"), None)
    if config_name != cls.name:
        raise TypeError(f"{cls.__name__}.Config needs a field `name` defaulting to {cls.name!r}")
    _METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Forget a method (tests register throwaway ones)."""
    _METHODS.pop(name, None)


def method_names() -> list[str]:
    return list(_METHODS)


def method_named(name: str) -> type[PretrainingMethod]:
    """The registered method `name`; ValueError listing the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"--model.name {name!r} is not a pre-training method; choose one of: "
            + ", ".join(_METHODS)
        ) from None


def method_of(config: Any) -> type[PretrainingMethod]:
    """The method whose configuration `config` is."""
    for method in _METHODS.values():
        if isinstance(config, method.Config):
            return method
    raise ValueError(f"no pre-training method takes a {type(config).__name__}")


# -- models by name ------------------------------------------------------------------------------


def model_names() -> list[str]:
    """Every name `create_model` accepts, with the default patch size."""
    encoders = encoder_names()
    return [f"{method}_{e}" for method in _METHODS for e in encoders] + encoders


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a model by name; keyword overrides go to the encoder or the method's config.

    `create_model("droppos_vit_base_patch16", img_size=(224, 320), in_chans=1, decoder_depth=8)`.
    What a method does with the overrides is its own `config_from_options`.
    """
    method_name, _, encoder_name = name.rpartition("_vit_")
    encoder_name = f"vit_{encoder_name}" if method_name else name
    shape = encoder_shape(encoder_name)
    if shape is None or (method_name and method_name not in _METHODS):
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    overrides = dict(overrides)
    encoder = EncoderConfig(**{**shape, **_take(EncoderConfig, overrides)})
    if not method_name:
        _reject(name, overrides)
        return ViTEncoder(encoder)
    config = _METHODS[method_name].config_from_options(encoder, overrides)
    _reject(name, overrides)
    return _METHODS[method_name].build_model(config)


def _take(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: overrides.pop(k) for k in list(overrides) if k in names}


def _reject(name: str, leftover: dict[str, Any]) -> None:
    if leftover:
        raise ValueError(f"{name} does not take option(s): {', '.join(sorted(leftover))}")


# -- checkpoints of a method -----------------------------------------------------------------------


def pretrained_model(
    source: str | Path | Mapping[str, Any], name: str | Path | None = None
) -> tuple[PretrainedModel, nn.Module]:
    """The header and the whole model (decoders included) of a `droppos pretrain` checkpoint
    (`source`: a path, or a file's content already read from `name`)."""
    content = source if isinstance(source, Mapping) else load_object(source)
    header = header_of(content)
    if not isinstance(header, PretrainedModel):
        named = name or (source if not isinstance(source, Mapping) else "the checkpoint")
        holds = f"a {header.label}" if header is not None else "no droppos model (a foreign file)"
        raise ValueError(
            f"{named} holds {holds}, not a droppos pre-training checkpoint: give the last.pth "
            "of a `droppos pretrain` run"
        )
    method = method_named(header.method)
    return header, method.model_from_checkpoint(header, content)
