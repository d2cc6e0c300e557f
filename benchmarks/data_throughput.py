"""Data loading throughput of pre-training: decode, augment, and the full loader, apart.

The training step can only run as fast as batches arrive. This measures, on JPEG files of
ImageNet's typical size written here (no dataset can be downloaded), images/s per core of both
decode paths (`--data.decode pil`, today's, and `tensor`):

* decode: Pillow (`load_image`) or torchvision (`decode_tensor`, file read included);
* decode + augment: the pre-training transform on top (RandomResizedCrop 224 bicubic, flip; the
  pil path also converts to float and normalises, the tensor path leaves that to the device),
  plus the per-sample mask noise;
* loader: `build_loader` over that dataset with 0..W worker processes, batches of B;
* the device path (`--data.decode device`): the workers' share (read the file, choose the
  crop) and the decode + augment it moves to the device, here measured on this CPU;
* how far the tensor path's pixels are from the pil path's, for the same crop.

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
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from droppos.data import AugmentedDataset, ImageFolderDataset, build_loader
from droppos.data.decode import decode_tensor, load_image
from droppos.data.device_decode import decode_batch
from droppos.data.mask_noise import MaskNoise
from droppos.data.transforms import pretrain_transform
from droppos.methods import DEFAULT_METHOD, method_named
from droppos.models.encoder import EncoderConfig


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


def images_per_second(count: int, work, repeats: int = 3) -> float:
    """The best of `repeats` passes: on a shared machine the slow passes measure the neighbours."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return count / best


PATHS = ("pil", "draft", "tensor")


def pipeline(root: Path, img_size: int, decode: str) -> AugmentedDataset:
    """What pre-training the default method at ViT-B/16 reads with `--data.decode decode`."""
    method = method_named(DEFAULT_METHOD)
    config = method.config_from_options(EncoderConfig(img_size=img_size), {})
    return AugmentedDataset(
        ImageFolderDataset(root, decode=decode),
        pretrain_transform(img_size, decode=decode),
        seed=0,
        torch_rng_only=decode == "tensor",
        extras=[MaskNoise(method.noise_lengths(config))],
    )


