"""Scores as counts (top-k hits, a confusion matrix), so that ranks and batches add up before
dividing."""

from __future__ import annotations

from typing import Any

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


def confusion_matrix(
    predicted: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Pixel counts [num_classes, num_classes] (row: true class, column: predicted) of two
    label maps of one shape, pixels labelled `ignore_index` left out. int64 on their device,
    so that batches and ranks add up before any ratio is taken."""
    if predicted.shape != labels.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ"
        )
    scored = labels != ignore_index
    pairs = labels[scored].long() * num_classes + predicted[scored].long()
    counts = torch.bincount(pairs, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(
    confusion: torch.Tensor, classes: list[str] | None = None
) -> dict[str, Any]:
    """mIoU (%) over the classes present, pixel accuracy (%) and each class's IoU, from one
    confusion matrix accumulated over a whole split. A class is present when the ground truth
    or the prediction has it (IoU = intersection / union, union > 0); one neither shows has no
    IoU (null) and is left out of the mean, as MMSegmentation's mIoU does."""
    confusion = confusion.double().cpu()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    iou = torch.where(present, intersection / union.clamp(min=1), torch.nan)
    total = confusion.sum()
    names = classes or [str(i) for i in range(len(iou))]
    return {
        "miou": round(float(iou[present].mean() * 100), 3) if present.any() else 0.0,
        "pixel_accuracy": round(float(intersection.sum() / total * 100), 3) if total else 0.0,
        "classes_present": int(present.sum()),
        "class_iou": {
            name: (round(float(v) * 100, 3) if ok else None)
            for name, v, ok in zip(names, iou, present)
        },
    }
