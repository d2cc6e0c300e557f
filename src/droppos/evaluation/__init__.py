"""Evaluation of pre-trained encoders: fine-tuning, linear probe and kNN, on any checkpoint."""

from droppos.evaluation.knn import knn_accuracy, knn_scores

__all__ = ["knn_accuracy", "knn_scores"]
