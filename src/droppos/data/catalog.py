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
    ImageFolderDataset,
    ImageSource,
    Share,
    alone,
    canonical_split,
    located_file_list,
    split_of_folder,
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
    path = _existing(source)
    if path.is_dir() and is_shard_folder(path, source):  # WebDataset-style (write-shards)
        shards = shard_paths(path, split)
        if not shards:
            raise ValueError(f"data source {source!r} has no {split}-*.tar shards")
        return ShardDataset(shards, max_pixels, decode, share)
    laid_out = path.is_dir() and has_splits(path)
    if path.is_file():
        return located_file_list(path, [path.with_suffix(""), path.parent], options)
    if not laid_out:
        return ImageFolderDataset(path, **options)
    return split_of_folder(path, split, source, options)


def _existing(source: str) -> Path:
    """The folder or .txt list `source` names; ValueError in one line otherwise."""
    if not source:
        raise ValueError(f"empty data source: {SOURCE_HELP}")
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() != ".txt":
        raise ValueError(f"data source {source!r} is not a .txt file list: {SOURCE_HELP}")
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"data source {source!r} does not exist: {SOURCE_HELP}")
    return path


def is_shard_folder(path: Path, source: str) -> bool:
    """Whether a folder is a source of tar shards: it holds split-named shards
    (`train-000000.tar`, as `write-shards` names them), or tars and nothing else a source could
    be (no sub-folders, no images, no lists). A stray tar beside image folders (an ImageNet root
    still holding `ILSVRC2012_img_val.tar`) does not turn them into shards; split-named shards
    beside split folders are ambiguous, and refused."""
    split_named = any(next(path.glob(f"{name}-*.tar"), None) for name in _SPLIT_NAMES)
    folders = has_splits(path) or any(
        p.is_dir() and not p.name.startswith(".") for p in path.iterdir()
    )
    if split_named and folders:
        raise ValueError(
            f"data source {source!r} holds both tar shards and image folders: point "
            "--data.source at the shards' folder or at the images' alone"
        )
    if split_named:
        return True
    loose = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    tars = [p for p in loose if p.suffix.lower() == ".tar"]
    return (
        bool(tars)
        and not folders
        and all(p.suffix.lower() in (".tar", ".json", ".txt") for p in loose)
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
