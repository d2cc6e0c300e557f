"""What a pre-training method is to droppos: a declaration of what differs between methods.

A method subclasses `PretrainingMethod` and declares, at class level, its name and typed
configuration (the `--model.*` section, with an `encoder` field), its demo preset, its model, how
many per-sample noise vectors its masks need (drawn in the loader, `data/mask_noise.py`), and
optionally the jigsaw it can draw; an instance is its step: the no-grad pass ahead of it (`ahead`),
the forward (`forward`) and the epoch's own figures. Everything every run does around the step
(moving and decoding batches, monitors, pictures, the console line) is the conductor's,
`methods/pretrain.py:PretrainStep`. `@register_method` (`methods/registry.py`) makes a method
reachable by name from the command line, resume, export, visualize and the benchmarks.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from droppos.engine.loop import StepResult
from droppos.interop.backbone import load_original_checkpoint
from droppos.interop.schema import PretrainedModel, from_plain, to_plain
from droppos.models.encoder import EncoderConfig
from droppos.objective.smoothing import PositionTargets
from droppos.visual.jigsaw import JigsawView


@dataclass
class PretrainBatch:
    """A micro-batch on the device: images [N, C, H, W] normalised, and the method's per-sample
    noise vectors ([N, length] each, in `noise_lengths` order)."""

    images: torch.Tensor
    noise: tuple[torch.Tensor, ...]


class PretrainingMethod(abc.ABC):
    """One pre-training method (subclass it, set `name`, `Config` and `Model`, register it)."""

    name: ClassVar[str]
    """The method's name: `--model.name`, and what its checkpoints record."""
    Config: ClassVar[type]
    """Its configuration dataclass: a `name` field equal to `name`, an `encoder` field
    (`EncoderConfig`), and the method's own options, each with a one-line docstring."""
    Model: ClassVar[type[nn.Module]]
    """Its model, built from a `Config` (a ViTEncoder subclass: timm names for the encoder)."""
    position_accuracy_of: ClassVar[str] = "its tokens"
    """What a `position_accuracy` metric of the method counts, for the closing line."""

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

    # -- the step ------------------------------------------------------------------------------

    def __init__(self, config: Any, device: torch.device) -> None:
        """`config` is the `pretrain` command's whole configuration (model, data, optim, run)."""
        self.config = config
        self.device = device

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
        """The micro-batch's loss and metrics (`StepResult`), given `ahead`'s cache."""

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """Figures of the epoch beyond the step's own metrics (a schedule, chance level)."""
        return {}

    def describe(self) -> PretrainedModel:
        """What a checkpoint of this method says it holds."""
        return PretrainedModel(method=self.name, model_config=to_plain(self.config.model))


class PositionPretext(PretrainingMethod):
    """A method that classifies patches into grid positions against soft targets: its model
    section has `smoothing_sigma` and `smoothing_decay`; the engine hands the epoch's target map
    [L, L] to the model (as a tensor, so a compiled graph is built once) and logs the sigma and
    the chance level of its `position_accuracy`."""

    def __init__(self, config: Any, device: torch.device) -> None:
        super().__init__(config, device)
        cfg = config.model
        self.targets = PositionTargets(
            cfg.encoder.grid_size,
            cfg.smoothing_sigma,
            decay=cfg.smoothing_decay,
            total_epochs=config.optim.epochs,
        )
        self.target_map: torch.Tensor | None = None

    def start_epoch(self, epoch: int, batch: int) -> None:
        self.target_map = self.targets.at_epoch(epoch, self.device)

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        return {
            "sigma": self.targets.sigma(epoch),
            "chance_position_accuracy": 1.0 / self.config.model.encoder.num_patches,
        }
