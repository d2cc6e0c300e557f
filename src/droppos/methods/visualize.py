"""`droppos visualize`: pictures of the jigsaw a pre-training checkpoint solves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from droppos.data.transforms import mean_std
from droppos.engine.distributed import resolve_device
from droppos.interop.schema import load_object, normalisation_of
from droppos.methods.base import draw_pictures
from droppos.methods.registry import method_named, pretrained_model
from droppos.sections import (
    DEFAULT_CHECKPOINT,
    CheckpointSection,
    OutputSection,
    Sections,
)
from droppos.visual.jigsaw import picture_batch, save_pictures


@dataclass
class PictureModelSection(CheckpointSection):
    """The checkpoint whose jigsaw is drawn."""

    checkpoint: str = DEFAULT_CHECKPOINT
    """A droppos pre-training checkpoint of a method that solves a jigsaw (DropPos, MP3)."""


@dataclass
class PictureDataSection:
    """The images drawn."""

    source: str = "demo"
    """Images to draw (the val split when the source has one); any source --data.source of
    pretrain takes."""
    images: int = 4
    """How many images: one PNG each."""

    def validate(self) -> None:
        if self.images < 1:
            raise ValueError(f"--data.images must be >= 1, got {self.images}")


@dataclass
class PictureRunSection(OutputSection):
    """Where the pictures go, and how they are computed."""

    output_dir: str = "runs/visualize"
    """Folder for the pictures."""
    seed: int = 0
    """Seed of the masks drawn for the pictures."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = a GPU when there is one, else the CPU."""


@dataclass
class VisualizeConfig(Sections):
    """Pictures of the jigsaw a pre-training checkpoint solves (DropPos: the decoder is needed)."""

    model: PictureModelSection = field(default_factory=PictureModelSection)
    data: PictureDataSection = field(default_factory=PictureDataSection)
    run: PictureRunSection = field(default_factory=PictureRunSection)


def visualize_checkpoint(
    checkpoint: str | Path, source: str, count: int, output: str | Path, seed: int,
    device: torch.device,
) -> list[Path]:  # fmt: skip
    """Pictures of `count` images of `source` for a pre-training checkpoint."""
    content = load_object(checkpoint)
    header, model = pretrained_model(content, checkpoint)
    method = method_named(header.method)
    if not method.draws_jigsaw():
        raise ValueError(
            f"{checkpoint} is a {header.method} checkpoint: there is no jigsaw to draw"
        )
    encoder = header.encoder
    mean, std = mean_std(encoder.in_chans, *normalisation_of(content))
    images = picture_batch(source, encoder.img_size, encoder.in_chans, count, mean, std)
    config = method.config_from_plain(header.model_config)
    progress = content.get("position")  # where the run stood: epochs done, steps taken
    done = progress.get("epoch") if isinstance(progress, dict) else None
    caption = f"{Path(checkpoint).name} ({header.method}" + (
        f", after {done} epoch(s))" if isinstance(done, int) else ")"
    )
    pictures = draw_pictures(
        method, config, model.to(device), images.to(device), mean, std, seed, caption
    )
    return save_pictures(pictures, output, "jigsaw")


def run(config: VisualizeConfig) -> str:
    """The command: draw, and say where the pictures are."""
    config.validate()
    paths = visualize_checkpoint(
        config.model.checkpoint, config.data.source, config.data.images, config.run.output_dir,
        config.run.seed, resolve_device(config.run.device),
    )  # fmt: skip
    names = ", ".join(p.name for p in paths)
    return f"{len(paths)} pictures in {config.run.output_dir}: {names}"
