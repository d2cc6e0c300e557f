"""Pictures of the jigsaw a method solves: a pre-training run's, every few epochs, and
`droppos visualize`'s, of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from droppos.data.transforms import mean_std
from droppos.engine.collectives import computed_by_rank0
from droppos.engine.distributed import resolve_device
from droppos.interop.schema import load_object, normalisation_of, progress_of
from droppos.methods.base import PretrainingMethod
from droppos.methods.registry import method_named, pretrained_model
from droppos.sections import (
    DEFAULT_CHECKPOINT,
    CheckpointSection,
    OutputSection,
    Sections,
)
from droppos.visual.jigsaw import draw_jigsaw, picture_batch, save_pictures

RUN_PICTURES = 4  # images a pre-training run draws every --run.pictures_every epochs


def picture_noise(
    method: type[PretrainingMethod], config: Any, count: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The masks of the pictures: the method's noise for `count` images, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = method.noise_lengths(config)
    return tuple(torch.rand(count, n, generator=generator).to(device) for n in lengths)


def draw_pictures(
    method: type[PretrainingMethod],
    config: Any,
    model: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
    caption: str = "",
) -> list[Any]:
    """One picture per image of the jigsaw `model` solves (none if the method solves none),
    captioned with what it shows (checkpoint or run, epoch)."""
    was_training = model.training
    noise = picture_noise(method, config, len(images), seed, images.device)
    view = method.jigsaw(model, images, noise)
    model.train(was_training)
    return [] if view is None else draw_jigsaw(images, view, mean, std, caption)


@dataclass
class RunPictures:
    """A pre-training run's pictures: the jigsaw of a few fixed images every
    `--run.pictures_every` epochs, into output_dir/pictures (and TensorBoard)."""

    method: type[PretrainingMethod]
    config: Any
    """The `pretrain` command's whole configuration."""
    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: torch.Tensor | None = None

    def due(self, epoch: int) -> bool:
        """Every `--run.pictures_every` epochs and after the last (a short run draws one)."""
        every = self.config.run.pictures_every
        last = epoch + 1 == self.config.optim.epochs
        return bool(every) and ((epoch + 1) % every == 0 or last) and self.method.draws_jigsaw()

    def draw(self, model: nn.Module, epoch: int, is_main: bool) -> dict[str, Any]:
        """On every rank (a sharded model runs collectively); the main rank writes the files.
        -> {"jigsaw/i": picture} for TensorBoard."""
        data, encoder = self.config.data, self.config.model.encoder
        if self.images is None:
            images = picture_batch(
                data.source, encoder.img_size, encoder.in_chans, RUN_PICTURES, self.mean,
                self.std, computed_by_rank0,
            )  # fmt: skip
            self.images = images.to(self.device)
        caption = f"{self.method.name}, epoch {epoch + 1} of {self.config.optim.epochs}"
        drawn = draw_pictures(
            self.method, self.config.model, model, self.images, self.mean, self.std,
            self.config.run.seed, caption,
        )  # fmt: skip
        if not drawn:
            return {}
        if is_main:
            folder = Path(self.config.run.output_dir) / "pictures"
            save_pictures(drawn, folder, f"epoch-{epoch + 1:04d}")
        return {f"jigsaw/{i}": np.asarray(picture) for i, picture in enumerate(drawn)}


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
    """Pictures of the jigsaw a pre-training checkpoint solves (its whole model: the method's
    decoder or head too, not an exported encoder)."""

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
    progress = progress_of(content)  # where the run stood: epochs done, steps taken
    caption = f"{Path(checkpoint).name} ({header.method}" + (
        f", after {progress.epoch} epoch(s))" if progress is not None else ")"
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
