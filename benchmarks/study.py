"""DropPos against MAE, random init and raw pixels on the full Fashion-MNIST, with ablations.

Every pre-trained row runs `droppos pretrain` with one fixed budget (the same encoder, epochs,
batch and schedule), then one evaluation pass on the official splits (60,000 train / 10,000
test): kNN and linear probe on frozen features ([CLS] and the mean patch token), a short
`droppos finetune`, the position probe (0.75 of positions dropped) and a dense proxy (a linear
probe on frozen patch tokens predicting each patch's foreground fraction). Raw pixels and
random initialisation are the floors.

One command; resumable: every finished step leaves a JSON file under --output-dir and is
skipped next time, and an interrupted pre-training resumes from its own `last.pth`. Runs one
training at a time (never two on a small machine). Writes the table (markdown), the raw
numbers (JSON) and the plots (PNG).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from droppos.data import build_source
from droppos.engine.context import RunContext
from droppos.engine.precision import autocast
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.datasets import EvalDataSection, eval_view
from droppos.evaluation.features import FrozenFeatures
from droppos.evaluation.knn import knn_accuracy
from droppos.evaluation.linprobe import ProbeSection, train_probes
from droppos.evaluation.position_probe import (
    PositionProbeConfig,
    PositionProbeSection,
    position_probe,
    vit_patch_tokens,
)
from droppos.interop.backbone import Backbone, build_vit

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
FINETUNE = [
    "--data.crop_pct", "1.0",
    "--optim.epochs", "1",
    "--optim.warmup_epochs", "0.1",
    "--run.progress", "false",
]  # fmt: skip


@dataclass
class Row:
    """One line of the table: how its backbone is made, and with how many seeds."""

    name: str
    group: str
    kind: str  # "raw" | "random" | "pretrain"
    options: list[str] = field(default_factory=list)
    seeds: int = 1


ROWS = [
    Row("raw pixels", "floors", "raw"),
    Row("random init", "floors", "random", seeds=3),
    Row("DropPos (paper defaults)", "methods", "pretrain", DROPPOS, seeds=3),
    Row("MAE", "methods", "pretrain", MAE, seeds=3),
    Row("DropPos + MAE branch", "methods", "pretrain", DROPPOS + PIXEL_BRANCH),
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
    Row("DropPos + MAE branch, 4x384 encoder, 4 epochs, lr 1e-3", "budget", "pretrain",
        [*DROPPOS, *PIXEL_BRANCH, *WIDTH_384, *WIDER_SCHEDULE]),
]  # fmt: skip
ROWS_BY_NAME = {r.name: r for r in ROWS}


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
    """Both splits through the evaluation view (native 28x28, no resize), decoded once."""

    def __init__(self, smoke: bool) -> None:
        self.source = SMOKE_SOURCE if smoke else WHERE.source
        self.data = EvalDataSection(source=self.source, crop_pct=1.0, num_workers=0)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, backbone: Backbone) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not self.splits:
            for split in ("train", "val"):
                dataset = eval_view(build_source(self.source, split), self.data, backbone)
                images, labels = zip(*(dataset[i] for i in range(len(dataset))))
                self.splits[split] = (torch.stack(images), torch.as_tensor(labels))
            self.mean, self.std = backbone.mean or (0.5,), backbone.std or (0.5,)
        return self.splits


@torch.inference_mode()
def tokens_of(backbone: Backbone, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """All final-norm tokens [N, 1+L, D] of the backbone (every position kept), bf16 compute."""
    device = WHERE.device
    vit = build_vit(backbone, num_classes=0).to(device).eval()
    parts = []
    for chunk in images.split(batch):
        with autocast(device, "bf16"):
            parts.append(vit_patch_tokens(vit, chunk.to(device)).float().cpu())
    return torch.cat(parts)


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


def probe_section(smoke: bool) -> ProbeSection:
    """The linear probe of `droppos linprobe` (LARS, BatchNorm, lr sweep), 30 epochs."""
    return ProbeSection(epochs=2 if smoke else 30, warmup_epochs=1 if smoke else 5)


def frozen_scores(
    name: str, train_x: torch.Tensor, val_x: torch.Tensor, views: Any, backbone: Backbone,
    smoke: bool,
) -> dict[str, float]:  # fmt: skip
    """kNN (k=20, T=0.07) and the best probe of the sweep on one kind of feature."""
    device = WHERE.device
    (_, train_labels), (_, val_labels) = views["train"], views["val"]
    train_x, val_x = train_x.to(device), val_x.to(device)
    train_labels, val_labels = train_labels.to(device), val_labels.to(device)
    knn = knn_accuracy(train_x, train_labels, val_x, val_labels, 10)
    features = FrozenFeatures(train_x, train_labels, val_x, val_labels, 10, backbone, 0.0)
    probes = train_probes(features, probe_section(smoke))
    best = max(probes, key=lambda r: r["top1"])
    return {f"knn_{name}": knn["top1"], f"linprobe_{name}": best["top1"]}


def frozen_evaluation(backbone: Backbone, views: EvalViews, smoke: bool) -> dict[str, Any]:
    """kNN, linear probe ([CLS] and mean patch token) and the dense proxy, one feature pass."""
    splits = views.get(backbone)
    patch = backbone.encoder.patch_size
    result: dict[str, Any] = {}
    tokens = {split: tokens_of(backbone, images) for split, (images, _) in splits.items()}
    for name, pick in (("cls", lambda t: t[:, 0]), ("avg", lambda t: t[:, 1:].mean(1))):
        result |= frozen_scores(
            name, pick(tokens["train"]), pick(tokens["val"]), splits, backbone, smoke
        )
    images = {split: images for split, (images, _) in splits.items()}
    result |= dense_score(tokens["train"][:, 1:], tokens["val"][:, 1:], images["train"],
                          images["val"], views, patch)  # fmt: skip
    return result


def raw_pixel_evaluation(views: EvalViews, smoke: bool) -> dict[str, Any]:
    """The floor: the flattened, standardised image; for the dense proxy, the patch's pixels."""
    probe_backbone = backbone_from(BackboneSection(checkpoint="random"))
    splits = views.get(probe_backbone)
    (train_images, _), (val_images, _) = splits["train"], splits["val"]
    mean, std = train_images.flatten(1).mean(0), train_images.flatten(1).std(0) + 1e-6
    train_x, val_x = [(x.flatten(1) - mean) / std for x in (train_images, val_images)]
    result = frozen_scores("cls", train_x, val_x, splits, probe_backbone, smoke)
    result = {"knn": result["knn_cls"], "linprobe": result["linprobe_cls"]}
    patch = probe_backbone.encoder.patch_size
    train_patches, val_patches = [
        torch.nn.functional.unfold(images, patch, stride=patch).transpose(1, 2)  # [N, L, p*p]
        for images in (train_images[:DENSE_TRAIN_IMAGES], val_images)
    ]
    result |= dense_score(train_patches, val_patches, train_images, val_images, views, patch)
    return result


