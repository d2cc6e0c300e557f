"""Weighted k-nearest-neighbour classification on L2-normalised features.

Each query's k most cosine-similar training features vote for their labels with weight
exp(similarity / T) (Wu et al. 2018, as used by DINO): k = 20, T = 0.07 by default. Similarities
are one matrix product per block of queries, so memory is bounded by `query_batch x N_train`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from droppos.evaluation.datasets import EvaluationConfig
from droppos.evaluation.features import (
    FeatureBackboneSection,
    FrozenFeatures,
    evaluate_frozen_features,
)
from droppos.evaluation.metrics import as_percent, topk_correct
from droppos.sections import RunSection


@dataclass
class KnnSection:
    """Weighted k-nearest-neighbour vote on L2-normalised features."""

    k: int = 20
    """Neighbours that vote."""
    temperature: float = 0.07
    """Neighbour weight exp(cosine / temperature)."""
    query_batch: int = 1024
    """Queries per similarity matrix product (bounds memory at query_batch x train size)."""

    def validate(self) -> None:
        if self.k < 1 or self.query_batch < 1:
            raise ValueError("--knn.k and --knn.query_batch must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"--knn.temperature must be > 0, got {self.temperature}")


@dataclass
class KnnConfig(EvaluationConfig):
    """Weighted kNN classification on frozen features."""

    model: FeatureBackboneSection = field(default_factory=FeatureBackboneSection)
    knn: KnnSection = field(default_factory=KnnSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/knn"))


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    query_batch: int = 1024,
) -> torch.Tensor:
    """train [N, D] with labels [N], queries [Q, D] -> class votes [Q, num_classes]."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"{train_features.shape[0]} training features but {train_labels.shape[0]} labels"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"feature widths differ: train {train_features.shape[1]}, "
            f"queries {query_features.shape[1]}"
        )
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    votes = []
    for queries in query_features.float().split(query_batch):
        similarity = F.normalize(queries, dim=1) @ train.T  # [B, N]
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        scores = torch.zeros(len(queries), num_classes, device=queries.device)
        votes.append(scores.scatter_add_(1, train_labels[top_index], weights))
    return torch.cat(votes)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    **vote: Any,
) -> dict[str, float]:
    """Top-1 / top-5 (%) of the weighted vote (`vote`: k, temperature, query_batch as in
    `knn_scores`)."""
    scores = knn_scores(train_features, train_labels, query_features, num_classes, **vote)
    return as_percent(topk_correct(scores, query_labels), len(query_labels))


def score_features(config: KnnConfig, features: FrozenFeatures) -> dict[str, Any]:
    """The vote on features already extracted: what `results.json` records."""
    started = time.perf_counter()
    accuracy = knn_accuracy(
        features.train_features,
        features.train_labels,
        features.val_features,
        features.val_labels,
        features.num_classes,
        **asdict(config.knn),
    )
    return {
        **accuracy,
        "k": config.knn.k,
        "temperature": config.knn.temperature,
        "feature": config.model.feature,
        **features.summary(),
        "knn_seconds": round(time.perf_counter() - started, 2),
    }


def check_k(k: int, train_size: int) -> None:
    """Refuse more neighbours than the training split holds (the vote would quietly use them
    all), before any feature is extracted."""
    if k > train_size:
        raise ValueError(
            f"--knn.k {k} is more neighbours than the {train_size} training images: give at "
            f"most {train_size} (the default is 20)"
        )


def run(config: KnnConfig) -> str | None:
    """`droppos knn`: extract both splits' features once, vote, write results.json."""
    done = evaluate_frozen_features(
        config,
        "knn",
        lambda f, _: score_features(config, f),
        lambda train_size: check_k(config.knn.k, train_size),
    )
    if done is None:
        return None
    features, results, path = done
    return (
        f"kNN (k={config.knn.k}, T={config.knn.temperature}) on {config.model.feature} "
        f"features of {features.backbone.source}: top-1 {results['top1']:.2f}, "
        f"top-5 {results['top5']:.2f}; {path}"
    )
