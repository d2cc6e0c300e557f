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
    visible_subdirs,
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
    if is_shard_folder(path, source):  # WebDataset-style shards (droppos write-shards)
        shards = shard_paths(path, split)
        if not shards:
            raise ValueError(f"data source {source!r} has no {split}-*.tar shards")
        return ShardDataset(shards, max_pixels, decode, share)
    if not has_splits(path):
        return ImageFolderDataset(path, **options)
    if (path / f"{split}.txt").is_file():
        return _file_list(path / f"{split}.txt", [path / split, path], options)
    train = path / "train"
    classes = [d.name for d in visible_subdirs(train)] if train.is_dir() else None
    if split == "train" or not classes:
        classes = None  # other splits are labelled by train's class names: one meaning each
    if (path / split).is_dir():
        return ImageFolderDataset(path / split, classes=classes, **options)
    if split == "val" and (path / "test").is_dir():
        return ImageFolderDataset(path / "test", classes=classes, **options)
    raise ValueError(
        f"data source {source!r} is split into train/val but has no '{split}/' folder "
        f"or '{split}.txt' list"
    )


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
