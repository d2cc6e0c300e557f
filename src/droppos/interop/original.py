"""Read checkpoints written by the original DropPos (and MAE) code (SPEC §5).

Their weights sit under `model` or `state_dict` (or at the top level), and DDP-wrapped saves
carry a `module.` prefix. Names are otherwise identical to ours, so `load_state_dict(strict=True)`
works after unwrapping.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint object and strip DDP/compile prefixes."""
    state: Mapping[str, Any] = checkpoint
    for key in WRAPPER_KEYS:
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner:
            state = inner
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            "no tensors found in checkpoint (looked at the top level and under "
            f"{', '.join(WRAPPER_KEYS)})"
        )
    cleaned = {}
    for name, value in tensors.items():
        for prefix in PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        cleaned[name] = value
    return cleaned


def load_checkpoint_object(path: str | Path) -> Mapping[str, Any]:
    """The whole object in a `.pth`/`.pt` (weights-only unpickling) or `.safetensors` file.

    The original code saves its `argparse.Namespace` under `args`; it is the one non-tensor class
    allowed, so full original checkpoints load without trusting arbitrary pickles.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.pth`/`.pt` (torch pickle, weights only) or `.safetensors` file -> a clean state dict."""
    return unwrap_state_dict(load_checkpoint_object(path))


def load_original_checkpoint(
    model: nn.Module, source: str | Path | Mapping[str, Any], strict: bool = True
) -> nn.modules.module._IncompatibleKeys:
    """Load an original DropPos/MAE checkpoint (path or loaded object) into `model`.

    On a mismatch, the error names the missing and unexpected keys so the user can tell which
    configuration the file was trained with (decoder depth, MAE branch, model size).
    """
    state = unwrap_state_dict(source) if isinstance(source, Mapping) else read_checkpoint(source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if strict and (missing or unexpected or mismatched):
        raise ValueError(describe_mismatch(missing, unexpected, mismatched))
    return model.load_state_dict(state, strict=strict)


def describe_mismatch(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """One line naming (the first few) missing, unexpected and mis-shaped keys."""

    def head(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

    parts = ["checkpoint does not match this model configuration"]
    if missing:
        parts.append(f"missing from file: {head(missing)}")
    if unexpected:
        parts.append(f"not in model: {head(unexpected)}")
    if mismatched:
        parts.append(f"shape differs: {head(mismatched)}")
    return "; ".join(parts)
