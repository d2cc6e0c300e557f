"""Dense nearest-neighbour retrieval: segmentation without training (Hummingbird, Balazevic et
al. 2023), the dense twin of `droppos knn`.

A memory bank holds training patch features (L2-normalised) with the label distribution of each
patch's pixels. Each val patch takes the mean of its k most cosine-similar bank patches'
distributions, weighted by softmax(similarity / temperature); the patch-level class scores are
upsampled bilinearly to the label resolution and the best class is the prediction.

Memory is bounded on both sides: the bank holds at most `bank_patches` patches, an equal number
drawn from each training image (seeded; only patches with labelled pixels), as Hummingbird
samples a fixed number of patches per image; queries run `query_batch` patches at a time, so no
step holds more than query_batch x bank similarities, however large the val split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from droppos.data.segmentation import IGNORE


@dataclass
class DenseKnnSection:
    """Dense kNN (Hummingbird): each val patch labelled by its nearest training patches."""

    k: int = 30
    """Bank patches that vote for each val patch."""
    temperature: float = 0.02
    """Neighbour weights: softmax over the k of similarity / temperature."""
    bank_patches: int = 100_000
    """At most this many training patches in the bank (the same number from each image): its
    memory is bank_patches x (feature width + classes) x 4 bytes, 320 MB for ViT-B on ADE20K."""
    query_batch: int = 2048
    """Val patches per similarity product (memory query_batch x bank_patches x 4 bytes)."""

    def validate(self) -> None:
        if min(self.k, self.bank_patches, self.query_batch) < 1:
            raise ValueError("--knn.k, --knn.bank_patches and --knn.query_batch must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"--knn.temperature must be > 0, got {self.temperature}")


def patch_label_distributions(
    masks: torch.Tensor, num_classes: int, patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [N, H, W] (IGNORE = unlabelled) -> per patch, the share of each class among its
    labelled pixels [N, h, w, C], and whether it has any [N, h, w]."""
    labelled = masks != IGNORE
    one_hot = F.one_hot(torch.where(labelled, masks, num_classes).long(), num_classes + 1)
    counts = F.avg_pool2d(one_hot[..., :num_classes].permute(0, 3, 1, 2).float(), patch)
    share = counts.permute(0, 2, 3, 1)
    total = share.sum(-1, keepdim=True)
    return share / total.clamp(min=1e-12), total.squeeze(-1) > 0


@dataclass
class MemoryBank:
    """Training patches: features [M, D] (L2-normalised) and label distributions [M, C]."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)


def patches_per_image(bank_patches: int, images: int) -> int:
    return max(1, math.ceil(bank_patches / max(images, 1)))


def sample_patches(
    features: torch.Tensor,
    masks: torch.Tensor,
    indices: torch.Tensor,
    num_classes: int,
    per_image: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's contribution to the bank: from each image (features [N, D, h, w], its mask
    [N, H, W], its dataset index [N]) `per_image` of its labelled patches, drawn from
    (seed, index) alone so that any split of the data over batches and ranks draws the same.
    -> features [N, per_image, D], distributions [N, per_image, C], kept [N, per_image] (an
    image with fewer labelled patches fills the rest with unkept rows)."""
    n, dim, _, w = features.shape
    share, labelled = patch_label_distributions(masks, num_classes, masks.shape[-1] // w)
    flat_features = F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1)
    picked_features = features.new_zeros((n, per_image, dim), dtype=torch.float32)
    picked_share = share.new_zeros((n, per_image, num_classes))
    kept = torch.zeros(n, per_image, dtype=torch.bool, device=features.device)
    for i in range(n):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(indices[i]))
        candidates = labelled[i].flatten().nonzero().squeeze(1).cpu()
        order = candidates[torch.randperm(len(candidates), generator=generator)][:per_image]
        order = order.to(features.device)
        picked_features[i, : len(order)] = flat_features[i, order]
        picked_share[i, : len(order)] = share[i].flatten(0, 1)[order]
        kept[i, : len(order)] = True
    return picked_features, picked_share, kept


def trim_bank(bank: MemoryBank, limit: int, seed: int) -> MemoryBank:
    """At most `limit` patches, a seeded uniform subset when there are more."""
    if len(bank) <= limit:
        return bank
    keep = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:limit]
    keep = keep.sort().values.to(bank.features.device)
    return MemoryBank(bank.features[keep], bank.labels[keep])


def knn_patch_scores(
    queries: torch.Tensor, bank: MemoryBank, k: int, temperature: float, query_batch: int
) -> torch.Tensor:
    """queries [Q, D] -> class scores [Q, C]: the softmax(similarity / temperature)-weighted
    mean of the k nearest bank patches' label distributions (cosine similarity)."""
    k = min(k, len(bank))
    scores = []
    for chunk in F.normalize(queries.float(), dim=-1).split(query_batch):
        similarity = chunk @ bank.features.T  # [q, M]
        top, index = similarity.topk(k, dim=1)
        weights = torch.softmax(top / temperature, dim=1)  # [q, k]
        scores.append(torch.einsum("qk,qkc->qc", weights, bank.labels[index]))
    return torch.cat(scores)


def knn_segment(
    features: torch.Tensor, bank: MemoryBank, size: int, section: DenseKnnSection
) -> torch.Tensor:
    """Val features [N, D, h, w] -> predicted label maps [N, size, size]."""
    n, dim, h, w = features.shape
    patches = features.flatten(2).transpose(1, 2).reshape(-1, dim)
    scores = knn_patch_scores(
        patches, bank, section.k, section.temperature, section.query_batch
    )  # [N*h*w, C]
    scores = scores.reshape(n, h, w, -1).permute(0, 3, 1, 2)
    upsampled = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)
    return upsampled.argmax(1)
