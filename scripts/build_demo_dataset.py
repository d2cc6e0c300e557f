"""Build the Fashion-MNIST demo subset that ships inside the package (src/droppos/data/demo/).

A stratified sample, fixed seed: 400 images per class from the training file (4000) and 100
per class from the t10k file (1000), written as one compressed .npz plus the MIT licence notice.
The output is byte-for-byte reproducible (fixed zip timestamps), so rebuilding leaves git clean;
``--check`` rebuilds in memory and verifies the shipped files instead of writing them.

    python scripts/build_demo_dataset.py [--source /usr/share/datasets/fashion-mnist] [--check]

Source: Debian package ``dataset-fashion-mnist`` (MIT, Zalando SE).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from droppos.data.sources import DEMO_FILE, FASHION_MNIST_CLASSES, read_idx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "droppos" / "data" / "demo"
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
LICENSE_FILE = "LICENSE-fashion-mnist.txt"
SEED = 0
PER_CLASS = {"train": 400, "val": 100}
SOURCE_PREFIX = {"train": "train", "val": "t10k"}

LICENSE_TEMPLATE = """\
fashion_mnist_demo.npz -- a subset of Fashion-MNIST
===================================================

What it is
----------
A stratified subset of Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist),
28x28 greyscale images of 10 clothing classes, embedded in droppos so that every command can
run and be tested without a download.

  train: {train_n} images, {train_k} per class, drawn from {train_images}
  val:   {val_n} images, {val_k} per class, drawn from {val_images}
         (labels from {train_labels} / {val_labels})

Source files, as installed by the Debian package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist/), with SHA-256:
{hashes}
How it was built
----------------
scripts/build_demo_dataset.py in the droppos repository: one numpy.random.default_rng({seed});
train first, then val; for class 0..9 in turn, rng.choice of {train_k} (train) or {val_k} (val)
indices of that class without replacement; each split's indices are then sorted, so the
images keep their source order.
Arrays in the .npz (a standard numpy zip, deflate-compressed):
  train_images, val_images          uint8  [N, 28, 28]
  train_labels, val_labels          uint8  [N]         (class index 0..9)
  train_source_index, val_source_index  uint16 [N]     (row in the source file)
  classes                           str    [10]
    ({classes})
Pixel values and labels are unchanged from the source.

Licence
-------
Fashion-MNIST is distributed under the MIT licence (Debian: "Expat"):

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a
copy of this software and associated documentation files (the "Software"),
to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense,
and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included
in all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS
OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY
CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,
TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def find(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    sys.exit(f"error: {stem}[.gz] not found in {source} (apt install dataset-fashion-mnist)")


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        for c in range(len(FASHION_MNIST_CLASSES))
    ]
    return np.sort(np.concatenate(picks))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """What np.savez_compressed writes, minus the wall-clock zip timestamps (reproducible)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, npy.getvalue(), zipfile.ZIP_DEFLATED, compresslevel=9)
    return buf.getvalue()


def build(source: Path, seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    files: dict[str, Path] = {}
    for split, prefix in SOURCE_PREFIX.items():
        files[f"{split}_images"] = find(source, f"{prefix}-images-idx3-ubyte")
        files[f"{split}_labels"] = find(source, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        index = stratified(labels, PER_CLASS[split], rng)
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index].astype(np.uint8)
        arrays[f"{split}_source_index"] = index.astype(np.uint16)
    arrays["classes"] = np.array(FASHION_MNIST_CLASSES)
    hashes = "".join(
        f"  {hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files.values()
    )
    text = LICENSE_TEMPLATE.format(
        seed=seed,
        hashes=hashes,
        classes=", ".join(FASHION_MNIST_CLASSES),
        **{f"{s}_n": len(arrays[f"{s}_labels"]) for s in PER_CLASS},
        **{f"{s}_k": k for s, k in PER_CLASS.items()},
        **{key: p.name for key, p in files.items()},
    )
    return {DEMO_FILE: npz_bytes(arrays), LICENSE_FILE: text.encode()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="verify, do not write")
    args = parser.parse_args()

    outputs = build(args.source, args.seed)
    if args.check:
        stale = [
            n
            for n, b in outputs.items()
            if not (args.out / n).is_file() or (args.out / n).read_bytes() != b
        ]
        if stale:
            sys.exit(f"error: {', '.join(stale)} in {args.out} differ from a fresh build")
        print(f"ok: {', '.join(outputs)} in {args.out} match a fresh build")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        (args.out / name).write_bytes(data)
        print(f"wrote {args.out / name} ({len(data) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
