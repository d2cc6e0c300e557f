"""`droppos segment`: semantic segmentation on any backbone droppos reads, three ways.

- `--head.name linear` (default): DINOv2's linear evaluation. The frozen backbone's patch tokens
  (of the last block, or of the last `--model.feature_blocks` concatenated, each through the
  final norm) go through BatchNorm and a 1x1 linear classifier per patch; the logits are
  upsampled bilinearly to the label resolution and trained with cross-entropy, unlabelled
  pixels ignored. The features are extracted once and cached (no augmentation is drawn), and
  every learning rate of `--probe.lrs` trains side by side on them, so a sweep costs one
  forward pass of the backbone.
- `--head.name linear --model.freeze false`: the same head with the backbone fine-tuned end to end
  (AdamW, layer-wise lr decay, random resized crops and flips) on the training loop every
  fine-tuning uses: torchrun, bf16, exact resume, `last.pth` and `best.pth`.
- `--head.name knn`: dense nearest-neighbour retrieval (`evaluation/dense_knn.py`), no training.

Images of any size: the shorter side is resized to `--data.img_size` and the centre square is
cropped (random crops in fine-tuning); the positional embedding is interpolated to that grid.
Scores are computed on that square at its resolution (whole-image inference, no sliding
window): mIoU over the classes present, pixel accuracy and per-class IoU, from one confusion
matrix over the whole val split, summed over ranks (docs/segmentation.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from droppos.data.loader import build_loader
from droppos.data.pipeline import AugmentedDataset, sample_seed
from droppos.data.segmentation import (
    IGNORE,
    SegmentationSample,
    SegmentationSource,
    SegmentationView,
    segmentation_source,
)
from droppos.data.transforms import mean_std
from droppos.engine import context as run_context
from droppos.engine.collectives import gather_interleaved, sum_over_ranks, world_and_rank
from droppos.engine.context import RunContext
from droppos.engine.logging import MetricWriter, write_config
from droppos.engine.loop import StepResult, TrainLoop, build_loop, train_command
from droppos.engine.precision import autocast
from droppos.engine.strategy import Strategy, full_model_state
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.dense_heads import (
    DenseFeatures,
    PatchFeatures,
    ProbeHeadSection,
    SegmentationModel,
    head_confusion,
    train_probe_heads,
    upsampled,
)
from droppos.evaluation.dense_knn import (
    DenseKnnSection,
    MemoryBank,
    knn_segment,
    patches_per_image,
    sample_patches,
    trim_bank,
)
from droppos.evaluation.metrics import confusion_matrix, segmentation_scores
from droppos.evaluation.report import write_results
from droppos.interop.backbone import Backbone, build_vit
from droppos.interop.schema import Segmenter
from droppos.outputs import write_atomic
from droppos.sections import (
    DataSection,
    OptimSection,
    Sections,
    TrainRunSection,
    check_crop_scale,
)
from droppos.visual.segmentation import draw_segmentation

PICTURES = "predictions.png"
BEST = "best.pth"


@dataclass
class SegmentModelSection(BackboneSection):
    """Which weights, which of their tokens the head reads, and whether they train."""

    feature_blocks: int = 1
    """The head reads the patch tokens of the last N blocks (each through the final norm),
    concatenated: 1 is DINOv2's linear evaluation, 4 its multi-layer variant."""
    freeze: bool = True
    """true: the backbone stays as it is and its features are cached (a linear probe); false:
    it is fine-tuned with the head (--optim.*; --head.name linear only)."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the fine-tuned backbone (the deepest block's rate)."""

    def validate(self) -> None:
        super().validate()
        if self.feature_blocks < 1:
            raise ValueError(f"--model.feature_blocks must be >= 1, got {self.feature_blocks}")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"--model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class SegmentDataSection(DataSection):
    """Where the images and masks come from, and the view the scores are computed on."""

    source: str = "demo-scenes"
    """demo-scenes or fashion-mnist-scenes[:DIR] (built in), or a folder in the ADE20K, Pascal
    VOC or pair layout (docs/segmentation.md)."""
    img_size: int = 0
    """Side of the square view (shorter side resized to it, centre crop), a multiple of the
    patch size; 0 = the source's own (the built-in scenes: 56), else the backbone's size."""
    batch_size: int = 64
    """Images per forward (feature extraction, evaluation; fine-tuning takes --optim.batch_size)."""
    reduce_zero_label: bool | None = None
    """Ignore label 0 and shift the others down by one; null = as the layout's benchmark does
    (ADE20K: true, VOC and pairs: false)."""
    num_classes: int = 0
    """Classes of a layout without classes.txt (0: VOC's 21, else read off the training masks)."""
    val_from_train: int = 0
    """N > 0: hold out N random training images and score on them instead of the val split
    (which is then not read): make choices there, keep the val split for the reported number."""
    train_images: int = 0
    """N > 0: train on N random training images (after any held-out ones); 0 = all."""
    subset_seed: int = 0
    """Seed of those picks alone (not --run.seed)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Fine-tuning's random resized crop: the range of the image area it keeps."""

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.img_size < 0 or self.num_classes < 0:
            raise ValueError("--data.batch_size must be >= 1, --data.img_size and num_classes >= 0")
        if self.val_from_train < 0 or self.train_images < 0:
            raise ValueError("--data.val_from_train and --data.train_images must be >= 0")
        check_crop_scale("--data.crop_scale", self.crop_scale)


