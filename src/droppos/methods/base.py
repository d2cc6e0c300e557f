"""What a pre-training method is to droppos: one class, its configuration and its step.

A method subclasses `PretrainingMethod` and says, at class level, everything the rest of the
package asks of it: its name and typed configuration (the `--model.*` section, with an `encoder`
field), its demo preset, how to build its model, how many per-sample noise vectors its masks
need (drawn in the loader, `data/mask_noise.py`), how a checkpoint of it rebuilds itself, and
optionally the jigsaw it can draw. An instance is its training step, as the one training loop
(`engine/loop.py:TrainingMethod`) drives it; it calls the model only through the wrapped module
the loop hands it. `@register_method` (`methods/registry.py`) makes it reachable by name from the
command line, resume, export, visualize and the benchmarks.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from droppos.data.device_decode import decode_batch
from droppos.data.transforms import DeviceNormaliser, mean_std
from droppos.engine.collectives import computed_by_rank0
from droppos.engine.context import RunContext
from droppos.engine.loop import StepResult
from droppos.interop.backbone import load_original_checkpoint
from droppos.interop.schema import PretrainedModel, from_plain, to_plain
from droppos.methods.monitors import Monitors
from droppos.models.encoder import EncoderConfig, pair
from droppos.objective.smoothing import PositionTargets
from droppos.visual.jigsaw import JigsawView, draw_jigsaw, picture_batch, save_pictures

PICTURES = 4  # images drawn every --run.pictures_every epochs


@dataclass
class PretrainBatch:
    """A micro-batch on the device: images [N, C, H, W] normalised, and the method's per-sample
    noise vectors ([N, length] each, in `noise_lengths` order)."""

    images: torch.Tensor
    noise: tuple[torch.Tensor, ...]


class PretrainingMethod(abc.ABC):
    """One pre-training method (subclass it, set `name` and `Config`, and register it)."""

    name: ClassVar[str]
    """The method's name: `--model.name`, and what its checkpoints record."""
    Config: ClassVar[type]
    """Its configuration dataclass: a `name` field equal to `name`, an `encoder` field
    (`EncoderConfig`), and the method's own options, each with a one-line docstring."""
    Model: ClassVar[type[nn.Module]]
    """Its model, built from a `Config` (a ViTEncoder subclass: timm names for the encoder)."""
    split_invariant = True  # masks and augmentation are per sample, nothing per rank
    position_accuracy_of: ClassVar[str] = "its tokens"
    """What a `position_accuracy` metric of the method counts, for the closing line."""

    # -- what every method declares ------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def demo_config(cls) -> Any:
        """The model the demo preset (`tiny_cpu`) trains with this method."""

    @classmethod
    def build_model(cls, config: Any) -> nn.Module:
        """A freshly initialised model for `config`."""
        return cls.Model(config)

    @classmethod
    @abc.abstractmethod
    def noise_lengths(cls, config: Any) -> tuple[int, ...]:
        """The length of each per-sample noise vector the step receives with its images."""

    @classmethod
    def config_from_options(cls, encoder: EncoderConfig, options: dict[str, Any]) -> Any:
        """The configuration `create_model(name, **options)` asks for: the method's own fields
        from `options`, and the fields of a nested section (a decoder) too; what it takes is
        popped, so that the caller can refuse what is left."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls.Config):
            if f.name in ("name", "encoder"):
                continue
            if f.name in options:
                values[f.name] = options.pop(f.name)
            elif f.default_factory is not dataclasses.MISSING:  # a nested section
                section = type(f.default_factory())
                names = {g.name for g in dataclasses.fields(section)}
                values[f.name] = section(**{k: options.pop(k) for k in list(options) if k in names})
        return cls.Config(encoder=encoder, **values)

    @classmethod
    def config_from_plain(cls, values: Mapping[str, Any]) -> Any:
        """The configuration a checkpoint recorded (`to_plain` form), rebuilt."""
        return from_plain(cls.Config, values, "model")

    @classmethod
    def model_from_checkpoint(cls, header: PretrainedModel, content: Mapping[str, Any]) -> Any:
        """The whole model (decoders included) of one of this method's checkpoints."""
        model = cls.build_model(cls.config_from_plain(header.model_config))
        load_original_checkpoint(model, content)
        return model

    @classmethod
    def jigsaw(
        cls, model: nn.Module, images: torch.Tensor, noise: tuple[torch.Tensor, ...]
    ) -> JigsawView | None:
        """The jigsaw the model solves on `images` under `noise`, for pictures; None when the
        method solves none (pictures are then not drawn)."""
        return None

    @classmethod
    def draws_jigsaw(cls) -> bool:
        return cls.jigsaw.__func__ is not PretrainingMethod.jigsaw.__func__  # type: ignore[attr-defined]

    # -- the training step ---------------------------------------------------------------------

    def __init__(self, model: nn.Module, config: Any, context: RunContext) -> None:
        """`config` is the `pretrain` command's whole configuration (model, data, optim, run)."""
        self.model = model
        self.config = config
        self.context = context
        self.device = context.device
        self.picture_images: torch.Tensor | None = None
        self._normalise = DeviceNormaliser(*self.normalisation(), self.device)
        self._decode_stream: Any = None
        self.training_set: Any = None  # set by the pretrain command: replacements of bad images
        self._monitors: Monitors | bool | None = None  # built when first due; False: none
        self.init_state()

    def init_state(self) -> None:
        """State a method keeps across steps (built once, after the model); none by default."""
        return None

    def start_epoch(self, epoch: int, batch: int) -> None:
        return None

    @abc.abstractmethod
    def ahead(
        self, engine_model: nn.Module, batch: PretrainBatch
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """No-grad work before the step (with accumulation): (cache for `forward`, this
        micro-batch's loss normalisers)."""

    @abc.abstractmethod
    def forward(self, engine_model: nn.Module, batch: PretrainBatch, cache: Any) -> StepResult:
        """The micro-batch's loss and metrics (`step_result`), given `ahead`'s cache."""

    def after_step(self, step: int) -> None:
        return None

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """Figures of the epoch beyond the step's own metrics (a schedule, chance level)."""
        return {}

    def end_epoch(
        self, engine_model: nn.Module, epoch: int, metrics: dict[str, float]
    ) -> dict[str, Any]:
        found: dict[str, Any] = {"metrics": self.epoch_metrics(epoch)}
        if self.monitors_due(epoch):
            if self._monitors is None:
                self._monitors = Monitors.for_run(self.config, self.context) or False
            if self._monitors:  # on every rank: features are extracted sharded
                found["metrics"].update(self._monitors.measure(self.model))
        every = self.config.run.pictures_every
        last = epoch + 1 == self.config.optim.epochs  # a short run draws one at its end
        if every and ((epoch + 1) % every == 0 or last) and self.draws_jigsaw():
            pictures = self.pictures(epoch)  # on every rank: a sharded model runs collectively
            if pictures and self.context.is_main:
                found["images"] = pictures
        return found

    def monitors_due(self, epoch: int) -> bool:
        """`--run.monitor_every N`: after every N-th epoch and the last; 0: the last only;
        -1: never."""
        every = getattr(self.config.run, "monitor_every", -1)
        last = epoch + 1 == self.config.optim.epochs
        return every >= 0 and (last or (every > 0 and (epoch + 1) % every == 0))

    def epoch_line(self, metrics: dict[str, float]) -> str:
        """The console's epoch line: the loss, the position accuracy of a method that reports
        one, and the monitors when they ran."""
        line = f"loss {metrics.get('loss', float('nan')):.4f}"
        accuracy = metrics.get("position_accuracy")
        if accuracy is not None:
            chance = metrics["chance_position_accuracy"]
            line += f" position accuracy {accuracy:.3f} (chance {chance:.3f})"
        if "monitor_knn_top1" in metrics:
            line += f" | monitors: kNN {metrics['monitor_knn_top1']:.1f}"
        if "monitor_position_top1" in metrics:
            line += f", position probe {metrics['monitor_position_top1']:.1f}"
        return line

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def describe(self) -> PretrainedModel:
        return PretrainedModel(method=self.name, model_config=to_plain(self.config.model))

    # -- helpers for the step ------------------------------------------------------------------

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        data, encoder = self.config.data, self.config.model.encoder
        return mean_std(encoder.in_chans, data.mean, data.std)

    def to_device(self, batch: Any) -> PretrainBatch:
        """A loader batch `(images, labels, *noise)` on the device, once per micro-batch:
        images normalised there when they arrive as uint8 (the tensor path) or still encoded
        (the device path: decoded there, on a side stream on a GPU, so that the decode of the
        next micro-batch runs beside the current one's computation)."""
        images, _, *noise = batch
        if isinstance(images, list):  # --data.decode device: still encoded
            images = self._decode(images)
        else:
            images = images.to(self.device, non_blocking=True)
        noise = tuple(n.to(self.device, non_blocking=True) for n in noise)
        return PretrainBatch(self._normalise(images), noise)

    def _decode(self, items: list[Any]) -> torch.Tensor:
        encoder = self.config.model.encoder
        size, channels = pair(encoder.img_size), encoder.in_chans

        def one(item: Any) -> torch.Tensor:
            return decode_batch([item], size, channels, self.device)[0]

        def replace(item: Any, error: Any) -> torch.Tensor:
            if self.training_set is None:
                raise error
            return self.training_set.replacement(item.index, error, one)

        if self.device.type != "cuda":
            return decode_batch(items, size, channels, self.device, replace)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._decode_stream.wait_stream(current)
        with torch.cuda.stream(self._decode_stream):
            images = decode_batch(items, size, channels, self.device, replace)
        current.wait_stream(self._decode_stream)
        images.record_stream(current)
        return images

    @staticmethod
    def step_result(
        normalisers: dict[str, torch.Tensor],
        share: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        metrics: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> StepResult:
        return StepResult(normalisers=normalisers, share=share, metrics=metrics)

    def pictures(self, epoch: int) -> dict[str, Any]:
        """The jigsaw of a few fixed images, drawn into output_dir/pictures (for TensorBoard)."""
        data, encoder = self.config.data, self.config.model.encoder
        mean, std = self.normalisation()
        if self.picture_images is None:
            images = picture_batch(
                data.source, encoder.img_size, encoder.in_chans, PICTURES, mean, std,
                computed_by_rank0,
            )  # fmt: skip
            self.picture_images = images.to(self.device)
        caption = f"{self.name}, epoch {epoch + 1} of {self.config.optim.epochs}"
        drawn = draw_pictures(
            type(self), self.config.model, self.model, self.picture_images, mean, std,
            self.config.run.seed, caption,
        )  # fmt: skip
        if not drawn:
            return {}
        if self.context.is_main:
            folder = Path(self.config.run.output_dir) / "pictures"
            save_pictures(drawn, folder, f"epoch-{epoch + 1:04d}")
        return {f"jigsaw/{i}": np.asarray(picture) for i, picture in enumerate(drawn)}


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


class PositionPretext(PretrainingMethod):
    """A method that classifies patches into grid positions against soft targets: its model
    section has `smoothing_sigma` and `smoothing_decay`; the engine hands the epoch's target map
    [L, L] to the model (as a tensor, so a compiled graph is built once) and logs the sigma and
    the chance level of its `position_accuracy`."""

    def init_state(self) -> None:
        cfg = self.config.model
        self.targets = PositionTargets(
            cfg.encoder.grid_size,
            cfg.smoothing_sigma,
            decay=cfg.smoothing_decay,
            total_epochs=self.config.optim.epochs,
        )
        self.target_map: torch.Tensor | None = None

    def start_epoch(self, epoch: int, batch: int) -> None:
        self.target_map = self.targets.at_epoch(epoch, self.device)

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        return {
            "sigma": self.targets.sigma(epoch),
            "chance_position_accuracy": 1.0 / self.config.model.encoder.num_patches,
        }
