"""Weighted k-nearest-neighbour classification on L2-normalised features.

Each query's k most cosine-similar training features vote for their labels with weight
exp(similarity / T) (Wu et al. 2018, as used by DINO): k = 20, T = 0.07 by default. Similarities
are one matrix product per block of queries, so memory is bounded by `query_batch x N_train`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from droppos.data import dist_world
from droppos.evaluation.config import KnnConfig
from droppos.evaluation.features import FrozenFeatures
from droppos.evaluation.metrics import as_percent, topk_correct
from droppos.evaluation.report import write_results


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
    k: int = 20,
    temperature: float = 0.07,
    query_batch: int = 1024,
) -> dict[str, float]:
    """Top-1 / top-5 (%) of the weighted vote."""
    scores = knn_scores(
        train_features, train_labels, query_features, num_classes, k, temperature, query_batch
    )
    return as_percent(topk_correct(scores, query_labels), len(query_labels))


def run_knn(config: KnnConfig, features: FrozenFeatures) -> dict[str, Any]:
    """`droppos knn` once the features are there: vote, score, write results.json."""
    started = time.perf_counter()
    accuracy = knn_accuracy(
        features.train_features,
        features.train_labels,
        features.val_features,
        features.val_labels,
        features.num_classes,
        config.knn.k,
        config.knn.temperature,
        config.knn.query_batch,
    )
    results = {
        **accuracy,
        "k": config.knn.k,
        "temperature": config.knn.temperature,
        "feature": config.model.feature,
        **features.summary(),
        "knn_seconds": round(time.perf_counter() - started, 2),
    }
    if dist_world()[1] == 0:
        write_results(config.run.output_dir, "knn", results)
    return results
