"""`droppos pretrain`: any registered method, on any data source, in the one training loop.

The command's model section is the chosen method's own configuration (`--model.name` picks it
from the registry), so a method's options are declared once, in its dataclass. Setup builds the
model, the augmented source with the method's per-sample mask noise, and the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from droppos.data.catalog import build_source
from droppos.data.device_decode import collate_encoded
from droppos.data.mask_noise import MaskNoise
from droppos.data.pipeline import AugmentedDataset
from droppos.data.transforms import pretrain_transform
from droppos.engine import context as run_context
from droppos.engine.collectives import computed_by_rank0
from droppos.engine.loop import TrainLoop, build_loop, train_command
from droppos.methods import DEFAULT_METHOD, method_named, method_names, method_of
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
    decode: Literal["pil", "draft", "tensor", "device"] = "pil"
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
    context = run_context.start(config.run)
    model = method.build_model(config.model).to(context.device)
    step = method(model, config, context)
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
            f"{done}position accuracy on {loop.method.position_accuracy_of} "
            f"{summary['position_accuracy']:.3f} "
            f"(chance {chance:.3f})"
        )
    return f"{done}loss {summary['loss']:.4f}"
