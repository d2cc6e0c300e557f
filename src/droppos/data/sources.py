"""Where images come from: image folders, file lists and in-memory arrays (the demo set,
Fashion-MNIST). Tar shards are the fourth kind (`data/shards.py`); `data/catalog.py` turns a
`--data.source` string into one of them.

Every source is an `ImageSource`: random access to `(image, label)` with `label == -1` when
unlabelled, the image as `--data.decode` wants it (`data/decode.py`), and what the source is made
of (`origin`, `classes`, `num_classes`, `encoded`) so that evaluations and `write-shards` need not
know which kind they hold. Images keep their own mode ("L" or "RGB"); the transforms convert
them to the model's channel count.
"""

from __future__ import annotations

import abc
import functools
import gzip
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from droppos.data.decode import DEFAULT_MAX_IMAGE_PIXELS, DecodedImage, read_image, read_regular

# Class-index labels declare how many classes there are, and an evaluation allocates a row per
# class: a label space up to LABEL_SPACE is believed (ImageNet-21k has 21,843 classes), a larger
# one only when at least one in CLASS_SPREAD of its classes is present.
LABEL_SPACE = 65_536
CLASS_SPREAD = 16


def check_labels(
    labels: Sequence[int], name: Callable[[int], str], classes: Sequence[str] | None = None
) -> None:
    """Raise ValueError, one line naming the sample (`name(index)` says which file or member),
    unless the labels are all -1 (unlabelled), or all class indices (0, 1, ...) that declare a
    plausible number of classes (largest label + 1): at most `len(classes)` where the classes
    are named; otherwise at most 65,536, or at most 16 times the number of distinct labels
    present. A few validation images of ImageNet-1k or -21k pass; 999999 among 4 samples does
    not. An evaluation's allocations are then bounded by what the files hold."""
    try:
        array = np.asarray(labels, dtype=np.int64)
    except OverflowError:  # past 2**63: no class index, and no allocation to bound
        largest = max(range(len(labels)), key=labels.__getitem__)
        raise ValueError(
            f"{name(largest)}: label {labels[largest]} is not a class index (0, 1, ...)"
        ) from None
    if array.size == 0 or (array == -1).all():
        return
    if array.min() < 0:
        first = int(np.argmax(array < 0))
        if array[first] < -1:
            raise ValueError(
                f"{name(first)}: label {array[first]} is not a class index (0, 1, ...)"
            )
        labelled = int(np.argmax(array >= 0))
        raise ValueError(
            f"{name(first)} has no label while {name(labelled)} has one: label every sample or none"
        )
    largest = int(np.argmax(array))
    declared = int(array[largest]) + 1
    if classes is not None:
        if declared > len(classes):
            raise ValueError(
                f"{name(largest)}: label {declared - 1}, but only {len(classes)} classes are named"
            )
        return
    present = len(np.unique(array)) if declared > LABEL_SPACE else declared
    if declared > max(LABEL_SPACE, CLASS_SPREAD * present):
        raise ValueError(
            f"{name(largest)}: label {declared - 1} declares {declared:,} classes, but the "
            f"{array.size:,} samples hold {present:,} distinct labels (past {LABEL_SPACE:,} "
            f"classes, one in {CLASS_SPREAD} must be present): number the classes 0, 1, ..."
        )


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
DEMO_FILE = "fashion_mnist_demo.npz"
SPLIT_ALIASES = {"train": "train", "val": "val", "test": "val", "t10k": "val"}


def canonical_split(split: str) -> str:
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'val'") from None


class ImageSource(Dataset, abc.ABC):
    """Random access to `(image, label)`; what every data source is to the rest of droppos.

    `origin` names what the images are (two sources with the same origin hold the same
    images, e.g. a folder without splits read as train and as val); `encoded(i)` gives sample
    i as a file (`write-shards` copies it). `holds_files` says whether images arrive as files
    (which `--data.decode device` needs) rather than pixels in memory.
    """

    classes: list[str] | None = None
    num_classes: int = 0
    origin: str = ""
    holds_files: bool = True

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of samples."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> tuple[DecodedImage, int]:
        """Sample `index` as (decoded image, label)."""

    @abc.abstractmethod
    def encoded(self, index: int) -> tuple[bytes, str, int]:
        """(file bytes, suffix, label) of sample `index`."""

    @abc.abstractmethod
    def all_labels(self) -> list[int]:
        """Every sample's label, without reading an image (what a class-balanced pick needs)."""


