"""Top-k accuracy as counts, so that ranks and batches add up before dividing."""

from __future__ import annotations

import torch


def topk_correct(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> torch.Tensor:
    """scores [N, C], labels [N] -> [len(ks)] number of samples whose label is in the top k.

    k is capped at the number of classes (top-5 of a 3-class problem is top-3).
    """
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(
            f"expected scores [N, C] and labels [N], got {tuple(scores.shape)} "
            f"and {tuple(labels.shape)}"
        )
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, : min(k, scores.shape[1])].any(dim=1).sum() for k in ks])


def as_percent(correct: torch.Tensor, total: int, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Counts from `topk_correct` -> {"top1": %, "top5": %}."""
    values = (correct.double() * 100 / max(total, 1)).tolist()
    return {f"top{k}": round(v, 3) for k, v in zip(ks, values)}
