"""DropPos against MP3, MAE, random init and raw pixels on the full Fashion-MNIST, with ablations
and a label-efficiency study; every choice made on a validation split.

5,000 of the 60,000 training images (class-balanced) are held out as validation: the linear
probe's learning rate, the feature each frozen evaluation reads, the fine-tuning recipe and the
fine-tuned epoch are all chosen there, and the 10,000 test images are read once per reported
number. Every pre-trained row runs `droppos pretrain` with one fixed budget (the same encoder,
epochs, batch and schedule); then kNN and linear probe on frozen features ([CLS], the mean patch
token, and the last 4 blocks' both), the position probe (0.75 of positions dropped) and a dense
proxy (a ridge regression from frozen patch tokens to each patch's foreground fraction). The key
rows are also fine-tuned (`droppos finetune`) with 1 %, 10 % and 100 % of the labels.

One command; resumable: every finished step leaves a JSON file under --output-dir and is
skipped next time, and an interrupted pre-training resumes from its own `last.pth`. Runs one
training at a time (never two on a small machine). Writes the tables (markdown), every number
kept (JSON: per seed, per learning rate, per recipe) and the plots (PNG).

    python benchmarks/study.py --output-dir runs/study --report-dir benchmarks/study

`--smoke` runs every step for one epoch on the embedded demo set (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from droppos.data import build_source
from droppos.data.sources import balanced_pick
from droppos.engine.context import RunContext
from droppos.engine.precision import autocast, resolve_precision
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.datasets import EvalDataSection, eval_view
from droppos.evaluation.features import FeatureBackboneSection, FrozenFeatures, feature_extractor
from droppos.evaluation.knn import knn_accuracy
from droppos.evaluation.linprobe import ProbeSection, train_probes
from droppos.evaluation.position_probe import (
    PositionProbeConfig,
    PositionProbeSection,
    position_probe,
    vit_patch_tokens,
)
from droppos.interop.backbone import Backbone, build_vit
from droppos.models.sizes import demo_encoder

SMOKE_SOURCE = "demo"  # the embedded 4,000 + 1,000 Fashion-MNIST subset: CI has no Debian data


@dataclass
class Where:
    """Where the study reads its data and computes (set once from the command line)."""

    source: str = "fashion-mnist"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 1

    def data_options(self, smoke: bool) -> list[str]:
        source = SMOKE_SOURCE if smoke else self.source
        return ["--data.source", source, "--data.num_workers", str(self.workers)]


WHERE = Where()
FOREGROUND_LEVEL = 0.2  # a pixel is foreground above 20% of full brightness (background is 0)
DENSE_TRAIN_IMAGES = 10_000  # the dense proxy's ridge is fitted on the patches of these

# The fixed pre-training budget of every row (the demo's encoder: 4-block ViT-Tiny width,
# 28x28 greyscale, 7x7 patches -> a 4x4 grid). Decoders are 2 blocks x 256 for every method.
PRETRAIN = [
    "--optim.epochs", "2",
    "--optim.batch_size", "256",
    "--optim.warmup_epochs", "0.25",
    "--optim.base_lr", "2e-3",
    "--model.patch_mask_ratio", "0.75",
    "--run.pictures_every", "0",
    "--run.progress", "false",
    "--run.log_every", "20",
]  # fmt: skip
DROPPOS = ["--model.decoder_embed_dim", "256", "--model.decoder_num_heads", "8"]
SMALL_PIXEL_DECODER = ["embed_dim", "256", "depth", "2", "num_heads", "8"]
MAE = [
    "--model.name", "mae",
    *[f"--model.decoder.{v}" if i % 2 == 0 else v for i, v in enumerate(SMALL_PIXEL_DECODER)],
]  # fmt: skip
MP3 = ["--model.name", "mp3"]  # no decoder: a linear position head on the encoder
PIXEL_BRANCH = [
    f"--model.pixel_branch.{v}" if i % 2 == 0 else v for i, v in enumerate(SMALL_PIXEL_DECODER)
]
WIDER = [
    "--model.encoder.embed_dim", "384",
    "--model.encoder.depth", "6",
    "--model.encoder.num_heads", "6",
]  # fmt: skip
WIDTH_384 = ["--model.encoder.embed_dim", "384", "--model.encoder.num_heads", "6"]
WIDTH_576 = ["--model.encoder.embed_dim", "576", "--model.encoder.num_heads", "9"]
WIDER_SCHEDULE = ["--optim.epochs", "4", "--optim.base_lr", "1e-3"]


@dataclass
class Row:
    """One line of the table: how its backbone is made, with how many seeds, and whether it
    runs the label-efficiency fine-tuning."""

    name: str
    group: str
    kind: str  # "raw" | "random" | "pretrain"
    options: list[str] = field(default_factory=list)
    seeds: int = 1
    labels: bool = False  # fine-tuned with 1 / 10 / 100 % of the labels (seed 0's backbone)
    width: tuple[int, int] | None = None  # a random row's encoder (width, heads), if not 192/3

    @property
    def shape(self) -> list[str]:
        """The `--model.encoder.*` of a random row that is not the demo's width."""
        if self.width is None:
            return []
        return ["--model.encoder.embed_dim", str(self.width[0]),
                "--model.encoder.num_heads", str(self.width[1])]  # fmt: skip