def pixel_difference(paths: list[str], img_size: int) -> dict[str, float]:
    """Mean absolute difference (0-255 levels) between the two paths, for the same crops:
    of the decoded images, and of the augmented crops."""
    generator = torch.Generator().manual_seed(0)
    decoded, cropped = [], []
    for path in paths:
        pil = load_image(path)
        tensor = decode_tensor(Path(path).read_bytes(), path)
        reference = T.functional.pil_to_tensor(pil)
        decoded.append((reference.float() - tensor.float()).abs().mean().item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
            top, left, h, w = T.RandomResizedCrop.get_params(pil, (0.2, 1.0), (3 / 4, 4 / 3))
        crop_pil = T.functional.pil_to_tensor(
            pil.resize((img_size, img_size), Image.BICUBIC, box=(left, top, left + w, top + h))
        )
        crop_tensor = F2.resized_crop(
            tensor, top, left, h, w, [img_size, img_size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        cropped.append((crop_pil.float() - crop_tensor.float()).abs().mean().item())
    # draft vs pil: the same crops (same seeds), compared after the whole transform
    pil_items, draft_items = (
        pipeline(Path(paths[0]).parents[1], img_size, d) for d in ("pil", "draft")
    )
    std = 255 * float(np.mean([0.229, 0.224, 0.225]))
    drafted = [
        float((pil_items[i][0] - draft_items[i][0]).abs().mean()) * std for i in range(len(paths))
    ]
    return {
        "decode": float(np.mean(decoded)),
        "decode_and_crop": float(np.mean(cropped)),
        "draft_vs_pil": float(np.mean(drafted)),
    }


def measure(root: Path, img_size: int, batch: int, workers: list[int]) -> list[dict[str, Any]]:
    paths = [path for path, _ in ImageFolderDataset(root).samples]
    rows = [
        {
            "stage": "decode",
            "path": "pil",
            "workers": 0,
            "images_per_second": images_per_second(
                len(paths), lambda: [load_image(p) for p in paths]
            ),
        },
        {
            "stage": "decode",
            "path": "tensor",
            "workers": 0,
            "images_per_second": images_per_second(
                len(paths), lambda: [decode_tensor(Path(p).read_bytes(), p) for p in paths]
            ),
        },
    ]
    for decode in PATHS:
        noisy = pipeline(root, img_size, decode)
        rows.append(
            {
                "stage": "decode + augment + mask noise",
                "path": decode,
                "workers": 0,
                "images_per_second": images_per_second(
                    len(noisy), lambda noisy=noisy: [noisy[i] for i in range(len(noisy))]
                ),
            }
        )
    # device: the workers' share only; the decode moves to the device (here: this CPU)
    noisy = pipeline(root, img_size, "device")
    items = [noisy[i][0] for i in range(len(noisy))]
    rows.append(
        {
            "stage": "choose crop + mask noise (workers' share)",
            "path": "device",
            "workers": 0,
            "images_per_second": images_per_second(
                len(noisy), lambda: [noisy[i] for i in range(len(noisy))]
            ),
        }
    )
    rows.append(
        {
            "stage": "decode + augment on the device (here the CPU)",
            "path": "device",
            "workers": 0,
            "images_per_second": images_per_second(
                len(items),
                lambda: [
                    decode_batch(items[i : i + batch], (img_size, img_size), 3, torch.device("cpu"))
                    for i in range(0, len(items), batch)
                ],
            ),
        }
    )
    for decode in PATHS:
        noisy = pipeline(root, img_size, decode)
        for count in workers:
            loader = build_loader(noisy, batch, num_workers=count, drop_last=True)
            iterator = iter(loader)
            next(iterator)  # start-up (forking workers) is not throughput
            remaining = len(loader) - 1
            rate = images_per_second(
                remaining * batch, lambda it=iterator: [b for b in it], repeats=1
            )  # a loader is one pass; its workers run on while we wait
            rows.append(
                {
                    "stage": f"loader, batch {batch}",
                    "path": decode,
                    "workers": count,
                    "images_per_second": rate,
                }
            )
            del iterator, loader
    return rows


def table(rows: list[dict[str, Any]], gpu_rate: float | None) -> str:
    per_core = {
        r["path"]: r["images_per_second"] for r in rows if r["stage"].startswith("decode +")
    }
    header = "| stage | path | workers | images/s | x pil |"
    lines = [header, "|---|---|---|---|---|"]
    for r in rows:
        same = [
            x
            for x in rows
            if (x["stage"], x["workers"], x["path"]) == (r["stage"], r["workers"], "pil")
        ]
        ratio = r["images_per_second"] / same[0]["images_per_second"] if same else float("nan")
        lines.append(
            f"| {r['stage']} | {r['path']} | {r['workers']} | {r['images_per_second']:.0f} "
            f"| {ratio:.2f} |"
        )
    if gpu_rate:
        for path, rate in per_core.items():
            lines.append(
                f"\ncores per GPU at {gpu_rate:.0f} images/s, {path} path: {gpu_rate / rate:.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--source-size", type=int, nargs=2, default=[500, 375], help="W H")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--gpu-images-per-second",
        type=float,
        default=None,
        help="a GPU's training rate: prints the cores of decode+augment it needs per path",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a loader worker is one thread; measure per core
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images, tuple(args.source_size))
        rows = measure(Path(tmp), args.img_size, args.batch, args.workers)
        paths = [p for p, _ in ImageFolderDataset(Path(tmp)).samples][:64]
        difference = pixel_difference(paths, args.img_size)
    print(table(rows, args.gpu_images_per_second))
    print(
        f"mean absolute difference from the pil path (0-255 levels): tensor decode "
        f"{difference['decode']:.3f}, tensor decode + crop {difference['decode_and_crop']:.3f}, "
        f"draft after the whole augmentation {difference['draft_vs_pil']:.3f}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "cpus": os.cpu_count(),
            "source_size": args.source_size,
            "rows": rows,
            "pixel_difference": difference,
        }
        args.json.write_text(json.dumps({**record, "args": vars(args) | {"json": None}}, indent=2))


if __name__ == "__main__":
    main()
