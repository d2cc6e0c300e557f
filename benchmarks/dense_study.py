"""Dense transfer of the study's backbones: segmentation of Fashion-MNIST scenes, three ways.

The backbones are the study's (`benchmarks/study.py`: the same rows, the same fixed pre-training
budget on the full Fashion-MNIST, the same folders, so a finished study is reused); the task is
`fashion-mnist-scenes` (2 to 4 items on a 56 x 56 canvas, 11 classes with background; docs/
segmentation.md). Three protocols, every choice made on scenes held out of the training scenes
and the test scenes (made of the test images) scored once per reported number:

- linear probe, frozen: BatchNorm + 1x1 classifier on the patch tokens; the learning rate and
  the feature (last block, or last 4 concatenated) chosen on validation, then 3 seeds of the
  head (initialisation and batch order) on test;
- dense kNN (Hummingbird): k chosen on validation (one similarity pass scores every k, as
  `knn_segment` would for each), then 3 seeds of the bank's patch sample on test;
- fine-tuned linear head (`droppos segment --model.freeze false`, the key rows: random init,
  DropPos, MAE): the learning rate chosen on validation, then 3 seeds on test.

Raw patch pixels (each 7 x 7 patch's 49 values as its feature) stand in for a backbone in the
frozen protocols. One command; resumable (every finished step is a JSON file under
--output-dir):

    python benchmarks/dense_study.py --output-dir runs/study --report-dir benchmarks/study/dense

`--smoke` runs every step on the embedded demo set and `demo-scenes`, tiny budgets (CI's).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from droppos.data.segmentation import segmentation_source
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.dense_heads import (
    DenseFeatures,
    PatchFeatures,
    ProbeHeadSection,
    head_confusion,
    train_probe_heads,
    upsampled,
)
from droppos.evaluation.dense_knn import (
    DenseKnnSection,
    MemoryBank,
    sample_patches,
    trim_bank,
)
from droppos.evaluation.metrics import confusion_matrix, segmentation_scores
from droppos.interop.backbone import build_vit
from droppos.models.sizes import demo_encoder

sys.path.insert(0, str(Path(__file__).parent))
import study

ROWS = ["raw pixels", "random init", "DropPos (paper defaults)", "MAE", "DropPos + MAE branch",
        "MP3"]  # fmt: skip
KEY_ROWS = {"random init", "DropPos (paper defaults)", "MAE"}
SEEDS = (0, 1, 2)
SCENES = {  # training scenes the frozen heads and banks fit, held-out validation scenes
    False: {"source": "fashion-mnist-scenes", "fit": 2_000, "val": 500},
    True: {"source": "demo-scenes", "fit": 300, "val": 100},
}
PROBE_LRS = [3e-3, 1e-2, 3e-2, 1e-1]
PROBE_EPOCHS = 8
FEATURE_BLOCKS = [1, 4]
KNN_KS = [3, 5, 10, 20, 30, 50]
BANK_PATCHES = 20_000
FINETUNE_LRS = ["1e-3", "3e-3"]
FINETUNE = {  # the fine-tuned protocol's training scenes (of the validation-free rest) and budget
    False: ["--data.train_images", "1000", "--optim.epochs", "2", "--optim.batch_size", "32"],
    True: ["--data.train_images", "64", "--optim.epochs", "1", "--optim.batch_size", "16"],
}


def cached(path: Path, compute: Any) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = compute()
    result["seconds"] = round(time.perf_counter() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


class Scenes:
    """Fit, validation and test scenes as normalised images [N, 1, 56, 56] and masks [N, 56, 56]
    (uint8), made once."""

    def __init__(self, smoke: bool) -> None:
        plan = SCENES[smoke]
        train = segmentation_source(plan["source"], "train")
        test = segmentation_source(plan["source"], "val")
        order = np.random.default_rng(0).permutation(len(train))
        self.classes = train.classes
        self.parts = {
            "val": self.decode(train, order[: plan["val"]]),
            "fit": self.decode(train, order[plan["val"] : plan["val"] + plan["fit"]]),
            "test": self.decode(test, range(len(test))),
        }

    @staticmethod
    def decode(source: Any, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [source.sample(int(i)) for i in indices]
        images = torch.stack([torch.from_numpy(np.array(s.image)) for s in samples])
        masks = torch.stack([torch.from_numpy(np.array(s.mask)) for s in samples])
        return (images.float() / 255 - 0.5)[:, None] / 0.5, masks  # the study's (0.5, 0.5)


class PixelPatches(torch.nn.Module):
    """Raw patch pixels as a dense feature: [N, C, H, W] -> [N, C x p x p, H/p, W/p]."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        columns = F.unfold(images, self.patch, stride=self.patch)
        return columns.reshape(n, -1, height // self.patch, width // self.patch)


def extractor(row: str, blocks: int, root: Path, smoke: bool) -> torch.nn.Module:
    """The row's dense feature extractor (seed 0's backbone)."""
    if row == "raw pixels":
        return PixelPatches(demo_encoder().patch_size)
    checkpoint = study.pretrained(study.ROWS_BY_NAME[row], 0, root, smoke)
    torch.manual_seed(0)  # the random row's weights are seed 0's
    backbone = backbone_from(BackboneSection(checkpoint=checkpoint, encoder=demo_encoder()))
    return PatchFeatures(build_vit(backbone, num_classes=0, dynamic_img_size=True), blocks).eval()


def features_of(model: torch.nn.Module, scenes: Scenes) -> dict[str, DenseFeatures]:
    return {
        name: DenseFeatures(study.in_batches(model, images, 250).half(), masks)
        for name, (images, masks) in scenes.parts.items()
    }


def probe_scores(
    features: dict[str, DenseFeatures], classes: list[str], lrs: list[float], seed: int,
    split: str, epochs: int,
) -> list[dict[str, Any]]:  # fmt: skip
    section = ProbeHeadSection(lrs=lrs, epochs=epochs, batch_size=64)
    heads = train_probe_heads(features["fit"], len(classes), section, seed)
    confusions = [head_confusion(head, features[split], len(classes), 250) for head in heads]
    return [
        {"lr": lr, **segmentation_scores(confusion, classes)}
        for confusion, lr in zip(confusions, lrs)
    ]


def knn_scores(
    features: dict[str, DenseFeatures], classes: list[str], ks: list[int], seed: int, split: str,
    bank_patches: int,
) -> list[dict[str, Any]]:  # fmt: skip
    fit = features["fit"]
    per_image = -(-bank_patches // len(fit.features))
    picked, share, kept = sample_patches(
        fit.features, fit.masks, torch.arange(len(fit.features)), len(classes), per_image, seed
    )
    bank = trim_bank(
        MemoryBank(picked.flatten(0, 1)[kept.flatten()], share.flatten(0, 1)[kept.flatten()]),
        bank_patches,
        seed,
    )
    target, size = features[split], features[split].masks.shape[-1]
    confusions = {k: torch.zeros(len(classes), len(classes), dtype=torch.int64) for k in ks}
    for start in range(0, len(target.features), 100):  # one similarity pass serves every k
        chunk = target.features[start : start + 100].float()
        n, dim, h, w = chunk.shape
        queries = F.normalize(chunk.flatten(2).transpose(1, 2).reshape(-1, dim), dim=-1)
        top, index = (queries @ bank.features.T).topk(max(ks), dim=1)
        for k in ks:
            weights = torch.softmax(top[:, :k] / DenseKnnSection().temperature, dim=1)
            scores = torch.einsum("qk,qkc->qc", weights, bank.labels[index[:, :k]])
            scores = scores.reshape(n, h, w, -1).permute(0, 3, 1, 2)
            predicted = upsampled(scores, size).argmax(1)
            confusions[k] += confusion_matrix(predicted, target.masks[start : start + 100],
                                              len(classes))  # fmt: skip
    return [{"k": k, **segmentation_scores(confusions[k], classes)} for k in ks]


def frozen_protocols(row: str, root: Path, scenes: Scenes, smoke: bool) -> dict[str, Any]:
    """Linear probe and dense kNN: choices on validation, 3 seeds on test."""
    epochs = 2 if smoke else PROBE_EPOCHS
    blocks_choices = [1] if row == "raw pixels" else FEATURE_BLOCKS
    selection, features_by_blocks = [], {}
    for blocks in blocks_choices:
        features = features_of(extractor(row, blocks, root, smoke), scenes)
        features_by_blocks[blocks] = features
        for scores in probe_scores(features, scenes.classes, PROBE_LRS, 0, "val", epochs):
            selection.append({"blocks": blocks, **scores})
    best = max(selection, key=lambda s: s["miou"])
    features = features_by_blocks[best["blocks"]]
    test = [
        probe_scores(features, scenes.classes, [best["lr"]], seed, "test", epochs)[0]
        for seed in SEEDS
    ]
    return {
        "probe_selection": [without_classes(s) for s in selection],
        "probe_choice": {"lr": best["lr"], "blocks": best["blocks"]},
        "probe_test": test,
    }


def knn_protocol(row: str, root: Path, scenes: Scenes, smoke: bool) -> dict[str, Any]:
    """Dense kNN on the last block's patches: k chosen on validation, 3 bank seeds on test."""
    features = features_of(extractor(row, 1, root, smoke), scenes)
    bank = 2_000 if smoke else BANK_PATCHES
    knn_val = knn_scores(features, scenes.classes, KNN_KS, 0, "val", bank)
    k = max(knn_val, key=lambda s: s["miou"])["k"]
    knn_test = [knn_scores(features, scenes.classes, [k], s, "test", bank)[0] for s in SEEDS]
    return {
        "knn_selection": [without_classes(s) for s in knn_val],
        "knn_choice": {"k": k},
        "knn_test": knn_test,
    }


def without_classes(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k != "class_iou"}


def finetuned_protocol(row: str, root: Path, folder: Path, smoke: bool) -> dict[str, Any]:
    """`droppos segment --model.freeze false`: lr on held-out scenes, then seeds on test."""
    checkpoint = study.pretrained(study.ROWS_BY_NAME[row], 0, root, smoke)
    source = SCENES[smoke]["source"]
    base = ["segment", "--model.freeze", "false", "--model.checkpoint", checkpoint,
            "--data.source", source, *FINETUNE[smoke], "--run.progress", "false",
            "--run.pictures", "0", "--run.tensorboard", "false",
            "--data.num_workers", str(study.WHERE.workers)]  # fmt: skip
    held_out = ["--data.val_from_train", str(SCENES[smoke]["val"])]
    selection = []
    for lr in FINETUNE_LRS:
        out = folder / f"val-lr{lr}"
        if not (out / "results.json").exists():
            study.droppos(*base, *held_out, "--optim.lr", lr, "--run.output_dir", str(out))
        found = json.loads((out / "results.json").read_text())
        selection.append(
            {"lr": float(lr), "miou": found["miou"], "seconds": found["train_seconds"]}
        )
    lr = max(selection, key=lambda s: s["miou"])["lr"]
    test = []
    for seed in SEEDS:
        out = folder / f"test-seed{seed}"
        if not (out / "results.json").exists():
            study.droppos(*base, "--optim.lr", f"{lr:g}", "--run.seed", str(seed),
                          "--run.output_dir", str(out))  # fmt: skip
        found = json.loads((out / "results.json").read_text())
        test.append({"seed": seed, "miou": found["miou"],
                     "pixel_accuracy": found["pixel_accuracy"]})  # fmt: skip
    return {"finetune_selection": selection, "finetune_choice": {"lr": lr}, "finetune_test": test}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| backbone | linear probe, frozen | dense kNN | fine-tuned linear head | choices (val) |",
        "|---|---|---|---|---|",
    ]
    for row, found in results.items():
        probe = spread([s["miou"] for s in found.get("probe_test", [])])
        knn = spread([s["miou"] for s in found.get("knn_test", [])])
        tuned = spread([s["miou"] for s in found.get("finetune_test", [])])
        choices = []
        if "probe_choice" in found:
            choice = found["probe_choice"]
            choices.append(f"probe lr {choice['lr']:g}, {choice['blocks']} block(s)")
        if "knn_choice" in found:
            choices.append(f"k {found['knn_choice']['k']}")
        if "finetune_choice" in found:
            choices.append(f"fine-tune lr {found['finetune_choice']['lr']:g}")
        lines.append(f"| {row} | {probe} | {knn} | {tuned} | {'; '.join(choices)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/study"))
    parser.add_argument("--report-dir", type=Path, default=None)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, metavar="ROW")
    parser.add_argument("--source", default="fashion-mnist")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-finetune", action="store_true", help="frozen protocols only")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    study.WHERE.source, study.WHERE.workers = args.source, args.workers
    if not args.smoke:
        study.ensure_fashion_mnist(install=False)
    root = args.output_dir
    scenes = Scenes(args.smoke)
    results: dict[str, dict[str, Any]] = {}
    for row in args.rows:
        folder = root / study.slug(row) / "seed0" / "dense"
        found = cached(
            folder / "frozen.json",
            functools.partial(frozen_protocols, row, root, scenes, args.smoke),
        )
        found |= cached(  # its own file: the k grid was widened after the first frozen runs
            folder / "knn.json", functools.partial(knn_protocol, row, root, scenes, args.smoke)
        )
        if row in KEY_ROWS and not args.no_finetune:
            found |= cached(
                folder / "finetuned.json",
                functools.partial(finetuned_protocol, row, root, folder, args.smoke),
            )
        results[row] = found
        print(table({row: found}).splitlines()[-1], flush=True)
    report = table(results)
    print(report)
    if args.report_dir is not None:
        args.report_dir.mkdir(parents=True, exist_ok=True)
        (args.report_dir / "dense_table.md").write_text(report)
        (args.report_dir / "dense_study.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
