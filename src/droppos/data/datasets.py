"""Datasets that yield ``(PIL.Image, label)``; ``label == -1`` when the data is unlabelled.

Pre-training needs only images, but fine-tuning, kNN and the linear probe need labels, so every
dataset carries them when it can and says how many classes there are (``num_classes``, 0 when
unlabelled). Images are returned in their own mode ("L" or "RGB"); the transforms convert them
to the model's channel count, so a greyscale set can feed an RGB model and vice versa.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.io import decode_image as torchvision_decode

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEMO_FILE",
    "FASHION_MNIST_CLASSES",
    "IMG_EXTENSIONS",
    "BadImageError",
    "DemoDataset",
    "FashionMNISTDataset",
    "FileListDataset",
    "ImageFolderDataset",
    "LazyImage",
    "build_dataset",
    "load_image",
    "read_idx",
    "to_grey_or_rgb",
]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SPLITS = ("train", "val")
_SPLIT_ALIASES = {"train": "train", "val": "val", "test": "val", "t10k": "val"}
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_SOURCE_HELP = (
    "expected 'demo', 'fashion-mnist', 'fashion-mnist:DIR', an image directory "
    "(class sub-folders, flat, or with train/ and val/), a folder of .tar shards, or a .txt "
    "file list"
)


class DatasetWrapper(Dataset):
    """A dataset that wraps another and keeps its length, classes and class count visible."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    @property
    def num_classes(self) -> int:
        return getattr(self.dataset, "num_classes", 0)

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def _canonical_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'val'") from None


DEFAULT_MAX_IMAGE_PIXELS = 200_000_000  # 14,000 x 14,000: far above any training image


class BadImageError(ValueError):
    """An image file that cannot be used: unreadable, truncated, not an image, or too large."""

    def __init__(self, path: str | os.PathLike[str], reason: str | None = None) -> None:
        # One argument: an already formed message (how DataLoader re-raises a worker's error).
        super().__init__(str(path) if reason is None else f"unreadable image {path}: {reason}")
        self.path, self.reason = ("", str(path)) if reason is None else (str(path), reason)


