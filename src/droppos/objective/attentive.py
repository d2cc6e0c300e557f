"""Attentive reconstruction weights (docs/method.md).

Patches that look like the `[CLS]` summary of the whole image count more; look-alike background
patches, whose exact position is ambiguous anyway, count less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attentive_weights(features: torch.Tensor, ids_keep: torch.Tensor, tau: float) -> torch.Tensor:
    """features: [N, 1+L, D] final-norm encoder output on the full image; ids_keep: [N, V].

    Returns [N, V]: softmax_j(cos(f_cls, f_j) / tau) over all L patches, gathered at the visible
    ones and renormalised to sum to 1 per image. Gather-then-renormalise equals a softmax over the
    visible patches' similarities, which is what is computed, in fp32 even under autocast (which
    would run the similarity's matrix product in bf16: at tau 0.1 that error is multiplied by 10
    inside the exponential).
    """
    if features.ndim != 3 or ids_keep.ndim != 2 or features.shape[0] != ids_keep.shape[0]:
        raise ValueError(
            f"expected features [N, 1+L, D] and ids_keep [N, V], got {tuple(features.shape)} "
            f"and {tuple(ids_keep.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"attentive tau must be > 0, got {tau}")
    with torch.autocast(features.device.type, enabled=False):
        features = F.normalize(features.float(), dim=-1)
        similarity = torch.einsum("nd,nld->nl", features[:, 0], features[:, 1:])
        return torch.softmax(torch.gather(similarity, 1, ids_keep) / tau, dim=1)