class SourceSubset(ImageSource):
    """Some samples of a source (a class-balanced training subset, a validation split held
    out of train), itself a source: labels, classes and files pass through; `part` tells its
    origin from the rest's, so the two are never taken for the same images."""

    def __init__(self, source: ImageSource, indices: Sequence[int], part: str) -> None:
        self.source, self.indices = source, list(indices)
        self.classes, self.num_classes = source.classes, source.num_classes
        self.origin, self.holds_files = f"{source.origin} [{part}]", source.holds_files
        labels = source.all_labels()
        self._labels = [labels[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[DecodedImage, int]:
        return self.source[self.indices[index]]

    def encoded(self, index: int) -> tuple[bytes, str, int]:
        return self.source.encoded(self.indices[index])

    def all_labels(self) -> list[int]:
        return list(self._labels)


def balanced_pick(labels: Sequence[int], count: int, seed: int, what: str) -> list[int]:
    """`count` indices into `labels`, as many of each class as can be (the first classes take
    one more when `count` does not divide), drawn from `seed` alone: every run that asks for
    the same count and seed gets the same images, whatever its own seed. Sorted."""
    array = np.asarray(labels)
    order = np.argsort(array, kind="stable")  # the indices grouped by class, in one sort
    classes, starts, sizes = np.unique(array[order], return_index=True, return_counts=True)
    per_class = [count // len(classes) + (i < count % len(classes)) for i in range(len(classes))]
    generator = np.random.default_rng(seed)
    picked: list[int] = []
    for label, start, size, wanted in zip(classes, starts, sizes, per_class):
        if wanted > size:
            raise ValueError(
                f"{what} {count} needs {wanted} images of class {label}, which has "
                f"{size}: ask for at most {size * len(classes)}"
            )
        members = order[start : start + size]
        picked += generator.choice(members, size=wanted, replace=False).tolist()
    return sorted(picked)


def carved_splits(
    train: ImageSource, val: ImageSource | None, held_out: int, train_images: int, seed: int
) -> tuple[ImageSource, ImageSource]:
    """`held_out` > 0: a class-balanced validation split held out of `train` (`val` is then
    None, never read); `train_images` > 0: train as a class-balanced subset of what is left.
    Both picks are drawn from `seed` alone (`balanced_pick`)."""
    if held_out:
        labels = train.all_labels()
        if held_out >= len(labels):
            raise ValueError(
                f"--data.val_from_train {held_out} leaves no training image of {len(labels)}"
            )
        chosen = balanced_pick(labels, held_out, seed, "--data.val_from_train")
        rest = sorted(set(range(len(labels))) - set(chosen))
        train, val = SourceSubset(train, rest, "train"), SourceSubset(train, chosen, "held-out val")
    assert val is not None, "a source's own val split, or one held out of train"
    if train_images:
        if train_images > len(train):
            raise ValueError(
                f"--data.train_images {train_images}: the training split has {len(train)} images"
            )
        chosen = balanced_pick(train.all_labels(), train_images, seed, "--data.train_images")
        train = SourceSubset(train, chosen, f"{train_images} images")
    return train, val


Share = Callable[[Callable[[], Any]], Any]
"""How a listing is made: `alone` computes it here; under torchrun, rank 0 computes it once
and every rank receives it (`engine/collectives.py:computed_by_rank0`), so a folder of a
million images is walked once, not by every rank of every node."""


def alone(compute: Callable[[], Any]) -> Any:
    return compute()


class _FileSource(ImageSource):
    """Images that are files on disk: `samples` = [(path, label)], decoded as asked."""

    samples: list[tuple[str, int]]

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode: str = "pil",
        share: Share = alone,
    ) -> None:
        self.root = Path(root).expanduser()
        self.max_pixels = max_pixels
        self.decode = decode
        self.share = share

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[DecodedImage, int]:
        path, label = self.samples[index]
        return read_image(path, path, self.max_pixels, self.decode), label

    def encoded(self, index: int) -> tuple[bytes, str, int]:
        path, label = self.samples[index]
        return read_regular(path), Path(path).suffix.lstrip(".").lower(), int(label)

    def all_labels(self) -> list[int]:
        return [int(label) for _, label in self.samples]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS


def visible_subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataset(_FileSource):
    """Images under ``root``: one sub-folder per class (labelled), or flat (unlabelled).

    Class mode is chosen when ``root``'s visible sub-folders hold images; labels are indices into
    the sorted folder names, as in torchvision's ImageFolder (files found recursively; images
    loose in ``root`` are then ignored). Otherwise the images directly inside ``root`` are used,
    sorted by name, with label -1.
    """

    def __init__(
        self, root: str | os.PathLike[str], classes: list[str] | None = None, **options: Any
    ) -> None:
        """`classes`: the class names whose indices label this folder's sub-folders (another
        split's, so that a label means the same class in every split); by default its own.
        `options`: max_pixels, decode, share (as every file source takes them)."""
        super().__init__(root, **options)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} is not a directory")
        self.origin = str(self.root.resolve())
        classes, samples = self.share(lambda: list_folder(self.root, classes))
        self.classes = classes
        self.samples = [(path, label) for path, label in samples]
        check_labels([label for _, label in samples], lambda i: samples[i][0], classes)
        self.num_classes = len(self.classes) if self.classes else 0


def images_under(top: Path, seen: set[str]) -> list[str]:
    """Image files anywhere under `top`, in torchvision's ImageFolder order (folders by path,
    files by name), following a linked folder only if its real folder is not in `seen` (which
    grows): a link back up (`a/up -> ..`) or across (`b/x -> ../a`) neither multiplies the
    samples nor loops."""
    found = []
    for folder, subfolders, files in os.walk(top, followlinks=True):
        kept = []
        for name in sorted(subfolders):
            real = os.path.realpath(os.path.join(folder, name))
            if real not in seen:
                seen.add(real)
                kept.append(name)
        subfolders[:] = kept
        found.append((folder, sorted(files)))
    return [
        os.path.join(folder, name)
        for folder, files in sorted(found)
        for name in files
        if name.lower().endswith(IMG_EXTENSIONS)
    ]


def list_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[str] | None, list[tuple[str, int]]]:
    """(class names or None, [(path, label)]) of an image folder (see ImageFolderDataset);
    with `classes`, sub-folders are labelled by their index there and must all be in it."""
    subdirs = visible_subdirs(root)
    if subdirs:
        own = [d.name for d in subdirs]
        if classes is not None:
            unknown = [name for name in own if name not in classes]
            if unknown:
                raise ValueError(
                    f"{str(root)!r} has class folders the training split lacks: "
                    f"{', '.join(unknown[:5])}; every split must use the training split's classes"
                )
        classes = classes if classes is not None else own
        index = {name: i for i, name in enumerate(classes)}
        seen = {os.path.realpath(folder) for folder in [root, *subdirs]}
        samples = [
            (path, index[name]) for name in sorted(own) for path in images_under(root / name, seen)
        ]
        if samples:
            return classes, samples
    # no class folders, or only image-less ones: flat
    samples = [(str(p), -1) for p in sorted(root.iterdir()) if _is_image(p)]
    if not samples:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in {str(root)!r}")
    return None, samples