@dataclass
class SegmentRunSection(TrainRunSection):
    """Where outputs go, how to compute, and (fine-tuning) checkpoints and logging."""

    output_dir: str = "runs/segment"
    """Folder for this run's outputs (results.json, predictions.png, checkpoints)."""
    pictures: int = 6
    """Val images drawn with their ground truth and prediction (0 = none)."""

    def validate(self) -> None:
        super().validate()
        if self.pictures < 0:
            raise ValueError(f"--run.pictures must be >= 0, got {self.pictures}")


def segment_optim() -> OptimSection:
    """Fine-tuning the backbone with the head (`--model.freeze false`): the classification
    recipe's AdamW and layer decay, 10 epochs of the demo scenes."""
    return OptimSection(
        epochs=10,
        warmup_epochs=1.0,
        batch_size=32,
        base_lr=1e-3,
        min_lr=1e-6,
        betas=(0.9, 0.999),
        layer_decay=0.75,
        clip_grad=None,
    )


@dataclass
class HeadSection:
    """What labels the pixels."""

    name: Literal["linear", "knn"] = "linear"
    """linear: BatchNorm + a 1x1 classifier on the patch tokens, trained (--probe.* when the
    backbone is frozen, --optim.* when it is fine-tuned); knn: dense nearest-neighbour
    retrieval from the training patches, no training (--knn.*)."""


@dataclass
class SegmentConfig(Sections):
    """Semantic segmentation on a backbone: a linear head (frozen or fine-tuned) or dense kNN."""

    head: HeadSection = field(default_factory=HeadSection)
    model: SegmentModelSection = field(default_factory=SegmentModelSection)
    data: SegmentDataSection = field(default_factory=SegmentDataSection)
    probe: ProbeHeadSection = field(default_factory=ProbeHeadSection)
    knn: DenseKnnSection = field(default_factory=DenseKnnSection)
    optim: OptimSection = field(default_factory=segment_optim)
    run: SegmentRunSection = field(default_factory=SegmentRunSection)

    def validate(self) -> None:
        super().validate()
        if self.head.name == "knn" and not self.model.freeze:
            raise ValueError(
                "--head.name knn retrieves with a frozen backbone: drop --model.freeze false"
            )


# -- data ----------------------------------------------------------------------------------------