ROWS = [
    Row("raw pixels", "floors", "raw"),
    Row("random init", "floors", "random", seeds=3, labels=True),
    Row("DropPos (paper defaults)", "methods", "pretrain", DROPPOS, seeds=3, labels=True),
    Row("MAE", "methods", "pretrain", MAE, seeds=3, labels=True),
    Row("DropPos + MAE branch", "methods", "pretrain", DROPPOS + PIXEL_BRANCH, labels=True),
    Row("MP3", "methods", "pretrain", MP3, labels=True),
    Row("no smoothing", "objective", "pretrain", [*DROPPOS, "--model.smoothing_sigma", "0"]),
    Row("smoothing, no decay", "objective", "pretrain",
        [*DROPPOS, "--model.smoothing_decay", "false"]),
    Row("no attentive weights", "objective", "pretrain", [*DROPPOS, "--model.attentive", "false"]),
    Row("attentive from visible pass", "objective", "pretrain",
        [*DROPPOS, "--model.attentive_source", "visible"]),
    Row("patch mask 0.5", "patch mask", "pretrain", [*DROPPOS, "--model.patch_mask_ratio", "0.5"]),
    Row("patch mask 0.9", "patch mask", "pretrain", [*DROPPOS, "--model.patch_mask_ratio", "0.9"]),
    Row("position drop 0.5", "position drop", "pretrain",
        [*DROPPOS, "--model.position_drop_ratio", "0.5"]),
    Row("position drop 1.0", "position drop", "pretrain",
        [*DROPPOS, "--model.position_drop_ratio", "1.0"]),
    Row("mask token: zeros", "mask token", "pretrain",
        [*DROPPOS, "--model.mask_token_kind", "zeros"]),
    Row("mask token: wrong_pos", "mask token", "pretrain",
        [*DROPPOS, "--model.mask_token_kind", "wrong_pos"]),
    # Longer budgets and a wider, deeper encoder: what it takes to beat raw pixels. Not in the
    # default run (hours on 2 CPU cores); see STUDY.md for where they ran.
    Row("DropPos, 10 epochs", "budget", "pretrain", [*DROPPOS, "--optim.epochs", "10"]),
    Row("DropPos, 6x384 encoder, 15 epochs", "budget", "pretrain",
        [*DROPPOS, *WIDER, "--optim.epochs", "15"]),
    # The 6x384 row diverged at lr 2e-3: wider encoders of the same depth at half the lr, on a
    # CPU-sized budget (20 to 40 minutes each on 2 cores).
    Row("DropPos, 4x384 encoder, 4 epochs, lr 1e-3", "budget", "pretrain",
        [*DROPPOS, *WIDTH_384, *WIDER_SCHEDULE]),
    Row("DropPos, 4x576 encoder, 4 epochs, lr 1e-3", "budget", "pretrain",
        [*DROPPOS, *WIDTH_576, *WIDER_SCHEDULE]),
    # The same width with random weights: what width alone gives, without pre-training.
    Row("random init, 4x384 encoder", "budget", "random", labels=True, width=(384, 6)),
    Row("DropPos + MAE branch, 4x384 encoder, 4 epochs, lr 1e-3", "budget", "pretrain",
        [*DROPPOS, *PIXEL_BRANCH, *WIDTH_384, *WIDER_SCHEDULE], labels=True),
]  # fmt: skip
ROWS_BY_NAME = {r.name: r for r in ROWS}


# -- selection on validation, and few labels -----------------------------------------------------
VAL_IMAGES = 5_000  # held out of the 60,000 training images (class-balanced): every choice is
SMOKE_VAL_IMAGES = 500  # made on them, and the test split is read once per reported number
SUBSET_SEED = 0  # the same validation and label subsets for every row and seed


@dataclass(frozen=True)
class LabelBudget:
    """One column of the label-efficiency table: how many labelled images, and a schedule of
    about the same number of optimiser steps (~450) for every subset, long enough for the
    small ones to converge."""

    name: str
    images: int  # 0: every training image left after the validation hold-out (55,000)
    batch: int
    epochs: int
    seeds: int

    @property
    def options(self) -> list[str]:
        return [
            "--data.train_images", str(self.images),
            "--optim.batch_size", str(self.batch),
            "--optim.epochs", str(self.epochs),
            "--optim.warmup_epochs", f"{self.epochs / 10:g}",  # a tenth of the steps
        ]  # fmt: skip


