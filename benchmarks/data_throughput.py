"""Data loading throughput of pre-training: decode, augment, and the full loader, apart.

The training step can only run as fast as batches arrive. This measures, on JPEG files of
ImageNet's typical size written here (no dataset can be downloaded), images/s of

* decode: `load_image` (PIL, the loader every folder/list dataset uses);
* decode + augment: the pre-training transform (RandomResizedCrop 224 bicubic, flip, to tensor,
  normalise) on top, plus the per-sample mask noise;
* loader: `build_loader` over that dataset with 0..W worker processes, batches of B.

Divide a training run's images/s by the per-worker figure to know how many workers it needs.

    python benchmarks/data_throughput.py --images 256 --workers 0 1 2 \
        --json benchmarks/results/cpu_data_loading.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from droppos.data import AugmentedDataset, build_loader
from droppos.data.datasets import ImageFolderDataset, load_image
from droppos.data.mask_noise import MaskNoiseDataset
from droppos.data.transforms import pretrain_transform


def write_jpegs(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """Smooth random colour fields with noise: JPEG-compressible like photos, not like flat
    colour (which would decode unrealistically fast)."""
    rng = np.random.default_rng(seed)
    folder = root / "class0"
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(count):
        coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        pixels = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def images_per_second(count: int, work) -> float:
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def measure(root: Path, img_size: int, batch: int, workers: list[int]) -> list[dict[str, Any]]:
    dataset = ImageFolderDataset(root)
    paths = [path for path, _ in dataset.samples]
    transform = pretrain_transform(img_size)
    num_patches = (img_size // 16) ** 2
    noisy = MaskNoiseDataset(
        AugmentedDataset(dataset, transform, seed=0),
        num_patches=num_patches,
        num_visible=num_patches // 4,
    )
    rows = [
        {
            "stage": "decode (PIL)",
            "workers": 0,
            "images_per_second": images_per_second(
                len(paths), lambda: [load_image(p) for p in paths]
            ),
        },
        {
            "stage": "decode + augment + mask noise",
            "workers": 0,
            "images_per_second": images_per_second(
                len(noisy), lambda: [noisy[i] for i in range(len(noisy))]
            ),
        },
    ]
    for count in workers:
        loader = build_loader(noisy, batch, num_workers=count, drop_last=True)
        iterator = iter(loader)
        next(iterator)  # start-up (forking workers) is not throughput
        remaining = len(loader) - 1
        rate = images_per_second(remaining * batch, lambda it=iterator: [b for b in it])
        rows.append(
            {"stage": f"loader, batch {batch}", "workers": count, "images_per_second": rate}
        )
        del iterator, loader
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | workers | images/s |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['workers']} | {r['images_per_second']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--source-size", type=int, nargs=2, default=[500, 375], help="W H")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a loader worker is one thread; measure per core
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images, tuple(args.source_size))
        rows = measure(Path(tmp), args.img_size, args.batch, args.workers)
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"cpus": os.cpu_count(), "source_size": args.source_size, "rows": rows}
        args.json.write_text(json.dumps({**record, "args": vars(args) | {"json": None}}, indent=2))


if __name__ == "__main__":
    main()