def run_seed(row: Row, seed: int, root: Path, views: EvalViews, smoke: bool) -> dict[str, Any]:
    """Pre-train (unless a floor), then every evaluation; each step cached as JSON."""
    folder = root / slug(row.name) / f"seed{seed}"
    if row.kind == "raw":
        return cached(folder / "frozen.json", lambda: raw_pixel_evaluation(views, smoke))
    result: dict[str, Any] = {"seed": seed}
    if row.kind == "pretrain":
        pretrain_dir = folder / "pretrain"
        if not (pretrain_dir / "summary.json").exists():
            droppos("pretrain", *PRETRAIN, *WHERE.data_options(smoke), *row.options,
                    *smoke_pretrain(smoke),
                    "--run.seed", str(seed), "--run.output_dir", str(pretrain_dir))  # fmt: skip
        summary = json.loads((pretrain_dir / "summary.json").read_text())
        result["pretrain_seconds"] = summary["wall_seconds"]
        if "position_accuracy" in summary:  # DropPos rows only: MAE has no position pretext
            result["position_accuracy"] = 100 * summary["position_accuracy"]
        checkpoint = str(pretrain_dir / "last.pth")
    else:
        checkpoint = "random"

    def backbone() -> Backbone:
        torch.manual_seed(seed)  # a random-init row's weights are its seed's
        return backbone_from(BackboneSection(checkpoint=checkpoint))

    result |= cached(folder / "frozen.json", lambda: frozen_evaluation(backbone(), views, smoke))
    result |= cached(folder / "position.json", lambda: position_scores(checkpoint, seed, folder,
                                                                        smoke))  # fmt: skip
    result |= cached(folder / "finetune.json", lambda: finetune(checkpoint, seed, folder, smoke))
    steps = ("pretrain_seconds", "frozen_seconds", "position_seconds", "finetune_seconds")
    result["wall_seconds"] = sum(result.get(key, 0.0) for key in steps)
    return result