LABEL_BUDGETS = [
    LabelBudget("1 %", 600, 16, 12, 3),  # 37 steps an epoch: 444 steps
    LabelBudget("10 %", 6_000, 128, 10, 3),  # 46 steps an epoch: 460 steps
    LabelBudget("100 %", 0, 128, 1, 1),  # 429 steps: one epoch of 55,000
]
SMOKE_BUDGETS = [LabelBudget("1 %", 40, 8, 2, 2), LabelBudget("100 %", 0, 128, 1, 1)]
FINETUNE = ["--data.crop_pct", "1.0", "--run.progress", "false"]
# finetune's defaults are a recipe for 1.28 M images; "light" turns its regularisers off
# (RandAugment, random erasing, drop path) and keeps crops of half the image or more.
AUGMENTATIONS = {
    "default": [],
    "light": ["--augment.auto_augment", "null", "--augment.reprob", "0",
              "--model.drop_path_rate", "0", "--data.crop_scale", "[0.5, 1.0]"],
}  # fmt: skip
# Absolute peak learning rates (`--optim.lr`), the same at every batch size: the linear scaling
# rule would give the 1 % column's batch of 16 an eighth of the others'. 2e-3 is finetune's
# default (base lr 4e-3 at its batch of 128).
FINETUNE_LRS = ["5e-4", "2e-3"]


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe of the grid: an augmentation, a peak lr and a layer decay."""

    augmentation: str
    lr: str
    decay: str

    @property
    def name(self) -> str:
        return f"{self.augmentation}-aug lr {self.lr} layer decay {self.decay}"

    @property
    def options(self) -> list[str]:
        return [*AUGMENTATIONS[self.augmentation], "--optim.lr", self.lr,
                "--optim.layer_decay", self.decay]  # fmt: skip


def recipe_grid(row: Row, smoke: bool) -> dict[str, Recipe]:
    """The fine-tuning recipes a row chooses among on validation (at 1 % of the labels, seed 0):
    both augmentations x two learning rates, with finetune's layer decay 0.75 for pre-trained
    weights; random weights also try none (1.0), a layer decay being a recipe for
    pre-trained ones."""
    decays = ["0.75", "1.0"] if row.kind == "random" else ["0.75"]
    lrs = FINETUNE_LRS[-1:] if smoke else FINETUNE_LRS
    recipes = [Recipe(a, lr, d) for a in AUGMENTATIONS for lr in lrs for d in decays]
    return {recipe.name: recipe for recipe in recipes}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def droppos(*args: str) -> None:
    """One droppos command in its own process (as a user runs it); its stderr on failure."""
    entry = "import sys; from droppos.cli.main import main; sys.exit(main())"  # keep its exit code
    command = [sys.executable, "-c", entry, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: droppos {' '.join(args)}\n{done.stderr[-3000:]}")


def cached(path: Path, compute: Any) -> dict[str, Any]:
    """The JSON at `path`, or compute it and write it (atomically: a kill leaves no half file)."""
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = compute()
    result[f"{path.stem}_seconds"] = round(time.perf_counter() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(path)
    return result


class EvalViews:
    """The training and test splits through the evaluation view (native 28x28, no resize),
    decoded once, and the class-balanced validation hold-out of the training split: the same
    images `--data.val_from_train` holds out of a `droppos finetune` run."""

    def __init__(self, smoke: bool) -> None:
        self.source = SMOKE_SOURCE if smoke else WHERE.source
        self.data = EvalDataSection(source=self.source, crop_pct=1.0, num_workers=0)
        self.held_out_images = SMOKE_VAL_IMAGES if smoke else VAL_IMAGES
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, backbone: Backbone) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"train": all training images, "val": the official test split} (images, labels)."""
        if not self.splits:
            for split in ("train", "val"):
                source = build_source(self.source, split)
                dataset = eval_view(source, self.data, backbone)
                images, labels = zip(*(dataset[i] for i in range(len(dataset))))
                self.splits[split] = (torch.stack(images), torch.as_tensor(labels))
                if split == "train":
                    held = balanced_pick(
                        source.all_labels(), self.held_out_images, SUBSET_SEED, "validation"
                    )  # fmt: skip (as labelled_splits picks)
            self.held_out = torch.as_tensor(held)
            rest = torch.ones(len(self.splits["train"][1]), dtype=torch.bool)
            rest[self.held_out] = False
            self.fit = rest.nonzero().flatten()
            self.mean, self.std = backbone.mean or (0.5,), backbone.std or (0.5,)
        same = (backbone.mean or (0.5,), backbone.std or (0.5,)) == (self.mean, self.std)
        if not same:  # every row of the study trains on the same normalisation
            raise SystemExit(f"{backbone.source}: normalised unlike the study's other rows")
        return self.splits


def precision() -> str:
    """What `--run.precision auto` resolves to on this machine (what every run here used)."""
    return resolve_precision("auto", WHERE.device)


