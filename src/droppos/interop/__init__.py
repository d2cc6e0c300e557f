"""Checkpoints in and out: droppos's own files (`schema`), any ViT as a backbone, exports."""