def smoke_pretrain(smoke: bool) -> list[str]:
    """The smoke run: the embedded demo set (4,000 images), one epoch (16 steps)."""
    return ["--optim.epochs", "1"] if smoke else []


def position_scores(checkpoint: str, seed: int, folder: Path, smoke: bool) -> dict[str, Any]:
    torch.manual_seed(seed)
    config = PositionProbeConfig(
        model=BackboneSection(checkpoint=checkpoint),
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
    found = position_probe(config, RunContext.local(WHERE.device, "bf16"))
    return {"position_probe": found["top1"], "position_probe_within_one": found["within_one_cell"]}


def finetune(checkpoint: str, seed: int, folder: Path, smoke: bool) -> dict[str, Any]:
    output = folder / "finetune"
    droppos("finetune", *FINETUNE, *WHERE.data_options(smoke), "--model.checkpoint", checkpoint,
            "--run.seed", str(seed), "--run.output_dir", str(output))  # fmt: skip
    found = json.loads((output / "results.json").read_text())
    return {"finetune": found["top1"]}


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


COLUMNS = [
    ("knn_cls", "kNN [CLS]"),
    ("knn_avg", "kNN mean-patch"),
    ("linprobe_cls", "lin. probe [CLS]"),
    ("linprobe_avg", "lin. probe mean-patch"),
    ("finetune", "fine-tune (1 ep)"),
    ("position_probe", "position probe"),
    ("dense_mae", "dense MAE (pp, lower better)"),
    ("dense_miou", "dense mIoU"),
    ("position_accuracy", "pretext pos. acc."),
    ("pretrain_seconds", "pre-train s"),
    ("wall_seconds", "row s (per seed)"),
]


def summarise(row: Row, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per column: mean and std over the row's seeds (std 0 for one seed)."""
    if row.kind == "raw":
        only = seeds[0]
        pixels = {"knn": only["knn"], "linprobe": only["linprobe"]}  # one image vector for both
        seeds = [{f"{k}_{f}": v for k, v in pixels.items() for f in ("cls", "avg")} | only]
    summary: dict[str, Any] = {"row": row.name, "group": row.group, "seeds": len(seeds)}
    for key, _ in COLUMNS:
        found = mean_std([s.get(key) for s in seeds])
        if found is not None:
            summary[key], summary[f"{key}_std"] = found
    return summary


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    header = "| row | seeds | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for s in summaries:
        cells = []
        for key, _ in COLUMNS:
            if s.get(key) is None:
                cells.append("–")
            elif key.endswith("_seconds"):
                cells.append(f"{s[key]:.0f}")
            elif s["seeds"] > 1:
                cells.append(f"{s[key]:.1f} ± {s[f'{key}_std']:.1f}")
            else:
                cells.append(f"{s[key]:.1f}")
        lines.append(f"| {s['row']} | {s['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summaries: list[dict[str, Any]], rows: list[Row], root: Path, report: Path) -> None:
    """Two PNGs: pretext position accuracy over pre-training, and downstream accuracy per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    drawn = 0
    for row in rows:
        if row.kind != "pretrain" or row.options[:2] == ["--model.name", "mae"]:
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
             title="DropPos pretext accuracy during pre-training (seed 0)")  # fmt: skip
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    if drawn:  # (a replot without the runs' metrics keeps the picture it has)
        figure.savefig(report / "position_accuracy.png", dpi=120)
    plt.close(figure)

    keys = [("knn_avg", "kNN (mean token)"), ("linprobe_avg", "linear probe (mean token)"),
            ("finetune", "fine-tune, 1 epoch")]  # fmt: skip
    figure, axis = plt.subplots(figsize=(10, 5.5))
    width = 0.27
    names = [s["row"] for s in summaries]
    for i, (key, label) in enumerate(keys):
        xs = [j + (i - 1) * width for j in range(len(summaries))]
        values = [s.get(key) or math.nan for s in summaries]
        errors = [s.get(f"{key}_std") or 0.0 for s in summaries]
        axis.bar(xs, values, width, yerr=errors, capsize=2, label=label)
        for x, value in zip(xs, values):
            if math.isnan(value):  # say why a bar is missing rather than leave a gap
                why = "not a network: no fine-tuning" if key == "finetune" else "not run"
                axis.text(x, 12, why, rotation=90, ha="center", va="bottom", fontsize=7)
    axis.set_xticks(range(len(names)), names, rotation=50, ha="right", fontsize=8)
    axis.set_ylim(0, 112)  # from zero: a cut axis would magnify the gaps (and room for the key)
    axis.set_yticks(range(0, 101, 20))
    axis.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance (10 classes)")
    axis.set(ylabel="top-1 on the test split (%)",
             title="Downstream accuracy per row (mean ± std over seeds)")  # fmt: skip
    axis.legend(loc="upper center", ncol=4, fontsize=8)
    figure.tight_layout()
    figure.savefig(report / "downstream.png", dpi=120)
    plt.close(figure)


def ensure_fashion_mnist(install: bool) -> None:
    """The study's data: Debian's dataset-fashion-mnist. Installed only when asked
    (`--install-data`); otherwise the command to run is said and the study stops."""
    if Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
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
        subprocess.run([*sudo, *command], check=True, capture_output=True)


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
    parser.add_argument("--seeds", type=int, default=None, help="cap the seeds of every row")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on the embedded demo set (what CI runs)")  # fmt: skip
    parser.add_argument("--install-data", action="store_true",
                        help="apt-get install dataset-fashion-mnist if missing")  # fmt: skip
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
    started = time.perf_counter()
    found: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    for seed in range(max(row.seeds for row in rows)):  # every row's seed 0 first, then more
        for row in rows:
            if seed < min(row.seeds, args.seeds or row.seeds):
                try:
                    found[row.name].append(run_seed(row, seed, args.output_dir, views, args.smoke))
                except SystemExit as refused:  # e.g. an option droppos refuses: say so, go on
                    print(f"{row.name}, seed {seed}: not run: {refused}", flush=True)
                    continue
                print(f"{row.name}, seed {seed}: done ({time.perf_counter() - started:.0f} s "
                      "into this sitting)", flush=True)  # fmt: skip
    summaries = [summarise(row, found[row.name]) for row in rows if found[row.name]]
    table = markdown_table(summaries)
    print(table)
    if args.report_dir is not None:
        args.report_dir.mkdir(parents=True, exist_ok=True)
        (args.report_dir / "table.md").write_text(table + "\n")
        (args.report_dir / "study.json").write_text(json.dumps(summaries, indent=1) + "\n")
        plot(summaries, rows, args.output_dir, args.report_dir)


if __name__ == "__main__":
    main()
