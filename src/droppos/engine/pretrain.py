"""Pre-training: what DropPos and plain MAE supply to the one training loop.

Each method is its setup and its step. The DropPos step passes this epoch's soft-target map into
the model as a tensor (`PositionTargets` owns the sigma schedule, outside any compiled graph)
and, with gradient accumulation, computes the attentive loss weights ahead of the step so that
the loss is normalised over the whole global batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from droppos.data import AugmentedDataset, ReplaceBadImages, build_dataset
from droppos.data.device_decode import collate_encoded, decode_batch
from droppos.data.mask_noise import MaskNoiseDataset
from droppos.data.transforms import default_mean_std, normalise_on_device, pretrain_transform
from droppos.engine.config import PretrainConfig
from droppos.engine.distributed import DistEnv, init_distributed
from droppos.engine.loop import StepResult, TrainLoop, build_loop
from droppos.engine.precision import resolve_precision
from droppos.models.droppos import DropPosConfig, DropPosModel
from droppos.models.encoder import pair
from droppos.models.mae import MAEConfig, MAEModel
from droppos.objective.smoothing import PositionTargets

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def to_device(batch: Batch, config: PretrainConfig, device: torch.device) -> Batch:
    """The batch on the device, images normalised there when they arrive as uint8."""
    images, labels, patch_noise, position_noise = batch
    encoder = config.model.encoder
    if isinstance(images, list):  # --data.decode device: still encoded
        images = decode_batch(images, pair(encoder.img_size), encoder.in_chans, device)
    else:
        images = images.to(device, non_blocking=True)
    default_mean, default_std = default_mean_std(encoder.in_chans)
    images = normalise_on_device(
        images, config.data.mean or default_mean, config.data.std or default_std
    )
    return (
        images,
        labels,
        patch_noise.to(device, non_blocking=True),
        position_noise.to(device, non_blocking=True),
    )


@dataclass
class PretrainMethod:
    """What both pre-training methods share: no extra state, epoch lines with chance level."""

    model: nn.Module
    config: PretrainConfig
    device: torch.device
    split_invariant: bool = True  # masks and augmentation are per sample, nothing per rank

    def after_step(self, step: int) -> None:
        return None

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {"metrics": {}}

    def epoch_line(self, metrics: dict[str, float]) -> str:
        return f"loss {metrics.get('loss', float('nan')):.4f}"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"droppos": "pretrain", "model_config": asdict(self.config.model)}


@dataclass
class DropPosMethod(PretrainMethod):
    """The DropPos step: soft targets of the epoch in, global position (and pixel) loss out."""

    targets: PositionTargets | None = None
    target_map: torch.Tensor | None = None
    is_main: bool = True
    picture_images: torch.Tensor | None = None
    loss_weights: Any = None  # the model's loss_weights, compiled with the model if asked

    def start_epoch(self, epoch: int, batch: int) -> None:
        assert self.targets is not None
        self.target_map = self.targets.at_epoch(epoch, self.device)

    def ahead(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, _, patch_noise, position_noise = to_device(batch, self.config, self.device)
        weights = self.loss_weights(images, patch_noise, position_noise)
        normalisers = {"position": weights.float().sum()}
        if self.model.droppos_config.pixel_branch is not None:
            visible = self.model.droppos_config.num_visible
            normalisers["pixel"] = torch.tensor(
                float(images.shape[0] * (self.model.num_patches - visible)), device=self.device
            )
        return weights, normalisers

    def forward(
        self, engine_model: nn.Module, batch: Batch, cache: torch.Tensor | None
    ) -> StepResult:
        images, _, patch_noise, position_noise = to_device(batch, self.config, self.device)
        output = engine_model(
            images,
            target_map=self.target_map,
            patch_noise=patch_noise,
            position_noise=position_noise,
            token_weights=cache,
        )
        normalisers = {"position": output.position_normaliser.detach()}
        if output.masked_patches is not None:
            normalisers["pixel"] = output.masked_patches.sum().float()
        return StepResult(
            normalisers=normalisers,
            share=lambda total: output.global_loss(total["position"], total.get("pixel")),
            metrics=output.metric_sums(),
        )

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        assert self.targets is not None
        found: dict[str, Any] = {
            "metrics": {
                "sigma": self.targets.sigma(epoch),
                "chance_position_accuracy": 1.0 / self.model.num_patches,
            }
        }
        every = self.config.run.pictures_every
        if every and (epoch + 1) % every == 0 and self.is_main:
            found["images"] = self.pictures(epoch)
        return found

    def pictures(self, epoch: int) -> dict[str, Any]:
        """The jigsaw of a few fixed images, drawn into output_dir/pictures (for TensorBoard)."""
        from droppos.data import default_mean_std
        from droppos.visual.jigsaw import jigsaw_pictures, picture_batch, save_pictures

        data, encoder = self.config.data, self.config.model.encoder
        defaults = default_mean_std(encoder.in_chans)
        mean, std = tuple(data.mean or defaults[0]), tuple(data.std or defaults[1])
        if self.picture_images is None:
            images = picture_batch(data.source, encoder.img_size, encoder.in_chans, 4, mean, std)
            self.picture_images = images.to(self.device)
        drawn = jigsaw_pictures(self.model, self.picture_images, mean, std, self.config.run.seed)
        folder = Path(self.config.run.output_dir) / "pictures"
        save_pictures(drawn, folder, f"epoch-{epoch + 1:04d}")
        return {f"jigsaw/{i}": np.asarray(picture) for i, picture in enumerate(drawn)}

    def epoch_line(self, metrics: dict[str, float]) -> str:
        line = super().epoch_line(metrics)
        accuracy = metrics.get("position_accuracy")
        if accuracy is None:
            return line
        chance = metrics["chance_position_accuracy"]
        return f"{line} position accuracy {accuracy:.3f} (chance {chance:.3f})"


@dataclass
class MAEMethod(PretrainMethod):
    """The plain-MAE step: normalised-pixel loss over the global batch's masked patches."""

    def start_epoch(self, epoch: int, batch: int) -> None:
        return None

    def ahead(self, batch: Batch) -> tuple[None, dict[str, torch.Tensor]]:
        images = batch[0]
        masked = self.model.num_patches - self.model.mae_config.num_visible
        return None, {"pixel": torch.tensor(float(images.shape[0] * masked), device=self.device)}

    def forward(self, engine_model: nn.Module, batch: Batch, cache: None) -> StepResult:
        images, _, patch_noise, _ = to_device(batch, self.config, self.device)
        output = engine_model(images, patch_noise=patch_noise)
        return StepResult(
            normalisers={"pixel": output.masked.sum().float()},
            share=lambda total: output.global_loss(total["pixel"]),
            metrics=output.metric_sums(),
        )