class SourceSubset(SegmentationSource):
    """Some samples of a segmentation source (a held-out part, a smaller training set)."""

    def __init__(self, source: SegmentationSource, indices: list[int], part: str) -> None:
        self.source, self.indices = source, indices
        self.classes, self.native_size = source.classes, source.native_size
        self.origin = f"{source.origin} [{part}]"

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, index: int) -> SegmentationSample:
        return self.source.sample(self.indices[index])


def random_pick(total: int, count: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(total, size=count, replace=False).tolist())


def segmentation_splits(data: SegmentDataSection) -> tuple[SegmentationSource, SegmentationSource]:
    """(train, val) of `--data.source`, with any held-out validation and training subset."""
    where = (data.reduce_zero_label, data.num_classes, data.max_image_pixels)
    train = segmentation_source(data.source, "train", *where)
    if data.val_from_train:
        if data.val_from_train >= len(train):
            raise ValueError(
                f"--data.val_from_train {data.val_from_train} leaves no training image of "
                f"{len(train)}"
            )
        held = random_pick(len(train), data.val_from_train, data.subset_seed)
        rest = sorted(set(range(len(train))) - set(held))
        train, val = SourceSubset(train, rest, "train"), SourceSubset(train, held, "held-out val")
    else:
        reduce, _, pixels = where
        val = segmentation_source(data.source, "val", reduce, train.num_classes, pixels)
        val.classes = train.classes
    if data.train_images:
        if data.train_images > len(train):
            raise ValueError(
                f"--data.train_images {data.train_images}: the training split has {len(train)}"
            )
        picked = random_pick(len(train), data.train_images, data.subset_seed + 1)
        train = SourceSubset(train, picked, f"{data.train_images} images")
    return train, val


def view_size(data: SegmentDataSection, source: SegmentationSource, backbone: Backbone) -> int:
    """The square side images are seen at (see `--data.img_size`), checked against the patch."""
    enc = backbone.encoder
    native = max(enc.img_size) if isinstance(enc.img_size, tuple | list) else enc.img_size
    size = data.img_size or source.native_size or int(native)
    if size % enc.patch_size:
        raise ValueError(
            f"--data.img_size {size} is not a multiple of the backbone's patch size "
            f"{enc.patch_size}: choose {size - size % enc.patch_size or enc.patch_size}"
        )
    return size


def view(
    source: SegmentationSource, size: int, backbone: Backbone, data: SegmentDataSection,
    train: bool = False, seed: int = 0,
) -> AugmentedDataset:  # fmt: skip
    """`source` as (image, mask) tensors at `size` (random crops and flips when `train`)."""
    mean, std = backbone.normalisation(data.mean, data.std)
    transform = SegmentationView(
        size, backbone.encoder.in_chans, mean, std, train=train, crop_scale=data.crop_scale
    )
    on_bad_image = data.on_bad_image if train else None
    return AugmentedDataset(source, transform, seed=seed, on_bad_image=on_bad_image)


def batches(
    dataset: Dataset, data: SegmentDataSection, context: RunContext, desc: str, shard: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, masks, indices) on the device, in order: this rank's share when `shard`."""
    world, rank = world_and_rank() if shard else (1, 0)
    part = Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    device = context.device
    loader = build_loader(
        part, data.batch_size, shuffle=False, num_workers=data.num_workers,
        prefetch_factor=data.prefetch_factor, device_type=device.type, timeout=data.timeout,
    )  # fmt: skip
    for (images, masks), indices in tqdm(
        loader, desc=desc, disable=not context.progress, leave=False
    ):
        yield (
            images.to(device, non_blocking=True),
            masks.to(device, non_blocking=True),
            indices.to(device),
        )


# -- the frozen linear probe -------------------------------------------------------------------