class FileListDataset(_FileSource):
    """The original DropPos / ImageNet list format: ``relative/path [label]`` per line.

    Paths are relative to ``root``. Blank lines and ``#`` comments are skipped. Either every line
    has an integer label or none has; ``num_classes`` is ``max(label) + 1``. Only the first path
    is checked for existence, so that building a 1.28M-line ImageNet list stays cheap.
    """

    def __init__(
        self, root: str | os.PathLike[str], list_file: str | os.PathLike[str], **options: Any
    ) -> None:
        """`options`: max_pixels, decode, share (as every file source takes them)."""
        super().__init__(root, **options)
        self.list_file = Path(list_file).expanduser()
        if not self.list_file.is_file():
            raise ValueError(f"file list {str(self.list_file)!r} not found")
        self.origin = f"{self.list_file.resolve()} in {self.root.resolve()}"
        entries = self.share(lambda: _parse_file_list(self.list_file))
        if not entries:
            raise ValueError(f"file list {str(self.list_file)!r} has no entries")
        first = self.root / entries[0][0]
        if not first.is_file():
            raise ValueError(
                f"{str(self.list_file)!r} lists {entries[0][0]!r}, but {str(first)!r} "
                "does not exist: paths must be relative to the image root"
            )
        self.samples = [(str(self.root / p), label) for p, label in entries]
        labels = [label for _, label in self.samples]
        check_labels(labels, lambda i: f"{self.list_file} ({entries[i][0]})")
        self.num_classes = max(labels) + 1 if labels[0] >= 0 else 0
        self.classes = None