@torch.inference_mode()
def in_batches(model: Any, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """`model` over `images` a batch at a time, on the study's device and precision (fp32 out)."""
    device = WHERE.device
    parts = []
    for chunk in images.split(batch):
        with autocast(device, precision()):
            parts.append(model(chunk.to(device)).float().cpu())
    return torch.cat(parts)


def tokens_of(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """All final-norm tokens [N, 1+L, D] of the backbone (every position kept)."""
    vit = build_vit(backbone, num_classes=0).to(WHERE.device).eval()
    return in_batches(lambda chunk: vit_patch_tokens(vit, chunk), images)


def last_blocks_of(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """The `--model.feature cls+avg` feature of `droppos linprobe` and `knn` (last 4 blocks)."""
    section = FeatureBackboneSection(checkpoint="unused", feature="cls+avg", feature_blocks=4)
    return in_batches(feature_extractor(backbone, section).to(WHERE.device).eval(), images)


def foreground_fraction(images: torch.Tensor, mean: float, std: float, patch: int) -> torch.Tensor:
    """[N, 1, H, W] normalised -> [N, L]: each patch's share of pixels above FOREGROUND_LEVEL."""
    pixels = images * std + mean
    foreground = (pixels > FOREGROUND_LEVEL).float()
    return torch.nn.functional.avg_pool2d(foreground, patch).flatten(1)


def dense_proxy(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor
) -> dict[str, float]:
    """Ridge regression from a patch's frozen feature to its foreground fraction.

    Closed form (standardised features, lambda 1e-3 x trace): no learning rate to tune, so the
    score says what the features hold. Reported: mean absolute error in percentage points of a
    patch, and the mIoU (foreground / background) of the patches thresholded at half full.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], 1).double()
    gram = x.T @ x
    gram += 1e-3 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    weights = torch.linalg.solve(gram, x.T @ train_y.double())
    xv = torch.cat([(val_x - mean) / std, torch.ones(len(val_x), 1)], 1).double()
    predicted = (xv @ weights).float().clamp(0, 1)
    ious = []
    for truth, guess in ((val_y >= 0.5, predicted >= 0.5), (val_y < 0.5, predicted < 0.5)):
        ious.append(float((truth & guess).sum() / (truth | guess).sum().clamp(min=1)))
    return {
        "dense_mae": float((predicted - val_y).abs().mean() * 100),
        "dense_miou": 100 * sum(ious) / 2,
    }


def dense_score(
    train_features: torch.Tensor, val_features: torch.Tensor,
    train_images: torch.Tensor, val_images: torch.Tensor, views: EvalViews, patch: int,
) -> dict[str, float]:  # fmt: skip
    """The dense proxy of per-patch features [N, L, F] against each patch's foreground share."""
    fitted = min(DENSE_TRAIN_IMAGES, len(train_images))
    mean, std = views.mean[0], views.std[0]
    return dense_proxy(
        train_features[:fitted].flatten(0, 1),
        foreground_fraction(train_images[:fitted], mean, std, patch).flatten(),
        val_features.flatten(0, 1),
        foreground_fraction(val_images, mean, std, patch).flatten(),
    )


def probe_section(smoke: bool, base_lrs: list[float] | None = None) -> ProbeSection:
    """The linear probe of `droppos linprobe` (LARS, BatchNorm, lr sweep), 30 epochs."""
    section = ProbeSection(epochs=2 if smoke else 30, warmup_epochs=1 if smoke else 5)
    if base_lrs is not None:
        section.base_lrs = base_lrs
    return section


FEATURES = ("cls", "avg", "cls+avg")  # the `--model.feature` choices of linprobe and knn


def selected_scores(
    name: str, train_x: torch.Tensor, test_x: torch.Tensor, views: EvalViews,
    backbone: Backbone, smoke: bool,
) -> dict[str, Any]:  # fmt: skip
    """kNN (k=20, T=0.07) and the linear probe on one kind of feature, fitted on the training
    images less the validation hold-out. The probe's learning rate is the best of the sweep on
    validation; the test split is read once, by the kNN and by that one probe."""
    device = WHERE.device
    (_, train_y), (_, test_y) = views.splits["train"], views.splits["val"]
    fit, held = views.fit, views.held_out
    fit_x, fit_y = train_x[fit].to(device), train_y[fit].to(device)
    val_x, val_y = train_x[held].to(device), train_y[held].to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    knn_val = knn_accuracy(fit_x, fit_y, val_x, val_y, 10)["top1"]
    knn_test = knn_accuracy(fit_x, fit_y, test_x, test_y, 10)["top1"]
    on_val = FrozenFeatures(fit_x, fit_y, val_x, val_y, 10, backbone, 0.0)
    sweep = train_probes(on_val, probe_section(smoke))
    best = max(sweep, key=lambda r: (r["top1"], r["top5"]))
    on_test = FrozenFeatures(fit_x, fit_y, test_x, test_y, 10, backbone, 0.0)
    # the same probe again (same init and batches), scored on test
    test = train_probes(on_test, probe_section(smoke, [best["base_lr"]]))[0]
    return {
        f"knn_{name}": knn_test, f"knn_{name}_val": knn_val,
        f"linprobe_{name}": test["top1"], f"linprobe_{name}_val": best["top1"],
        f"linprobe_{name}_base_lr": best["base_lr"],
        f"linprobe_{name}_sweep_val": {str(r["base_lr"]): r["top1"] for r in sweep},
    }  # fmt: skip


def pick_features(result: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The feature each evaluation reads, chosen by its validation score (test not looked at)."""
    for evaluation in ("knn", "linprobe"):
        chosen = max(names, key=lambda name: result[f"{evaluation}_{name}_val"])
        result[f"{evaluation}_feature"] = chosen
        result[f"{evaluation}_picked"] = result[f"{evaluation}_{chosen}"]
    return result


def frozen_evaluation(backbone: Backbone, views: EvalViews, smoke: bool) -> dict[str, Any]:
    """kNN and linear probe on each feature ([CLS], mean patch token, the last 4 blocks' both),
    and the dense proxy: one feature pass per split."""
    splits = views.get(backbone)
    (train_images, _), (test_images, _) = splits["train"], splits["val"]
    tokens = {split: tokens_of(backbone, images) for split, (images, _) in splits.items()}
    features = {
        "cls": (tokens["train"][:, 0], tokens["val"][:, 0]),
        "avg": (tokens["train"][:, 1:].mean(1), tokens["val"][:, 1:].mean(1)),
        "cls+avg": (last_blocks_of(backbone, train_images), last_blocks_of(backbone, test_images)),
    }
    result: dict[str, Any] = {"precision": precision(), "threads": torch.get_num_threads()}
    for name, (train_x, test_x) in features.items():
        result |= selected_scores(name, train_x, test_x, views, backbone, smoke)
    fit = views.fit
    result |= dense_score(tokens["train"][fit, 1:], tokens["val"][:, 1:], train_images[fit],
                          test_images, views, backbone.encoder.patch_size)  # fmt: skip
    return pick_features(result, FEATURES)


def raw_pixel_evaluation(views: EvalViews, smoke: bool) -> dict[str, Any]:
    """The floor: the flattened, standardised image; for the dense proxy, the patch's pixels."""
    probe_backbone = backbone_from(BackboneSection(checkpoint="random"))
    splits = views.get(probe_backbone)
    (train_images, _), (test_images, _) = splits["train"], splits["val"]
    fitted = train_images[views.fit].flatten(1)
    mean, std = fitted.mean(0), fitted.std(0) + 1e-6
    train_x, test_x = [(x.flatten(1) - mean) / std for x in (train_images, test_images)]
    result = selected_scores("pixels", train_x, test_x, views, probe_backbone, smoke)
    result |= {"precision": "fp32", "threads": torch.get_num_threads()}
    patch = probe_backbone.encoder.patch_size
    fit = views.fit[:DENSE_TRAIN_IMAGES]
    train_patches, test_patches = [
        torch.nn.functional.unfold(images, patch, stride=patch).transpose(1, 2)  # [N, L, p*p]
        for images in (train_images[fit], test_images)
    ]
    result |= dense_score(train_patches, test_patches, train_images[fit], test_images, views,
                          patch)  # fmt: skip
    return pick_features(result, ("pixels",))


def raw_pixel_labels(views: EvalViews, smoke: bool) -> dict[str, Any]:
    """What a user with a few labels tries first: a linear classifier (`droppos linprobe`'s,
    LARS on BatchNorm-standardised pixels: a logistic regression) and kNN (k 20, T 0.07) on the
    raw pixels of the label-efficiency table's subsets (the same images `--data.train_images`
    picks). The probe's lr is chosen on validation; its seeds vary initialisation and batch
    order, as the fine-tuning seeds do; kNN has no seed."""
    backbone = backbone_from(BackboneSection(checkpoint="random"))
    splits = views.get(backbone)
    (train_images, train_y), (test_images, test_y) = splits["train"], splits["val"]
    train_x, test_x = train_images.flatten(1), test_images.flatten(1)
    val_x, val_y = train_x[views.held_out], train_y[views.held_out]
    found: dict[str, Any] = {}
    for budget in SMOKE_BUDGETS if smoke else LABEL_BUDGETS:
        fit = views.fit
        if budget.images:
            fit = fit[balanced_pick(train_y[fit].tolist(), budget.images, SUBSET_SEED, "labels")]
        fit_x, fit_y = train_x[fit], train_y[fit]

        def probe(
            x: torch.Tensor, y: torch.Tensor, lrs: list[float] | None, seed: int,
            fit_x: torch.Tensor = fit_x, fit_y: torch.Tensor = fit_y,
        ) -> Any:  # fmt: skip
            features = FrozenFeatures(fit_x, fit_y, x, y, 10, backbone, 0.0)
            return train_probes(features, probe_section(smoke, lrs), seed)

        sweep = probe(val_x, val_y, None, 0)
        best = max(sweep, key=lambda r: (r["top1"], r["top5"]))["base_lr"]
        seeds = range(budget.seeds)
        found[budget.name] = {
            "images": len(fit),
            "logistic_regression_base_lr": best,
            "logistic_regression_val": {str(r["base_lr"]): r["top1"] for r in sweep},
            "logistic_regression": [probe(test_x, test_y, [best], s)[0]["top1"] for s in seeds],
            "knn_val": knn_accuracy(fit_x, fit_y, val_x, val_y, 10)["top1"],
            "knn": knn_accuracy(fit_x, fit_y, test_x, test_y, 10)["top1"],
        }
    return found


def raw_pixel_label_rows(found: dict[str, Any]) -> str:
    """Two rows of the label-efficiency table (mean ± std over probe seeds)."""
    cells = []
    for name in found:
        values = found[name]["logistic_regression"]
        spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        lr = found[name]["logistic_regression_base_lr"]
        cells.append(f"{statistics.mean(values):.1f}{spread} (base lr {lr:g})")
    knn = [f"{found[name]['knn']:.1f}" for name in found]
    return (
        "| raw pixels, logistic regression | - | " + " | ".join(cells) + " |\n"
        "| raw pixels, kNN (k 20) | - | " + " | ".join(knn) + " |\n"
    )


def run_seed(row: Row, seed: int, root: Path, views: EvalViews, smoke: bool) -> dict[str, Any]:
    """Pre-train (unless a floor), then every evaluation; each step cached as JSON."""
    folder = root / slug(row.name) / f"seed{seed}"
    if row.kind == "raw":
        return cached(folder / "frozen.json", lambda: raw_pixel_evaluation(views, smoke))
    result: dict[str, Any] = {"seed": seed}
    checkpoint = pretrained(row, seed, root, smoke)
    if row.kind == "pretrain":
        summary = json.loads((Path(checkpoint).parent / "summary.json").read_text())
        result["pretrain_seconds"] = summary["wall_seconds"]
        result["pretrain_precision"] = summary.get("precision")
        if "position_accuracy" in summary:  # position-prediction rows only: MAE has none
            result["position_accuracy"] = 100 * summary["position_accuracy"]

    def backbone() -> Backbone:
        torch.manual_seed(seed)  # a random-init row's weights are its seed's
        encoder = replace(demo_encoder(), **shape_of(row))
        return backbone_from(BackboneSection(checkpoint=checkpoint, encoder=encoder))

    result |= cached(folder / "frozen.json", lambda: frozen_evaluation(backbone(), views, smoke))
    result |= cached(folder / "position.json", lambda: position_scores(row, checkpoint, seed,
                                                                        folder, smoke))  # fmt: skip
    steps = ("pretrain_seconds", "frozen_seconds", "position_seconds")
    result["wall_seconds"] = sum(result.get(key, 0.0) for key in steps)
    return result


def shape_of(row: Row) -> dict[str, int]:
    return {} if row.width is None else {"embed_dim": row.width[0], "num_heads": row.width[1]}


def pretrained(row: Row, seed: int, root: Path, smoke: bool) -> str:
    """The row's seed's weights: its pre-training's `last.pth` (run, or resumed, if not
    finished), or `random` for the random-init rows."""
    if row.kind != "pretrain":
        return "random"
    pretrain_dir = root / slug(row.name) / f"seed{seed}" / "pretrain"
    if not (pretrain_dir / "summary.json").exists():
        droppos("pretrain", *PRETRAIN, *WHERE.data_options(smoke), *row.options,
                *smoke_pretrain(smoke),
                "--run.seed", str(seed), "--run.output_dir", str(pretrain_dir))  # fmt: skip
    return str(pretrain_dir / "last.pth")


def smoke_pretrain(smoke: bool) -> list[str]:
    """The smoke run: the embedded demo set (4,000 images), one epoch (16 steps)."""
    return ["--optim.epochs", "1"] if smoke else []


def position_scores(
    row: Row, checkpoint: str, seed: int, folder: Path, smoke: bool
) -> dict[str, Any]:
    torch.manual_seed(seed)
    config = PositionProbeConfig(
        model=BackboneSection(
            checkpoint=checkpoint, encoder=replace(demo_encoder(), **shape_of(row))
        ),
        data=EvalDataSection(source=SMOKE_SOURCE if smoke else WHERE.source, crop_pct=1.0),
        probe=PositionProbeSection(
            seeds=1 if smoke else 3,
            epochs=2 if smoke else 30,
            max_train_images=500 if smoke else 10_000,
            max_val_images=200 if smoke else 2_000,
        ),
    )
    config.run.output_dir = str(folder / "probe-position")
    config.run.progress = False
    found = position_probe(config, RunContext.local(WHERE.device, precision()))
    return {"position_probe": found["top1"], "position_probe_within_one": found["within_one_cell"]}


def finetune_run(
    row: Row, checkpoint: str, seed: int, folder: Path, budget: LabelBudget, recipe: list[str],
    views: EvalViews, smoke: bool,
) -> dict[str, Any]:  # fmt: skip
    """One `droppos finetune` on `budget`'s labelled subset, scored on the validation hold-out
    every epoch; its best epoch on validation (`best.pth`) is then scored once on test."""

    def run() -> dict[str, Any]:
        droppos("finetune", *FINETUNE, *WHERE.data_options(smoke), *budget.options, *recipe,
                "--data.val_from_train", str(views.held_out_images),
                "--data.subset_seed", str(SUBSET_SEED), *row.shape,
                "--model.checkpoint", checkpoint, "--run.seed", str(seed),
                "--run.output_dir", str(folder))  # fmt: skip
        found = json.loads((folder / "results.json").read_text())
        return {
            "val_top1": found["best_top1"], "val_last_top1": found["top1"],
            "best_epoch": found["best_epoch"], "epochs": found["epochs"],
            "train_size": found["train_size"], "val_size": found["val_size"],
            "precision": found["precision"], "threads": found["threads"],
            "train_seconds": found["train_seconds"],
            "test_top1": classifier_test_top1(folder / "best.pth", views),
        }  # fmt: skip

    return cached(folder / "scores.json", run)


def classifier_test_top1(path: Path, views: EvalViews) -> float:
    """Top-1 (%) of a fine-tuned classifier on the official test split."""
    backbone = backbone_from(BackboneSection(checkpoint=str(path)))
    model = build_vit(backbone, backbone.num_classes, backbone.global_pool)
    images, labels = views.get(backbone)["val"]
    predicted = in_batches(model.to(WHERE.device).eval(), images).argmax(-1)
    return 100 * int((predicted == labels).sum()) / len(labels)


def label_efficiency(
    row: Row, root: Path, views: EvalViews, smoke: bool, seeds: int | None = None
) -> dict[str, Any]:
    """Fine-tune seed 0's backbone with 1 / 10 / 100 % of the labels, every choice on
    validation (fine-tuning seed 0): the recipe is the best of `recipe_grid` at the smallest
    subset; each larger subset keeps its augmentation and layer decay and picks its own
    learning rate again (the best lr for 600 images need not be the best for 6,000). Each
    reported figure is a run's best validation epoch, on test. `seeds` caps the fine-tuning
    seeds (a first pass gives every row its seed 0)."""
    checkpoint = pretrained(row, 0, root, smoke)
    folder = root / slug(row.name) / "labels"
    budgets = SMOKE_BUDGETS if smoke else LABEL_BUDGETS
    grid = recipe_grid(row, smoke)

    def run(budget: LabelBudget, recipe: Recipe, seed: int) -> dict[str, Any]:
        where = folder / slug(f"{budget.name} {recipe.name}") / f"seed{seed}"
        return finetune_run(row, checkpoint, seed, where, budget, recipe.options, views, smoke)

    def best(budget: LabelBudget, recipes: list[Recipe]) -> tuple[Recipe, dict[str, Any]]:
        tried = {recipe.name: run(budget, recipe, 0) for recipe in recipes}
        return max(recipes, key=lambda recipe: tried[recipe.name]["val_top1"]), tried

    chosen, tried = best(budgets[0], list(grid.values()))
    found: dict[str, Any] = {"recipe": chosen.name, "grid": tried, "budgets": {}}
    for budget in budgets:
        if budget is not budgets[0]:  # the same recipe but for its lr, chosen again
            lrs = dict.fromkeys(r.lr for r in grid.values())  # in the grid's order
            recipe, tried = best(budget, [replace(chosen, lr=lr) for lr in lrs])
        else:
            recipe = chosen
        count = budget.seeds if seeds is None else min(budget.seeds, seeds)
        runs = [run(budget, recipe, seed) for seed in range(count)]
        found["budgets"][budget.name] = {
            "images": runs[0]["train_size"],
            "recipe": recipe.name,
            "lr": recipe.lr,
            "tried_val": {name: result["val_top1"] for name, result in tried.items()},
            "seeds": runs,
            "steps": budget.epochs * (runs[0]["train_size"] // budget.batch),
        }
    return found


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


COLUMNS = [
    ("knn_cls", "kNN [CLS]"),
    ("knn_avg", "kNN mean-patch"),
    ("knn_cls+avg", "kNN last-4 [CLS]+mean"),
    ("linprobe_cls", "lin. probe [CLS]"),
    ("linprobe_avg", "lin. probe mean-patch"),
    ("linprobe_cls+avg", "lin. probe last-4 [CLS]+mean"),
    ("linprobe_picked", "lin. probe, feature picked on val"),
    ("position_probe", "position probe"),
    ("dense_mae", "dense MAE (pp, lower better)"),
    ("dense_miou", "dense mIoU"),
    ("position_accuracy", "pretext pos. acc."),
    ("pretrain_seconds", "pre-train s"),
    ("wall_seconds", "row s (per seed)"),
]


def summarise(row: Row, seeds: list[dict[str, Any]], labels: dict[str, Any] | None) -> dict:
    """Per column: mean and std over the row's seeds (std 0 for one seed); the label-efficiency
    figures (mean and std over fine-tuning seeds); and every seed's own numbers."""
    if row.kind == "raw":  # one image vector stands in for every feature
        only = seeds[0]
        pixels = {k: only[f"{k}_pixels"] for k in ("knn", "linprobe")}
        seeds = [{f"{k}_{f}": v for k, v in pixels.items() for f in FEATURES} | only]
    summary: dict[str, Any] = {"row": row.name, "group": row.group, "seeds": len(seeds)}
    for key, _ in COLUMNS:
        found = mean_std([s.get(key) for s in seeds])
        if found is not None:
            summary[key], summary[f"{key}_std"] = found
    picked = sorted({s["linprobe_feature"] for s in seeds})
    summary["linprobe_feature"] = "/".join(picked)
    summary["precision"] = "/".join(sorted({s.get("pretrain_precision") or s["precision"]
                                            for s in seeds}))  # fmt: skip
    summary["threads"] = seeds[0]["threads"]
    summary["per_seed"] = seeds
    if labels is not None:
        summary["labels"] = labels
        for name, budget in labels["budgets"].items():
            found = mean_std([run["test_top1"] for run in budget["seeds"]])
            summary[f"finetune {name}"], summary[f"finetune {name}_std"] = found
    return summary


def cell(summary: dict[str, Any], key: str, seeds: int) -> str:
    if summary.get(key) is None:
        return "–"
    if key.endswith("_seconds"):
        return f"{summary[key]:.0f}"
    if seeds > 1:
        return f"{summary[key]:.1f} ± {summary[f'{key}_std']:.1f}"
    return f"{summary[key]:.1f}"


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """The frozen-feature table, then the label-efficiency table of the rows that ran it."""
    titles = [title for _, title in COLUMNS]
    lines = ["| row | seeds | " + " | ".join(titles) + " | probe's pick | precision |",
             "|" + "---|" * (len(COLUMNS) + 4)]  # fmt: skip
    for s in summaries:
        cells = [cell(s, key, s["seeds"]) for key, _ in COLUMNS]
        lines.append(f"| {s['row']} | {s['seeds']} | " + " | ".join(cells)
                     + f" | {s['linprobe_feature']} | {s['precision']} |")  # fmt: skip
    labelled = [s for s in summaries if "labels" in s]
    if labelled:
        budgets = list(labelled[0]["labels"]["budgets"])
        lines += ["", "| row | recipe (picked on val at " + budgets[0] + ") | "
                  + " | ".join(f"fine-tune {b} labels (lr picked on val)" for b in budgets)
                  + " |", "|" + "---|" * (len(budgets) + 2)]  # fmt: skip
        for s in labelled:
            found = s["labels"]["budgets"]
            cells = [
                f"{cell(s, f'finetune {b}', len(found[b]['seeds']))} (lr {found[b]['lr']})"
                for b in budgets
            ]
            lines.append(f"| {s['row']} | {s['labels']['recipe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summaries: list[dict[str, Any]], rows: list[Row], root: Path, report: Path) -> None:
    """Three PNGs: pretext position accuracy over pre-training, frozen-feature accuracy per
    row, and fine-tuning accuracy against the number of labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    drawn = 0
    for row in rows:
        if row.kind != "pretrain" or "position_accuracy" not in summary_of(summaries, row):
            continue
        metrics = root / slug(row.name) / "seed0" / "pretrain" / "metrics.jsonl"
        if not metrics.exists():
            continue
        # A run restarted before its first checkpoint logs the same steps again: keep the last.
        accuracy = {
            r["step"]: 100 * r["position_accuracy"]
            for line in metrics.read_text().splitlines()
            if (r := json.loads(line)).get("kind") == "step" and "position_accuracy" in r
        }
        steps = sorted(accuracy)
        axis.plot(
            steps,
            [accuracy[s] for s in steps],
            label=row.name,
            color=plt.get_cmap("tab20")(drawn % 20),
            linestyle="-" if drawn < 20 else "--",
            linewidth=2.5 if row.seeds > 1 else 1,
        )  # fmt: skip (a colour per row)
        drawn += 1
    axis.axhline(100 / 16, color="grey", linestyle=":", label="chance (1/16)")
    axis.set(xlabel="pre-training step", ylabel="position accuracy on dropped tokens (%)",
             title="Pretext position accuracy during pre-training (seed 0)")  # fmt: skip
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    if drawn:  # (a replot without the runs' metrics keeps the picture it has)
        figure.savefig(report / "position_accuracy.png", dpi=120)
    plt.close(figure)

    keys = [("knn_picked", "kNN"), ("linprobe_picked", "linear probe")]
    figure, axis = plt.subplots(figsize=(10, 5.5))
    width = 0.4
    names = [s["row"] for s in summaries]
    for i, (key, label) in enumerate(keys):
        xs = [j + (i - 0.5) * width for j in range(len(summaries))]
        values = [s.get(key) or math.nan for s in summaries]
        errors = [s.get(f"{key}_std") or 0.0 for s in summaries]
        axis.bar(xs, values, width, yerr=errors, capsize=2,
                 label=f"{label} (feature picked on validation)")  # fmt: skip
    axis.set_xticks(range(len(names)), names, rotation=50, ha="right", fontsize=8)
    axis.set_ylim(0, 112)  # from zero: a cut axis would magnify the gaps (and room for the key)
    axis.set_yticks(range(0, 101, 20))
    axis.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance (10 classes)")
    axis.set(ylabel="top-1 on the test split (%)",
             title="Frozen features per row (mean ± std over seeds)")  # fmt: skip
    axis.legend(loc="upper center", ncol=3, fontsize=8)
    figure.tight_layout()
    figure.savefig(report / "downstream.png", dpi=120)
    plt.close(figure)

    labelled = [s for s in summaries if "labels" in s]
    if not labelled:
        return
    figure, axis = plt.subplots(figsize=(8, 5))
    markers, styles = "osD^vP*X", ["-", "--", "-.", ":"]
    for i, s in enumerate(labelled):
        budgets = s["labels"]["budgets"].values()
        # Rows that score alike would hide one another: each is nudged sideways a little (on
        # the log axis) and has its own marker and line style.
        nudge = 1.04 ** (i - (len(labelled) - 1) / 2)
        xs = [b["images"] * nudge for b in budgets]
        means = [statistics.fmean(r["test_top1"] for r in b["seeds"]) for b in budgets]
        spread = [statistics.stdev([r["test_top1"] for r in b["seeds"]])
                  if len(b["seeds"]) > 1 else 0.0 for b in budgets]  # fmt: skip
        axis.errorbar(xs, means, yerr=spread, marker=markers[i % len(markers)], capsize=3,
                      linestyle=styles[i % len(styles)], label=s["row"],
                      color=plt.get_cmap("tab10")(i % 10))  # fmt: skip
    axis.set_xscale("log")
    axis.set(xlabel="labelled training images (log scale)", ylabel="top-1 on the test split (%)",
             title="Fine-tuning with few labels (mean ± std over fine-tuning seeds)")  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(report / "label_efficiency.png", dpi=120)
    plt.close(figure)


def summary_of(summaries: list[dict[str, Any]], row: Row) -> dict[str, Any]:
    return next((s for s in summaries if s["row"] == row.name), {})


FASHION_MNIST_FILE = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def ensure_fashion_mnist(install: bool) -> None:
    """The study's data: Debian's dataset-fashion-mnist. Installed only when asked
    (`--install-data`); otherwise the command to run is said and the study stops."""
    if FASHION_MNIST_FILE.exists():
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    commands = (["apt-get", "update"], ["apt-get", "install", "-y", "dataset-fashion-mnist"])
    if not install:
        said = " && ".join(" ".join([*sudo, *command]) for command in commands)
        raise SystemExit(
            f"the study needs Fashion-MNIST: run `{said}`, or pass --install-data to let the "
            "study run it, or --source fashion-mnist:DIR for the IDX files elsewhere"
        )
    print("installing the Debian package dataset-fashion-mnist", flush=True)
    for command in commands:
        try:
            done = subprocess.run([*sudo, *command], capture_output=True, text=True)
        except OSError as error:  # no apt-get (not Debian), no sudo
            raise SystemExit(f"`{' '.join([*sudo, *command])}` cannot run: {error}") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
            raise SystemExit(
                f"`{' '.join([*sudo, *command])}` failed (exit {done.returncode}): {said[-1]}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/study"),
                        help="every run's outputs; finished steps here are skipped")  # fmt: skip
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="write table.md, study.json and the PNG plots here")  # fmt: skip
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], metavar="ROW",
                        default=[r.name for r in ROWS if r.group != "budget"],
                        help="rows to run (default: all but the 'budget' group)")  # fmt: skip
    parser.add_argument("--source", default="fashion-mnist",
                        help="fashion-mnist, or fashion-mnist:DIR (the IDX files)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="where the frozen evaluations run")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="cap the pre-training seeds of every row (not the fine-tuning seeds)",
    )
    parser.add_argument("--no-labels", action="store_true",
                        help="skip the label-efficiency fine-tuning")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on the embedded demo set (what CI runs)")  # fmt: skip
    parser.add_argument("--install-data", action="store_true",
                        help="apt-get install dataset-fashion-mnist if missing")  # fmt: skip
    parser.add_argument("--raw-pixel-labels", action="store_true",
                        help="only the label-efficiency rows of raw pixels (logistic regression "
                        "and kNN), written to --report-dir/raw_pixel_labels.json")  # fmt: skip
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots from --report-dir's study.json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.replot:
        if args.report_dir is None:
            raise SystemExit("--replot needs --report-dir (where study.json is)")
        summaries = json.loads((args.report_dir / "study.json").read_text())
        rows = [ROWS_BY_NAME[s["row"]] for s in summaries if s["row"] in ROWS_BY_NAME]
        plot(summaries, rows, args.output_dir, args.report_dir)
        return
    WHERE.source, WHERE.device, WHERE.workers = args.source, torch.device(args.device), args.workers
    if not args.smoke and args.source == "fashion-mnist":
        ensure_fashion_mnist(args.install_data)
    rows = [ROWS_BY_NAME[name] for name in args.rows]
    views = EvalViews(args.smoke)
    if args.raw_pixel_labels:
        found_raw = cached(args.output_dir / "raw-pixels" / "labels.json",
                           lambda: raw_pixel_labels(views, args.smoke))  # fmt: skip
        print(raw_pixel_label_rows({k: v for k, v in found_raw.items() if "%" in k}))
        if args.report_dir is not None:
            args.report_dir.mkdir(parents=True, exist_ok=True)
            (args.report_dir / "raw_pixel_labels.json").write_text(json.dumps(found_raw, indent=1))
        return
    started = time.perf_counter()

    def say(what: str) -> None:
        print(f"{what} ({time.perf_counter() - started:.0f} s into this sitting)", flush=True)

    found: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    labels: dict[str, dict[str, Any]] = {}

    def labelled(row: Row, seeds: int | None) -> None:
        try:
            labels[row.name] = label_efficiency(row, args.output_dir, views, args.smoke, seeds)
        except SystemExit as refused:
            print(f"{row.name}, labels: not run: {refused}", flush=True)
            return
        say(f"{row.name}, label efficiency ({seeds or 'all'} seeds): done")

    for seed in range(max(row.seeds for row in rows)):  # every row's seed 0 first, then more
        for row in rows:
            if seed < min(row.seeds, args.seeds or row.seeds):
                try:
                    found[row.name].append(run_seed(row, seed, args.output_dir, views, args.smoke))
                except SystemExit as refused:  # e.g. an option droppos refuses: say so, go on
                    print(f"{row.name}, seed {seed}: not run: {refused}", flush=True)
                    continue
                say(f"{row.name}, seed {seed}: done")
            if seed == 0 and row.labels and not args.no_labels and found[row.name]:
                labelled(row, 1)  # every row's seed 0 first
        if seed == 0 and not args.no_labels:
            for row in rows:
                if row.labels and found[row.name]:
                    labelled(row, None)
    summaries = [
        summarise(row, found[row.name], labels.get(row.name)) for row in rows if found[row.name]
    ]
    table = markdown_table(summaries)
    print(table)
    if args.report_dir is not None:
        args.report_dir.mkdir(parents=True, exist_ok=True)
        (args.report_dir / "table.md").write_text(table + "\n")
        (args.report_dir / "study.json").write_text(json.dumps(summaries, indent=1) + "\n")
        plot(summaries, rows, args.output_dir, args.report_dir)


if __name__ == "__main__":
    main()