@torch.inference_mode()
def extract(
    extractor: nn.Module, dataset: Dataset, data: SegmentDataSection, context: RunContext,
    desc: str,
) -> DenseFeatures:  # fmt: skip
    """Every image's patch features, once (sharded over ranks, gathered back in order)."""
    extractor.eval()
    features, masks = [], []
    for images, labels, _ in batches(dataset, data, context, desc):
        with autocast(context.device, context.precision):
            features.append(extractor(images))
        masks.append(labels.to(torch.uint8))
    total = len(dataset)  # type: ignore[arg-type]
    return DenseFeatures(
        gather_interleaved(torch.cat(features), total), gather_interleaved(torch.cat(masks), total)
    )


# -- pictures ----------------------------------------------------------------------------------


def picture_rows(
    dataset: Dataset, count: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The first `count` val images as uint8 RGB [n, S, S, 3], their masks [n, S, S] and the
    normalised images [n, C, S, S] to predict from."""
    items = [dataset[i][0] for i in range(min(count, len(dataset)))]  # type: ignore[arg-type]
    images = torch.stack([image for image, _ in items])
    masks = torch.stack([mask for _, mask in items]).numpy()
    shown = images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    pixels = (shown.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels, masks, images


def draw_predictions(
    config: SegmentConfig, backbone: Backbone, val: Dataset, classes: list[str],
    predict: Any, caption: str, context: RunContext,
) -> Path | None:  # fmt: skip
    """`predictions.png` (and TensorBoard) of the first `--run.pictures` val images."""
    count = config.run.pictures
    if not count or not context.is_main or not len(val):  # type: ignore[arg-type]
        return None
    mean, std = mean_std(
        backbone.encoder.in_chans, *backbone.normalisation(config.data.mean, config.data.std)
    )
    pixels, masks, images = picture_rows(val, count, mean, std)
    with torch.inference_mode():
        predicted = predict(images.to(context.device)).cpu().numpy()
    picture = draw_segmentation(pixels, masks, predicted, classes, caption)
    path = Path(config.run.output_dir) / PICTURES
    write_atomic(path, lambda stream: picture.save(stream, format="PNG"))
    if config.run.tensorboard:
        writer = MetricWriter(config.run.output_dir, tensorboard=True)
        writer.image("segment/predictions", np.asarray(picture), 0)
        writer.close()
    return path


# -- the three ways ------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What every way starts from: the run, the backbone, both splits at the view size."""

    context: RunContext
    backbone: Backbone
    train: SegmentationSource
    val: SegmentationSource
    size: int

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def summary(self) -> dict[str, Any]:
        return {
            "checkpoint": self.backbone.source,
            "checkpoint_kind": self.backbone.kind,
            "data": self.train.origin,
            "num_classes": len(self.classes),
            "classes": self.classes,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "img_size": self.size,
            "protocol": f"whole-image inference on the centre {self.size}x{self.size} view "
            "(shorter side resized), scored at that resolution",
        }


def prepare(config: SegmentConfig) -> Prepared:
    """Validate, start the run, load the backbone and both splits: every user mistake is found
    here, before any image is read."""
    config.validate()
    context = run_context.start(config.run, "segment")
    backbone = backbone_from(config.model)
    train, val = segmentation_splits(config.data)
    return Prepared(context, backbone, train, val, view_size(config.data, train, backbone))


def frozen_extractor(config: SegmentConfig, backbone: Backbone, device: torch.device) -> nn.Module:
    vit = build_vit(backbone, num_classes=0, dynamic_img_size=True)
    return PatchFeatures(vit, config.model.feature_blocks).to(device).eval()


def linear_probe(config: SegmentConfig, ready: Prepared) -> dict[str, Any]:
    """`--head linear` on a frozen backbone: cache, train the heads, score each, keep the best."""
    context, backbone, data = ready.context, ready.backbone, config.data
    extractor = frozen_extractor(config, backbone, context.device)
    started = time.perf_counter()
    train = extract(extractor, view(ready.train, ready.size, backbone, data), data, context,
                    "train features")  # fmt: skip
    val_view = view(ready.val, ready.size, backbone, data)
    val = extract(extractor, val_view, data, context, "val features")
    extracted = time.perf_counter() - started
    writer = MetricWriter(config.run.output_dir, context.is_main, config.run.tensorboard)
    try:
        heads = train_probe_heads(
            train, len(ready.classes), config.probe, config.run.seed, context.progress, writer
        )
    finally:
        writer.close()
    sweep = []
    for head, lr in zip(heads, config.probe.lrs):
        scores = segmentation_scores(
            head_confusion(head, val, len(ready.classes), data.batch_size), ready.classes
        )
        sweep.append({"lr": lr, **scores})
    best = max(range(len(sweep)), key=lambda i: sweep[i]["miou"])
    head = heads[best]

    def predict(images: torch.Tensor) -> torch.Tensor:
        with autocast(context.device, context.precision):
            return upsampled(head(extractor(images).float()), ready.size).argmax(1)

    caption = f"linear head (frozen), lr {config.probe.lrs[best]:g}: mIoU {sweep[best]['miou']:.1f}"
    pictures = draw_predictions(
        config, backbone, val_view, ready.classes, predict, caption, context
    )
    return {
        **{k: sweep[best][k] for k in ("miou", "pixel_accuracy", "classes_present", "class_iou")},
        "head": "linear",
        "frozen": True,
        "feature_blocks": extractor.blocks,
        "best_lr": config.probe.lrs[best],
        "sweep": [{k: v for k, v in s.items() if k != "class_iou"} for s in sweep],
        **ready.summary(),
        "feature_dim": int(train.features.shape[1]),
        "feature_seconds": round(extracted, 2),
        "probe_seconds": round(time.perf_counter() - started - extracted, 2),
        "pictures": None if pictures is None else str(pictures),
    }


def dense_knn(config: SegmentConfig, ready: Prepared) -> dict[str, Any]:
    """`--head knn`: a bounded bank of training patches, then each val patch's vote."""
    context, backbone, data, section = ready.context, ready.backbone, config.data, config.knn
    extractor = frozen_extractor(config, backbone, context.device)
    num_classes, seed = len(ready.classes), config.run.seed
    per_image = patches_per_image(section.bank_patches, len(ready.train))
    started = time.perf_counter()
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.inference_mode():
        train_view = view(ready.train, ready.size, backbone, data)
        for images, masks, indices in batches(train_view, data, context, "memory bank"):
            with autocast(context.device, context.precision):
                features = extractor(images)
            parts.append(sample_patches(features, masks, indices, num_classes, per_image, seed))
        total = len(ready.train)
        picked = [gather_interleaved(torch.cat(p).float(), total) for p in zip(*parts)]
        kept = picked[2].flatten() > 0
        bank = MemoryBank(picked[0].flatten(0, 1)[kept], picked[1].flatten(0, 1)[kept])
        bank = trim_bank(bank, section.bank_patches, seed)
        bank_seconds = time.perf_counter() - started
        val_view = view(ready.val, ready.size, backbone, data)
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=context.device)
        for images, masks, _ in batches(val_view, data, context, "val retrieval"):
            with autocast(context.device, context.precision):
                features = extractor(images)
            predicted = knn_segment(features.float(), bank, ready.size, section)
            confusion += confusion_matrix(predicted, masks, num_classes)
    confusion = sum_over_ranks({"c": confusion})["c"]

    def predict(images: torch.Tensor) -> torch.Tensor:
        with autocast(context.device, context.precision):
            features = extractor(images)
        return knn_segment(features.float(), bank, ready.size, section)

    scores = segmentation_scores(confusion, ready.classes)
    caption = f"dense kNN (k {section.k}, {len(bank):,} bank patches): mIoU {scores['miou']:.1f}"
    pictures = draw_predictions(
        config, backbone, val_view, ready.classes, predict, caption, context
    )
    return {
        **scores,
        "head": "knn",
        "frozen": True,
        "feature_blocks": extractor.blocks,
        "k": section.k,
        "temperature": section.temperature,
        "bank_patches": len(bank),
        "bank_mb": round((bank.features.nbytes + bank.labels.nbytes) / 2**20, 1),
        **ready.summary(),
        "bank_seconds": round(bank_seconds, 2),
        "retrieval_seconds": round(time.perf_counter() - started - bank_seconds, 2),
        "pictures": None if pictures is None else str(pictures),
    }


