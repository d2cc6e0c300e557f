"""Tar shards: a data set as a few large files instead of millions of small ones.

The files follow the WebDataset convention (`train-000000.tar`, ...; each sample is members
`KEY.jpg` or `.png` and `KEY.cls` holding the label), so tools that stream WebDataset read them
too. droppos reads them by random access instead of streaming: each shard's member offsets are
listed once (cached beside it as `SHARD.tar.idx.json`), and `ShardDataset` is a map-style dataset.
The sampler, the per-rank sharding and the exact mid-epoch resume are then the same as for an
image folder: a run on shards sees exactly the batches a run on the folder they came from sees.
That needs a file system that can seek (local disks, NFS, Lustre, GPFS); a store that can only
stream objects is not supported.

`write_shards` writes them from any data source droppos reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from droppos.data.datasets import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMG_EXTENSIONS,
    LazyImage,
    build_dataset,
    decode_image,
    decode_tensor,
)

INDEX_SUFFIX = ".idx.json"
IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)


def shard_paths(folder: str | Path, split: str) -> list[Path]:
    """`folder/{split}-*.tar` in name order; a folder of tars without split names serves both."""
    folder = Path(folder)
    found = sorted(folder.glob(f"{split}-*.tar"))
    if not found and split == "val":
        found = sorted(folder.glob("test-*.tar"))
    if not found and not any(folder.glob("train-*.tar")):
        found = sorted(folder.glob("*.tar"))
    return found


def index_shard(path: Path) -> list[dict[str, Any]]:
    """[{key, offset, size, label}] of one shard, read from its cached index when it is newer
    than the shard, else by walking the tar headers once (data is skipped, not read)."""
    cache = path.with_name(path.name + INDEX_SUFFIX)
    if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        return json.loads(cache.read_text())
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.rpartition(".")
            if suffix.lower() in IMAGE_SUFFIXES:
                images[key] = (member.offset_data, member.size)
            elif suffix == "cls":
                labels[key] = int(tar.extractfile(member).read().decode().strip())  # type: ignore[union-attr]
    entries = [
        {"key": key, "offset": offset, "size": size, "label": labels.get(key, -1)}
        for key, (offset, size) in images.items()
    ]
    with contextlib.suppress(OSError):  # a read-only data set: index again next time
        cache.write_text(json.dumps(entries))
    return entries


class ShardDataset(Dataset):
    """The samples of WebDataset-style tar shards, in shard then member order, by random access.

    File handles are opened lazily per process (loader workers each get their own).
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode: str = "pil",
    ) -> None:
        if not shards:
            raise ValueError("no tar shards found")
        self.shards = [Path(s) for s in shards]
        self.max_pixels = max_pixels
        self.decode = decode
        self.samples: list[tuple[int, int, int, int, str]] = []
        for number, path in enumerate(self.shards):
            for entry in index_shard(path):
                self.samples.append(
                    (number, entry["offset"], entry["size"], entry["label"], entry["key"])
                )
        if not self.samples:
            raise ValueError(f"no images in the shards {self.shards[0]} ...")
        labels = [sample[3] for sample in self.samples]
        labelled = min(labels) >= 0
        self.num_classes = max(labels) + 1 if labelled else 0
        names = self.shards[0].parent / "classes.txt"
        self.classes: list[str] | None = (
            names.read_text().splitlines() if labelled and names.is_file() else None
        )
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def _handle(self, number: int) -> Any:
        if self._pid != os.getpid():  # a forked worker: never share the parent's file offsets
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = self.shards[number].open("rb")
        return self._handles[number]

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor | LazyImage, int]:
        number, offset, size, label, key = self.samples[index]
        handle = self._handle(number)
        handle.seek(offset)
        data = handle.read(size)
        name = f"{self.shards[number]}:{key}"
        if self.decode == "tensor":
            return decode_tensor(data, name, self.max_pixels), label
        if self.decode in ("draft", "device"):
            return LazyImage(data, name, self.max_pixels), label
        return decode_image(io.BytesIO(data), name, self.max_pixels), label

    def close(self) -> None:
        """Close this process's shard files (they reopen on the next read)."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles = {}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross process boundaries
        return state


def encoded_sample(dataset: Dataset, index: int) -> tuple[bytes, str, int]:
    """(file bytes, suffix, label) of one sample: the original file where there is one (no
    re-encoding), else the decoded image as PNG (lossless)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None and isinstance(samples[index][0], str):
        path, label = samples[index][0], samples[index][1]
        return Path(path).read_bytes(), Path(path).suffix.lstrip(".").lower(), int(label)
    image, label = dataset[index]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png", int(label)


def write_shards(
    source: str,
    output: str | Path,
    shard_size: int = 1000,
    splits: Sequence[str] = ("train", "val"),
) -> dict[str, list[Path]]:
    """Write each split of `source` as `output/{split}-NNNNNN.tar`; returns the files written.

    A split the source does not have is skipped; a source without splits is written as train.
    """
    if shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    seen: list[Any] = []
    for split in splits:
        dataset = build_dataset(source, split)
        samples = getattr(dataset, "samples", None)
        if samples is not None and samples in seen:
            continue  # a source without splits gives the same files for every split
        if samples is not None:
            seen.append(samples)
        count = len(dataset)  # type: ignore[arg-type]
        paths = []
        for start in range(0, count, shard_size):
            path = output / f"{split}-{start // shard_size:06d}.tar"
            with tarfile.open(path, "w") as tar:
                for index in range(start, min(start + shard_size, count)):
                    data, suffix, label = encoded_sample(dataset, index)
                    key = f"{index:09d}"
                    _add(tar, f"{key}.{suffix}", data)
                    _add(tar, f"{key}.cls", str(label).encode())
            index_shard(path)
            paths.append(path)
        written[split] = paths
        classes = getattr(dataset, "classes", None)
        if classes and not (output / "classes.txt").exists():
            (output / "classes.txt").write_text("\n".join(classes) + "\n")
    return written


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same input writes the same bytes
    tar.addfile(info, io.BytesIO(data))
