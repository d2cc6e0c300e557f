"""Checkpoints in and out: the original authors' files, MAE's, and timm's."""
