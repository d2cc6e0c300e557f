"""Evaluation of pre-trained encoders: fine-tuning, linear probe and kNN, on any checkpoint."""

from droppos.evaluation.backbone import Backbone, build_vit, load_backbone
from droppos.evaluation.knn import knn_accuracy, knn_scores

__all__ = ["Backbone", "build_vit", "knn_accuracy", "knn_scores", "load_backbone"]