def located_file_list(
    list_file: Path, candidate_roots: list[Path], options: dict[str, Any]
) -> FileListDataset:
    """The list's images under the first of `candidate_roots` that holds its first path: the
    original code reads ``DATA/train.txt`` relative to ``DATA/train``, other lists are relative
    to their own folder. `options` as every file source takes them."""
    first = next((path for _, path, _ in list_entries(list_file)), None)
    if first is not None:
        for root in candidate_roots:
            if (root / first).is_file():
                return FileListDataset(root, list_file, **options)
    # raises a message naming the path
    return FileListDataset(candidate_roots[-1], list_file, **options)


def split_of_folder(
    path: Path, split: str, source: str, options: dict[str, Any]
) -> FileListDataset | ImageFolderDataset:
    """`split` of a folder laid out by split: its `split.txt` list, else its `split/` folder
    (val falls back on `test/`), labelled by train's class names (one meaning each)."""
    if (path / f"{split}.txt").is_file():
        return located_file_list(path / f"{split}.txt", [path / split, path], options)
    folder = path / split
    if not folder.is_dir() and split == "val":
        folder = path / "test"
    if not folder.is_dir():
        raise ValueError(
            f"data source {source!r} is split into train/val but has no '{split}/' folder "
            f"or '{split}.txt' list"
        )
    train = path / "train"
    classes = [d.name for d in visible_subdirs(train)] if train.is_dir() else None
    if split == "train" or not classes:
        classes = None
    return ImageFolderDataset(folder, classes=classes, **options)


def _split_line(line: str) -> tuple[str, int | None]:
    # rsplit keeps paths with spaces intact; the original split(' ') did not. A label is ASCII
    # digits alone: int() would also take "1_0" as 10, and other scripts' digits.
    parts = line.rsplit(maxsplit=1)
    if len(parts) == 2 and re.fullmatch(r"-?[0-9]+", parts[1]):
        return parts[0], int(parts[1])
    return line, None


def list_entries(list_file: Path) -> Iterator[tuple[int, str, int | None]]:
    """Yield ``(line number, path, label or None)``, skipping blanks and ``#`` comments. A line
    that is not UTF-8, or a path that leaves the image root (absolute, or through ``..``), is
    refused in one line naming the file and line: a list reads images under its root alone."""
    with open(list_file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{list_file}:{lineno}: not UTF-8 text (byte {error.start + 1} of the line)"
                ) from None
            if line and not line.startswith("#"):
                path, label = _split_line(line)
                if os.path.isabs(path) or ".." in path.split("/"):
                    raise ValueError(
                        f"{list_file}:{lineno}: {path!r} leaves the image root: list paths "
                        "relative to it (no leading /, no ..)"
                    )
                yield lineno, path, label


def _parse_file_list(list_file: Path) -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    labelled: bool | None = None
    for lineno, path, label in list_entries(list_file):
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


class ArrayDataset(ImageSource):
    """uint8 images [N, H, W] (greyscale) or [N, H, W, 3] held in memory, with int labels."""

    holds_files = False

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], origin: str
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.classes = list(classes)
        check_labels(self.labels, lambda i: f"{origin} sample {i}", self.classes)
        self.num_classes = len(self.classes)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])

    def encoded(self, index: int) -> tuple[bytes, str, int]:
        """The image as PNG (lossless)."""
        image, label = self[index]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "png", label

    def all_labels(self) -> list[int]:
        return self.labels.tolist()


class FashionMNISTDataset(ArrayDataset):
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
        self.split = canonical_split(split)
        prefix = "train" if self.split == "train" else "t10k"
        images = read_idx(_find_idx(self.root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(self.root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8:
            raise ValueError(
                f"unexpected Fashion-MNIST arrays in {str(self.root)!r}: images "
                f"{images.dtype}{list(images.shape)}, labels {labels.dtype}{list(labels.shape)}"
            )
        origin = f"fashion-mnist:{self.root.resolve()}:{self.split}"
        super().__init__(images, labels, FASHION_MNIST_CLASSES, origin)


@functools.lru_cache(maxsize=1)
def _load_demo() -> dict[str, np.ndarray]:
    ref = resources.files("droppos.data") / "demo" / DEMO_FILE
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class DemoDataset(ArrayDataset):
    """The Fashion-MNIST subset shipped inside the package: 4000 train / 1000 val images.

    Stratified, 400 (train) and 100 (val) per class; built by ``scripts/build_demo_dataset.py``.
    Lets every command run, and be tested, with no download.
    """

    def __init__(self, split: str = "train") -> None:
        self.split = canonical_split(split)
        data = _load_demo()
        classes = [str(c) for c in data["classes"]]
        images, labels = data[f"{self.split}_images"], data[f"{self.split}_labels"]
        super().__init__(images, labels, classes, f"demo:{self.split}")