def build_method(config: PretrainConfig, env: DistEnv) -> PretrainMethod:
    """The model named by the config's model section, on the device, wrapped in its step."""
    model_config = config.model
    if isinstance(model_config, MAEConfig):
        return MAEMethod(MAEModel(model_config).to(env.device), config, env.device)
    if not isinstance(model_config, DropPosConfig):
        raise ValueError(f"pretrain needs a DropPos or MAE model config, got {model_config!r}")
    model = DropPosModel(model_config).to(env.device)
    targets = PositionTargets(
        model_config.encoder.grid_size,
        model_config.smoothing_sigma,
        decay=model_config.smoothing_decay,
        total_epochs=config.optim.epochs,
    )
    loss_weights = model.loss_weights
    if config.run.compile:
        loss_weights = torch.compile(loss_weights)
    return DropPosMethod(
        model, config, env.device, targets=targets, loss_weights=loss_weights, is_main=env.is_main
    )


def setup(config: PretrainConfig) -> TrainLoop:
    """Validate, build data, model and optimizer, and restore a checkpoint if one is due.

    User mistakes (bad options, missing data, a checkpoint of another run) raise ValueError
    or FileNotFoundError from here, before any work is done.
    """
    config.validate()
    env = init_distributed(config.run.device)
    precision = resolve_precision(config.run.precision, env.device)
    torch.manual_seed(config.run.seed + env.rank)
    method = build_method(config, env)
    model = method.model
    data = config.data
    dataset = build_dataset(data.source, "train", data.max_image_pixels, data.decode)
    if data.decode == "device" and getattr(dataset, "decode", None) != "device":
        raise ValueError(
            f"--data.decode device decodes files on the device, and {data.source!r} holds none; "
            "use an image folder, a file list or tar shards (or another --data.decode)"
        )
    encoder = config.model.encoder
    transform = pretrain_transform(
        encoder.img_size,
        encoder.in_chans,
        config.data.mean,
        config.data.std,
        crop_scale=config.data.crop_scale,
        decode=data.decode,
    )
    augmented = AugmentedDataset(
        dataset, transform, seed=config.run.seed, torch_rng_only=data.decode == "tensor"
    )
    noisy = MaskNoiseDataset(
        ReplaceBadImages(augmented, data.on_bad_image),
        num_patches=model.num_patches,
        num_visible=config.model.num_visible,
    )
    collate = collate_encoded if data.decode == "device" else None
    return build_loop(method, env, config, noisy, precision, collate_fn=collate)


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Set up and run; the programmatic twin of `droppos pretrain` (releases the output folder
    however the run ends)."""
    loop = setup(config)
    try:
        return loop.run()
    finally:
        loop.close()