@dataclass
class SegmentationTraining:
    """`--model.freeze false` as a method of the training loop: the step, the per-epoch mIoU on
    the val split, and `best.pth` when it improved."""

    model: SegmentationModel
    config: SegmentConfig
    ready: Prepared
    split_invariant: bool = False  # drop path draws per (epoch, batch, rank)
    epoch: int = 0
    batch: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    last_metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.val_view = view(self.ready.val, self.ready.size, self.ready.backbone, self.config.data)

    def start_epoch(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.ready.context.device
        (images, masks), _ = batch
        return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)

    def ahead(self, engine_model: nn.Module, batch: Any) -> tuple[None, dict[str, torch.Tensor]]:
        return None, {"pixels": (batch[1] != IGNORE).sum().double()}

    def forward(self, engine_model: nn.Module, batch: Any, cache: None) -> StepResult:
        images, masks = batch
        env = self.ready.context.env  # drop path draws from a generator seeded per micro-batch
        torch.manual_seed(
            sample_seed(self.config.run.seed, self.epoch, self.batch * env.world_size + env.rank)
        )
        self.batch += 1
        loss_sum = F.cross_entropy(
            engine_model(images).float(), masks, ignore_index=IGNORE, reduction="sum"
        )
        return StepResult(
            normalisers={"pixels": (masks != IGNORE).sum().double()},
            share=lambda total: loss_sum / total["pixels"].clamp(min=1),
            metrics={},
        )

    def after_step(self, step: int) -> None:
        return None

    @torch.inference_mode()
    def evaluate(self) -> dict[str, Any]:
        """mIoU and pixel accuracy on the whole val split (per-rank counts, summed)."""
        model, context = self.model, self.ready.context
        model.eval()
        classes = self.ready.classes
        confusion = torch.zeros(
            len(classes), len(classes), dtype=torch.int64, device=context.device
        )
        for images, masks, _ in batches(self.val_view, self.config.data, context, "val"):
            with autocast(context.device, context.precision):
                predicted = model(images).argmax(1)
            confusion += confusion_matrix(predicted, masks, len(classes))
        model.train()
        return segmentation_scores(sum_over_ranks({"c": confusion})["c"], classes)

    def end_epoch(
        self, strategy: Strategy, epoch: int, metrics: dict[str, float]
    ) -> dict[str, Any]:
        found = self.evaluate()
        files = {}
        if found["miou"] > self.best_miou:
            self.best_miou, self.best_epoch = found["miou"], epoch
            files[BEST] = {
                **self.describe().to_dict(),
                "model": full_model_state(self.model),
                "epoch": epoch + 1,
                "miou": self.best_miou,
            }
        self.last_metrics = found
        plain = {k: v for k, v in found.items() if k != "class_iou"}
        return {"metrics": plain, "files": files}

    def epoch_line(self, metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['loss']:.4f}, val mIoU {metrics['miou']:.2f}, "
            f"pixel accuracy {metrics['pixel_accuracy']:.2f}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "last_metrics": self.last_metrics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_miou = state.get("best_miou", -1.0)
        self.best_epoch = state.get("best_epoch", -1)
        self.last_metrics = state.get("last_metrics") or {}

    def describe(self) -> Segmenter:
        mean, std = self.ready.backbone.normalisation(self.config.data.mean, self.config.data.std)
        backbone = self.ready.backbone
        return Segmenter(
            encoder=backbone.encoder,
            num_classes=len(self.ready.classes),
            classes=self.ready.classes,
            feature_blocks=self.model.blocks,
            img_size=self.ready.size,
            mean=mean,
            std=std,
            source_checkpoint=backbone.source,
        )