def load_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode an image fully (closing the file) as "L" or "RGB", keeping greyscale grey.

    torchvision's default loader forces RGB; keeping "L" lets a 1-channel model read greyscale
    data without a round trip through three identical channels. The size is checked from the
    header, before decoding: a file of more than `max_pixels` is refused, never decoded. Any
    failure raises `BadImageError` naming the file and what is wrong with it.
    """
    try:
        with open(path, "rb") as stream:
            return decode_image(stream, path, max_pixels)
    except OSError as error:
        raise BadImageError(path, error.strerror or str(error)) from None


def decode_image(
    stream: BinaryIO,
    name: str | os.PathLike[str],
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """`load_image` for an open binary stream (a file, or a member of a tar shard)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit, checked below, replaces Pillow's
    try:
        img = Image.open(stream)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise BadImageError(
                name,
                f"{width} x {height} pixels is more than --data.max_image_pixels ({max_pixels})",
            )
        img.load()
    except BadImageError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
        raise BadImageError(name, _describe_decode_error(error)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return to_grey_or_rgb(img)


def decode_tensor(
    data: bytes, name: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor [C, H, W] in the file's own channels (1 or 3),
    decoded by torchvision (libjpeg-turbo / libpng) without a trip through Pillow's image.
    (torchvision 0.29 announces that TorchCodec will take over its image decoders; this is the
    one place to change when it does.)

    The size is read from the header first (Pillow opens it without decoding), so an oversized
    file is refused before any pixel is decoded; 16-bit images are scaled to 8 bits, alpha is
    dropped. Any failure raises `BadImageError`.
    """
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
        if max_pixels is not None and width * height > max_pixels:
            raise BadImageError(
                name,
                f"{width} x {height} pixels is more than --data.max_image_pixels ({max_pixels})",
            )
        image = torchvision_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except BadImageError:
        raise
    except Exception as error:
        raise BadImageError(name, _describe_decode_error(error)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.shape[0] in (2, 4):  # greyscale or RGB with alpha
        image = image[:-1]
    return image


class LazyImage:
    """An image file whose header has been read but not its pixels.

    The transform picks the crop first and then decodes (`decode`), a JPEG at a reduced scale
    when the crop allows it (Pillow's draft mode: the DCT skips the detail that the resize would
    throw away). Holds the path, or the bytes of a shard member.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | bytes,
        name: str | os.PathLike[str],
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.source, self.name = source, str(name)
        try:
            with self._open() as header:
                self.size: tuple[int, int] = header.size
                self.format = header.format
        except Exception as error:
            raise BadImageError(name, _describe_decode_error(error)) from None
        width, height = self.size
        if max_pixels is not None and width * height > max_pixels:
            raise BadImageError(
                name,
                f"{width} x {height} pixels is more than --data.max_image_pixels ({max_pixels})",
            )

    def _open(self) -> Image.Image:
        if isinstance(self.source, bytes):
            return Image.open(io.BytesIO(self.source))
        return Image.open(self.source)

    def decode(self, reduce: int = 1) -> Image.Image:
        """The pixels ("L" or "RGB"); a JPEG at 1/`reduce` scale (2, 4 or 8) when asked."""
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the size was checked from the header
        try:
            with self._open() as image:
                if reduce > 1 and image.format == "JPEG":
                    width, height = image.size
                    image.draft(image.mode, (-(-width // reduce), -(-height // reduce)))
                image.load()
                return to_grey_or_rgb(image.copy() if image.mode in ("L", "RGB") else image)
        except Exception as error:
            raise BadImageError(self.name, _describe_decode_error(error)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def read_image(
    path: str | os.PathLike[str], max_pixels: int | None, decode: str
) -> Image.Image | torch.Tensor | LazyImage:
    """A file as a PIL image ("pil"), a uint8 tensor ("tensor", see `decode_tensor`) or a
    `LazyImage` ("draft", "device": decoded later, in the transform or on the device)."""
    if decode == "pil":
        return load_image(path, max_pixels)
    if decode in ("draft", "device"):
        return LazyImage(path, path, max_pixels)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise BadImageError(path, error.strerror or str(error)) from None
    return decode_tensor(data, path, max_pixels)


def _describe_decode_error(error: Exception) -> str:
    text = str(error)
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can read (empty, or another kind of file)"
    if "truncated" in text.lower() or isinstance(error, EOFError):
        return "the file is truncated"
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def to_grey_or_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L" or "RGB" with the full range mapped to 0-255.

    16-bit greyscale ("I;16", or "I" from 16-bit files) is scaled down, not clipped (a plain
    `convert("L")` saturates it to white); float images in [0, 1] are scaled up.
    """
    if img.mode in ("L", "RGB"):
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        eight_bit = img.mode == "I" and values.max(initial=0) <= 255  # 8-bit values in int32
        scaled = values if eight_bit else values / 257.0
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img.convert("L" if img.mode in _GREY_MODES else "RGB")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS


def _visible_subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataset(Dataset):
    """Images under ``root``: one sub-folder per class (labelled), or flat (unlabelled).

    Class mode is chosen when ``root``'s visible sub-folders hold images; labels are indices into
    the sorted folder names, as in torchvision's ImageFolder (files found recursively; images
    loose in ``root`` are then ignored). Otherwise the images directly inside ``root`` are used,
    sorted by name, with label -1.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode: str = "pil",
    ) -> None:
        self.root = Path(root).expanduser()
        self.max_pixels = max_pixels
        self.decode = decode
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} is not a directory")
        self.classes: list[str] | None = None
        self.samples: list[tuple[str, int]] = []
        subdirs = _visible_subdirs(self.root)
        if subdirs:
            classes = [d.name for d in subdirs]
            # torchvision's walker, but with hidden folders (.ipynb_checkpoints...) left out.
            self.samples = make_dataset(
                str(self.root),
                {c: i for i, c in enumerate(classes)},
                extensions=IMG_EXTENSIONS,
                allow_empty=True,
            )
            if self.samples:
                self.classes = classes
        if not self.samples:  # no class folders, or only image-less ones: flat
            self.samples = [(str(p), -1) for p in sorted(self.root.iterdir()) if _is_image(p)]
        self.num_classes = len(self.classes) if self.classes else 0
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in {str(self.root)!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return read_image(path, self.max_pixels, self.decode), label


class FileListDataset(Dataset):
    """The original DropPos / ImageNet list format: ``relative/path [label]`` per line.

    Paths are relative to ``root``. Blank lines and ``#`` comments are skipped. Either every line
    has an integer label or none has; ``num_classes`` is ``max(label) + 1``. Only the first path
    is checked for existence, so that building a 1.28M-line ImageNet list stays cheap.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        list_file: str | os.PathLike[str],
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode: str = "pil",
    ) -> None:
        self.root = Path(root).expanduser()
        self.max_pixels = max_pixels
        self.decode = decode
        self.list_file = Path(list_file).expanduser()
        if not self.list_file.is_file():
            raise ValueError(f"file list {str(self.list_file)!r} not found")
        self.samples = _parse_file_list(self.list_file)
        if not self.samples:
            raise ValueError(f"file list {str(self.list_file)!r} has no entries")
        first = self.root / self.samples[0][0]
        if not first.is_file():
            raise ValueError(
                f"{str(self.list_file)!r} lists {self.samples[0][0]!r}, but {str(first)!r} "
                "does not exist: paths must be relative to the image root"
            )
        self.samples = [(str(self.root / p), label) for p, label in self.samples]
        labels = [label for _, label in self.samples]
        self.num_classes = max(labels) + 1 if labels[0] >= 0 else 0
        self.classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return read_image(path, self.max_pixels, self.decode), label


def _split_line(line: str) -> tuple[str, int | None]:
    # rsplit keeps paths with spaces intact; the original split(' ') did not.
    parts = line.rsplit(maxsplit=1)
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        return parts[0], int(parts[1])
    return line, None


def _list_entries(list_file: Path) -> Iterator[tuple[int, str, int | None]]:
    """Yield ``(line number, path, label or None)``, skipping blanks and ``#`` comments."""
    with open(list_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if line and not line.startswith("#"):
                yield (lineno, *_split_line(line))


def _parse_file_list(list_file: Path) -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    labelled: bool | None = None
    for lineno, path, label in _list_entries(list_file):
        if labelled is None:
            labelled = label is not None
        if (label is not None) != labelled:
            raise ValueError(
                f"{list_file}:{lineno}: mixes labelled and unlabelled lines "
                "(expected 'path label' on every line, or 'path' alone on every line)"
            )
        if label is not None and label < 0:
            raise ValueError(f"{list_file}:{lineno}: negative label {label}")
        samples.append((path, -1 if label is None else label))
    return samples


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, into a native-order array."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{str(path)!r}: header says shape {shape} ({expected} bytes), "
            f"file has {len(data) - offset} bytes of data"
        )
    array = np.frombuffer(data, dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise ValueError(f"Fashion-MNIST file {stem}[.gz] not found in {str(root)!r}")


class _ArrayImageDataset(Dataset):
    """uint8 images [N, H, W] (greyscale) or [N, H, W, 3] held in memory, with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.classes: list[str] | None = list(classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


class FashionMNISTDataset(_ArrayImageDataset):
    """Fashion-MNIST from its IDX files: ``train-*`` for "train", ``t10k-*`` for "val"/"test".

    28x28 greyscale, 10 classes. Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
    from ``root`` (by default where Debian's ``dataset-fashion-mnist`` installs them).
    """

    def __init__(
        self, root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT, split: str = "train"
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(
                f"Fashion-MNIST directory {str(self.root)!r} not found "
                "(apt install dataset-fashion-mnist, or use 'fashion-mnist:DIR')"
            )
        self.split = _canonical_split(split)
        prefix = "train" if self.split == "train" else "t10k"
        images = read_idx(_find_idx(self.root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(self.root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8:
            raise ValueError(
                f"unexpected Fashion-MNIST arrays in {str(self.root)!r}: images "
                f"{images.dtype}{list(images.shape)}, labels {labels.dtype}{list(labels.shape)}"
            )
        super().__init__(images, labels, FASHION_MNIST_CLASSES)


DEMO_FILE = "fashion_mnist_demo.npz"


@functools.lru_cache(maxsize=1)
def _load_demo() -> dict[str, np.ndarray]:
    ref = resources.files("droppos.data") / "demo" / DEMO_FILE
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class DemoDataset(_ArrayImageDataset):
    """The Fashion-MNIST subset shipped inside the package: 4000 train / 1000 val images.

    Stratified, 400 (train) and 100 (val) per class; built by ``scripts/build_demo_dataset.py``.
    Lets every command run, and be tested, with no download.
    """

    def __init__(self, split: str = "train") -> None:
        self.split = _canonical_split(split)
        data = _load_demo()
        classes = [str(c) for c in data["classes"]]
        super().__init__(data[f"{self.split}_images"], data[f"{self.split}_labels"], classes)


def build_dataset(
    source: str,
    split: str = "train",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decode: str = "pil",
) -> Dataset:
    """One entry point from a config string to a dataset of ``(PIL.Image, label)``.

    ``source``: ``"demo"``; ``"fashion-mnist"`` or ``"fashion-mnist:DIR"``; a ``.txt`` file list
    (paths relative to the sibling folder named like the list, else to the list's folder); or a
    directory. A directory with ``train/``/``val/`` sub-folders or ``train.txt``/``val.txt``
    lists is split by ``split``; any other directory is used whole, as an image folder.
    Raises ValueError with a one-line message on a bad source.
    """
    split = _canonical_split(split)
    if source == "demo":
        return DemoDataset(split)
    if source == "fashion-mnist" or source.startswith("fashion-mnist:"):
        root = source.partition(":")[2] or DEFAULT_FASHION_MNIST_ROOT
        return FashionMNISTDataset(root, split)
    if not source:
        raise ValueError(f"empty data source: {_SOURCE_HELP}")
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise ValueError(f"data source {source!r} is not a .txt file list: {_SOURCE_HELP}")
        return _file_list(path, [path.with_suffix(""), path.parent], max_pixels, decode)
    if not path.is_dir():
        raise ValueError(f"data source {source!r} does not exist: {_SOURCE_HELP}")
    if any(path.glob("*.tar")):  # WebDataset-style shards (droppos write-shards)
        from droppos.data.shards import ShardDataset, shard_paths

        shards = shard_paths(path, split)
        if not shards:
            raise ValueError(f"data source {source!r} has no {split}-*.tar shards")
        return ShardDataset(shards, max_pixels, decode)
    split_names = [*_SPLITS, "test"]
    has_layout = any((path / s).is_dir() or (path / f"{s}.txt").is_file() for s in split_names)
    if not has_layout:
        return ImageFolderDataset(path, max_pixels, decode)
    if (path / f"{split}.txt").is_file():
        return _file_list(path / f"{split}.txt", [path / split, path], max_pixels, decode)
    if (path / split).is_dir():
        return ImageFolderDataset(path / split, max_pixels, decode)
    if split == "val" and (path / "test").is_dir():
        return ImageFolderDataset(path / "test", max_pixels, decode)
    raise ValueError(
        f"data source {source!r} is split into train/val but has no '{split}/' folder "
        f"or '{split}.txt' list"
    )


def _file_list(
    list_file: Path,
    candidate_roots: list[Path],
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decode: str = "pil",
) -> FileListDataset:
    """The original code reads ``DATA/train.txt`` relative to ``DATA/train``; fall back to the
    list's own folder when the listed paths resolve there instead."""
    first = _first_entry(list_file)
    if first is not None:
        for root in candidate_roots:
            if (root / first).is_file():
                return FileListDataset(root, list_file, max_pixels, decode)
    # raises a message naming the path
    return FileListDataset(candidate_roots[-1], list_file, max_pixels, decode)


def _first_entry(list_file: Path) -> str | None:
    return next((path for _, path, _ in _list_entries(list_file)), None)
