"""What a `--data.source` string names: one entry point from it (and a split) to a source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from droppos.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from droppos.data.shards import ShardDataset, shard_paths
from droppos.data.sources import (
    DEFAULT_FASHION_MNIST_ROOT,
    DemoDataset,
    FashionMNISTDataset,
    FileListDataset,
    ImageFolderDataset,
    ImageSource,
    Share,
    alone,
    canonical_split,
    list_entries,
)

SOURCE_HELP = (
    "expected 'demo', 'fashion-mnist', 'fashion-mnist:DIR', an image directory "
    "(class sub-folders, flat, or with train/ and val/), a folder of .tar shards, or a .txt "
    "file list"
)
_SPLIT_NAMES = ("train", "val", "test")


def build_source(
    source: str,
    split: str = "train",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decode: str = "pil",
    share: Share = alone,
) -> ImageSource:
    """``source``: ``"demo"``; ``"fashion-mnist"`` or ``"fashion-mnist:DIR"``; a ``.txt`` file list
    (paths relative to the sibling folder named like the list, else to the list's folder); a
    folder of tar shards; or a directory. A directory with ``train/``/``val/`` sub-folders or
    ``train.txt``/``val.txt`` lists is split by ``split``; any other directory is used whole, as
    an image folder. Listings are made through `share` (rank 0 alone, under torchrun). Raises
    ValueError with a one-line message on a bad source.
    """
    split = canonical_split(split)
    options: dict[str, Any] = {"max_pixels": max_pixels, "decode": decode, "share": share}
    if source == "demo":
        return DemoDataset(split)
    if source == "fashion-mnist" or source.startswith("fashion-mnist:"):
        root = source.partition(":")[2] or DEFAULT_FASHION_MNIST_ROOT
        return FashionMNISTDataset(root, split)
    if not source:
        raise ValueError(f"empty data source: {SOURCE_HELP}")
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise ValueError(f"data source {source!r} is not a .txt file list: {SOURCE_HELP}")
        return _file_list(path, [path.with_suffix(""), path.parent], options)
    if not path.is_dir():
        raise ValueError(f"data source {source!r} does not exist: {SOURCE_HELP}")
    if any(path.glob("*.tar")):  # WebDataset-style shards (droppos write-shards)
        shards = shard_paths(path, split)
        if not shards:
            raise ValueError(f"data source {source!r} has no {split}-*.tar shards")
        return ShardDataset(shards, max_pixels, decode, share)
    if not has_splits(path):
        return ImageFolderDataset(path, **options)
    if (path / f"{split}.txt").is_file():
        return _file_list(path / f"{split}.txt", [path / split, path], options)
    if (path / split).is_dir():
        return ImageFolderDataset(path / split, **options)
    if split == "val" and (path / "test").is_dir():
        return ImageFolderDataset(path / "test", **options)
    raise ValueError(
        f"data source {source!r} is split into train/val but has no '{split}/' folder "
        f"or '{split}.txt' list"
    )


def has_splits(path: Path) -> bool:
    """Whether a folder is laid out by split (`train/`, `val/`, `test/` or their `.txt` lists)."""
    return any((path / s).is_dir() or (path / f"{s}.txt").is_file() for s in _SPLIT_NAMES)


def source_splits(source: str) -> list[str]:
    """The splits `source` holds: train, and val where it has one of its own (a source without
    splits gives the same images for both, and counts as train only)."""
    train = build_source(source, "train")
    try:
        val = build_source(source, "val")
    except ValueError:
        return ["train"]
    return ["train"] if val.origin == train.origin else ["train", "val"]


def _file_list(
    list_file: Path, candidate_roots: list[Path], options: dict[str, Any]
) -> FileListDataset:
    """The original code reads ``DATA/train.txt`` relative to ``DATA/train``; fall back to the
    list's own folder when the listed paths resolve there instead."""
    first = next((path for _, path, _ in list_entries(list_file)), None)
    if first is not None:
        for root in candidate_roots:
            if (root / first).is_file():
                return FileListDataset(root, list_file, **options)
    # raises a message naming the path
    return FileListDataset(candidate_roots[-1], list_file, **options)