def segmentation_loop(config: SegmentConfig, ready: Prepared) -> TrainLoop:
    """The fine-tuning run: model, augmented training view, optimizer, maybe a resume."""
    backbone = ready.backbone
    vit = build_vit(
        backbone, num_classes=0, dynamic_img_size=True, drop_path_rate=config.model.drop_path_rate
    )
    model = SegmentationModel(vit, config.model.feature_blocks, len(ready.classes))
    method = SegmentationTraining(model.to(ready.context.device), config, ready)
    train_set = view(
        ready.train, ready.size, backbone, config.data, train=True, seed=config.run.seed
    )
    return build_loop(method, ready.context, config, train_set)


def fine_tuned(config: SegmentConfig, ready: Prepared) -> dict[str, Any] | None:
    """`--model.freeze false`: train (or resume) with the loop, then score and draw."""
    loop = segmentation_loop(config, ready)
    method: SegmentationTraining = loop.method  # type: ignore[assignment]
    what = (
        f"fine-tuning {config.model.checkpoint} with a linear segmentation head on "
        f"{config.data.source}"
    )

    def train(loop: TrainLoop) -> dict[str, Any]:
        started = time.perf_counter()
        loop.run()
        return {"train_seconds": round(time.perf_counter() - started, 2)}

    done = train_command("segment", config, loop, what, train)
    if done is None:
        return None
    model, context = method.model, ready.context

    def predict(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        with autocast(context.device, context.precision):
            return model(images).argmax(1)

    last = method.last_metrics
    caption = f"linear head, backbone fine-tuned: mIoU {last['miou']:.1f} (last epoch)"
    pictures = draw_predictions(
        config, ready.backbone, method.val_view, ready.classes, predict, caption, context
    )
    return {
        **{k: last[k] for k in ("miou", "pixel_accuracy", "classes_present", "class_iou")},
        "head": "linear",
        "frozen": False,
        "feature_blocks": model.blocks,
        "best_miou": method.best_miou,
        "best_epoch": method.best_epoch + 1,
        "epochs": config.optim.epochs,
        **ready.summary(),
        **done,
        "pictures": None if pictures is None else str(pictures),
    }


def segment(config: SegmentConfig) -> dict[str, Any] | None:
    """Run the chosen way and write `results.json`; the programmatic twin of `droppos segment`
    (None on ranks other than the first, and when a fine-tuning run had already finished)."""
    ready = prepare(config)
    if config.head.name == "knn":
        found: dict[str, Any] | None = dense_knn(config, ready)
    elif config.model.freeze:
        found = linear_probe(config, ready)
    else:
        found = fine_tuned(config, ready)
    if found is None or not ready.context.is_main:
        return None
    if config.model.freeze:
        write_config(config, config.run.output_dir)
    found["results"] = str(
        write_results(config.run.output_dir, "segment", found, ready.context.precision)
    )
    return found


def run(config: SegmentConfig) -> str | None:
    """`droppos segment`: one line with the scores and where they were written."""
    found = segment(config)
    if found is None:
        return None
    how = "dense kNN" if found["head"] == "knn" else "linear head"
    how += " on a frozen backbone" if found["frozen"] else ", backbone fine-tuned"
    best = f" at lr {found['best_lr']:g}" if "best_lr" in found else ""
    return (
        f"segmentation ({how}{best}) of {found['checkpoint']} on {config.data.source}: "
        f"mIoU {found['miou']:.2f}, pixel accuracy {found['pixel_accuracy']:.2f} "
        f"({found['classes_present']} classes present); {found['results']}"
    )
