"""`droppos pretrain`: any registered method, on any data source, in the one training loop.

The command's model section is the chosen method's own configuration (`--model.name` picks it
from the registry), so a method's options are declared once, in its dataclass. A method declares
its step (`methods/base.py`); `PretrainStep` conducts it in the loop, the same for every method:
batches onto the device (decoded and normalised there on the tensor and device paths), monitors,
pictures and the console line. Setup builds the model, the augmented source with the method's
per-sample mask noise, the step and the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from droppos.data.catalog import build_source
from droppos.data.decode import DecodeMode
from droppos.data.device_decode import collate_encoded, decode_batch
from droppos.data.mask_noise import MaskNoise
from droppos.data.pipeline import AugmentedDataset
from droppos.data.transforms import DeviceNormaliser, mean_std, pretrain_transform
from droppos.engine import context as run_context
from droppos.engine.collectives import computed_by_rank0
from droppos.engine.context import RunContext
from droppos.engine.loop import StepResult, TrainLoop, build_loop, train_command
from droppos.engine.precision import autocast
from droppos.engine.strategy import Strategy
from droppos.interop.schema import PretrainedModel
from droppos.methods import DEFAULT_METHOD, method_named, method_names, method_of
from droppos.methods.base import PretrainBatch, PretrainingMethod
from droppos.methods.monitors import Monitors
from droppos.methods.visualize import RunPictures
from droppos.models.encoder import pair
from droppos.sections import (
    DataSection,
    OptimSection,
    Sections,
    TrainRunSection,
    check_crop_scale,
)


@dataclass
class PretrainDataSection(DataSection):
    """Where the images come from, their augmentation, and what happens to unreadable ones."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    """RandomResizedCrop area range (the paper and the ImageNet presets: 0.2-1)."""
    decode: DecodeMode = "pil"
    """pil (Pillow), draft (Pillow, a JPEG decoded at 1/2-1/8 scale when its crop allows),
    tensor (torchvision decode, uint8 augmentation, normalised on the device: ~2x per core) or
    device (workers only choose the crop; decode and augmentation on the GPU, nvJPEG)."""

    def validate(self) -> None:
        super().validate()
        check_crop_scale("--data.crop_scale", self.crop_scale)


@dataclass
class PretrainRunSection(TrainRunSection):
    """Where outputs go, precision, checkpoints, logging and monitors of a pre-training run."""

    pictures_every: int = 5
    """Every N epochs and after the last, draw the jigsaw the method solves (DropPos, MP3) on
    a few images into output_dir/pictures and TensorBoard (0 = never)."""
    monitor_every: int = 5
    """Measure the features (a kNN top-1 on held-out images, a position-probe top-1) after
    every N epochs and after the last; 0: after the last only (the ImageNet presets); -1:
    never."""

    def validate(self) -> None:
        super().validate()
        if self.pictures_every < 0:
            raise ValueError(f"--run.pictures_every must be >= 0, got {self.pictures_every}")
        if self.monitor_every < -1:
            raise ValueError(
                f"--run.monitor_every must be >= -1 (-1 = never), got {self.monitor_every}"
            )


class PretrainStep:
    """The pre-training run's side of the loop (`engine/loop.py:TrainingMethod`): it drives a
    method's step and does what every run does around it."""

    split_invariant = True  # masks and augmentation are per sample, nothing per rank

    def __init__(
        self, method: PretrainingMethod, model: nn.Module, config: Any, context: RunContext
    ) -> None:
        """`config` is the `pretrain` command's whole configuration (model, data, optim, run)."""
        self.method, self.model, self.config, self.context = method, model, config, context
        self.device = context.device
        encoder = config.model.encoder
        mean, std = mean_std(encoder.in_chans, config.data.mean, config.data.std)
        self._normalise = DeviceNormaliser(mean, std, self.device)
        self._decode_stream: Any = None
        self.training_set: Any = None  # set by setup: the device path's bad-image replacements
        self._monitors: Monitors | bool | None = None  # built when first due; False: none
        self.pictures = RunPictures(type(method), config, self.device, mean, std)

    # -- the method's step ---------------------------------------------------------------------

    def start_epoch(self, epoch: int, batch: int) -> None:
        self.method.start_epoch(epoch, batch)

    def ahead(
        self, engine_model: nn.Module, batch: PretrainBatch
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        return self.method.ahead(engine_model, batch)

    def forward(self, engine_model: nn.Module, batch: PretrainBatch, cache: Any) -> StepResult:
        return self.method.forward(engine_model, batch, cache)

    def after_step(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def describe(self) -> PretrainedModel:
        return self.method.describe()

    # -- what every run does around it ---------------------------------------------------------

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

    def end_epoch(
        self, strategy: Strategy, epoch: int, metrics: dict[str, float]
    ) -> dict[str, Any]:
        found: dict[str, Any] = {"metrics": self.method.epoch_metrics(epoch)}
        if self.monitors_due(epoch):
            if self._monitors is None:
                self._monitors = Monitors.for_run(self.config, self.context) or False
            if self._monitors:  # on every rank: features are extracted sharded
                found["metrics"].update(self._monitors.measure(self.model, strategy))
        if self.pictures.due(epoch):  # on every rank: a sharded model runs collectively
            # in the run's precision, as the step: FSDP in bf16 holds bf16 weights and leaves
            # the images as they are
            with autocast(self.device, self.context.precision):
                pictures = self.pictures.draw(self.model, epoch, self.context.is_main)
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


def demo_models() -> dict[str, Any]:
    """Each registered method's demo model: what `--model.name NAME` starts from."""
    return {name: method_named(name).demo_config for name in method_names()}


@dataclass
class PretrainConfig(Sections):
    """Pre-train a ViT with DropPos (or another registered method, e.g. the plain-MAE
    baseline)."""

    model: Any = field(
        default_factory=lambda: method_named(DEFAULT_METHOD).demo_config(),
        metadata={"variants": demo_models, "default_variant": DEFAULT_METHOD},
    )
    data: PretrainDataSection = field(default_factory=PretrainDataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: PretrainRunSection = field(default_factory=PretrainRunSection)

    def validate(self) -> None:
        """Catch user mistakes before any work starts (each error says what to change)."""
        method_of(self.model)
        super().validate()
        if self.optim.layer_decay != 1.0:
            raise ValueError("--optim.layer_decay is a fine-tuning option; keep it 1 here")


def pretraining_loop(config: PretrainConfig) -> TrainLoop:
    """Validate, build model, data and optimizer, and restore a checkpoint if one is due.

    User mistakes (bad options, missing data, a checkpoint of another run) raise ValueError
    or FileNotFoundError from here, before any work is done.
    """
    config.validate()
    method = method_of(config.model)
    context = run_context.start(config.run, "pretrain")
    model = method.build_model(config.model).to(context.device)
    step = PretrainStep(method(config, context.device), model, config, context)
    data, encoder = config.data, config.model.encoder
    source = build_source(
        data.source, "train", data.max_image_pixels, data.decode, computed_by_rank0
    )
    if data.decode == "device" and not source.holds_files:
        raise ValueError(
            f"--data.decode device decodes files on the device, and {data.source!r} holds none; "
            "use an image folder, a file list or tar shards (or another --data.decode)"
        )
    transform = pretrain_transform(
        encoder.img_size,
        encoder.in_chans,
        data.mean,
        data.std,
        data.crop_scale,
        data.decode,
        normalised=False,  # uint8 through the loader, normalised on the device (`to_device`)
    )
    train_set = AugmentedDataset(
        source,
        transform,
        seed=config.run.seed,
        torch_rng_only=True,  # every path's crop and flip come from torch's generator alone
        on_bad_image=data.on_bad_image,
        extras=[MaskNoise(method.noise_lengths(config.model))],
    )
    step.training_set = train_set  # the device path replaces what it cannot decode from it
    collate = collate_encoded if data.decode == "device" else None
    return build_loop(step, context, config, train_set, collate_fn=collate)


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Set up and run; the programmatic twin of `droppos pretrain` (releases the output folder
    however the run ends)."""
    loop = pretraining_loop(config)
    try:
        return loop.run()
    finally:
        loop.close()


def run(config: PretrainConfig) -> str | None:
    """The command: announce, train, and say how it went."""
    loop = pretraining_loop(config)
    what = f"pre-training {config.model.name} on {config.data.source}"
    summary = train_command("pretrain", config, loop, what, lambda loop: loop.run())
    if summary is None or not loop.context.is_main:
        return None
    done = f"done in {summary['wall_seconds']:.0f} s: "
    if "position_accuracy" in summary:
        chance = summary["chance_position_accuracy"]
        return (
            f"{done}position accuracy on {method_of(config.model).position_accuracy_of} "
            f"{summary['position_accuracy']:.3f} "
            f"(chance {chance:.3f})"
        )
    return f"{done}loss {summary['loss']:.4f}"
