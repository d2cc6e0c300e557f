"""Losses and accuracies of the position objective, and the MAE pixel loss (docs/method.md).

Everything stays on the device: no `.item()`, no Python loops over the batch or the positions.
Each loss takes an optional `normaliser`: the engine passes the sum over the whole global batch
(all ranks, all accumulation micro-batches), so one optimiser step's gradient does not depend
on how the batch was split; without it the loss is normalised over the tensors given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_tokens(logits: torch.Tensor, **per_token: torch.Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"position logits must be [N, V, L], got {tuple(logits.shape)}")
    for name, value in per_token.items():
        if value.shape != logits.shape[:2]:
            raise ValueError(
                f"{name} must be [N, V] = {tuple(logits.shape[:2])}, got {tuple(value.shape)}"
            )


def position_loss(
    logits: torch.Tensor,
    target_positions: torch.Tensor,
    weights: torch.Tensor,
    smoothing: torch.Tensor,
    normaliser: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch-weighted soft cross-entropy.

    logits [N, V, L], target_positions [N, V] (true grid index), weights [N, V] (zero for tokens
    that kept their position), smoothing [L, L] (row t = soft target of position t).
    `sum(m * CE(T, softmax(logits))) / normaliser`, the normaliser defaulting to `sum(m)`.
    """
    _check_tokens(logits, target_positions=target_positions, weights=weights)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    targets = smoothing[target_positions]
    cross_entropy = -(targets * log_probs).sum(dim=-1)
    weights = weights.float()
    if normaliser is None:
        normaliser = weights.sum()
    return (weights * cross_entropy).sum() / normaliser.float().clamp_min(1e-12)


def correct_positions(logits: torch.Tensor, target_positions: torch.Tensor) -> torch.Tensor:
    """[N, V] float: 1 where the most likely position [N, V, L] is the true one [N, V]."""
    return (logits.argmax(dim=-1) == target_positions).float()


def weighted_sum(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum(w * values), sum(w))`: a weighted mean as a ratio that adds up over shards."""
    weights = weights.float()
    return (weights * values).sum(), weights.sum()


def confident_tokens(
    logits: torch.Tensor, target_positions: torch.Tensor, smoothing: torch.Tensor
) -> torch.Tensor:
    """[N, V] bool: the model already gives the true position more probability than the smoothed
    target does (its diagonal value); the confidence-ignore rule skips those tokens.
    """
    _check_tokens(logits, target_positions=target_positions)
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=-1)
        prob_true = torch.gather(probs, -1, target_positions[..., None])[..., 0]
        return prob_true > smoothing.diagonal()[target_positions]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images: [N, C, H, W] -> [N, L, p*p*C] in MAE's (p, q, c) order."""
    n, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(n, c, gh, patch_size, gw, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, gh * gw, patch_size * patch_size * c)


def pixel_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    masked: torch.Tensor,
    patch_size: int,
    normalize_target: bool = True,
    normaliser: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE loss: per-patch MSE, averaged over the masked patches only.

    pred [N, L, p*p*C], images [N, C, H, W], masked [N, L] (True = hidden from the encoder).
    With `normalize_target`, each target patch is standardised by its own mean and variance.
    `normaliser` defaults to the number of masked patches given.
    """
    target = patchify(images, patch_size).float()
    if pred.shape != target.shape:
        raise ValueError(f"pixel prediction {tuple(pred.shape)} != target {tuple(target.shape)}")
    if normalize_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).square().mean(dim=-1)
    masked = masked.float()
    if normaliser is None:
        normaliser = masked.sum()
    return (per_patch * masked).sum() / normaliser.float().clamp_min(1e-12)
