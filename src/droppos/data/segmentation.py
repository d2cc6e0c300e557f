"""Images with a class per pixel: the layouts segmentation data comes in, and two built-in sets.

A segmentation source gives `(SegmentationSample, index)`: the image (Pillow, "L" or "RGB") and
its mask (Pillow "L": one class index per pixel, `IGNORE` = 255 for pixels no class is scored
on). Four kinds, picked from `--data.source` by `segmentation_source`:

- the ADE20K / MMSegmentation layout, `images/{training,validation}/NAME.jpg` with
  `annotations/{training,validation}/NAME.png`; its label 0 ("other") is ignored and every other
  label moves down by one (MMSegmentation's `reduce_zero_label`, ADE20K's benchmark) unless
  `--data.reduce_zero_label false`;
- the Pascal VOC layout, `JPEGImages/NAME.jpg`, `SegmentationClass/NAME.png` (palette PNGs whose
  index is the class; 255 marks object borders, ignored) and
  `ImageSets/Segmentation/{train,val}.txt`;
- a plain pair layout, `{train,val}/images/NAME.*` with `{train,val}/masks/NAME.png`;
- `demo-scenes` and `fashion-mnist-scenes[:DIR]`: scenes of 2 to 4 Fashion-MNIST items on a
  56 x 56 canvas, each pixel labelled with its item's class or background (docs/segmentation.md
  says how they are made). Built from a fixed seed, so everyone's scenes are the same.

Class names come from `classes.txt` beside the layout (one per line, the classes the model
predicts: after `reduce_zero_label`), else VOC's own 21, else `class_0`, `class_1`, ... for as
many classes as `--data.num_classes` says or the training masks hold. A mask of another size than
its image, a label past the classes (other than 255), an image without a mask, or a mask that is
neither single-channel nor a palette is one line naming the file.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from droppos.data.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    check_size,
    describe_decode_error,
    load_image,
    open_raster,
    open_regular,
)
from droppos.data.sources import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    DemoDataset,
    FashionMNISTDataset,
    canonical_split,
)
from droppos.data.transforms import ConvertMode, mean_std

IGNORE = 255
"""The mask value no class is scored on (VOC's borders, ADE20K's "other" once reduced)."""
MAX_SEGMENTATION_CLASSES = IGNORE  # 0..254: masks are 8-bit, and 255 is the ignore value
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
MASK_MODES = ("L", "P", "I", "I;16", "1")  # single-channel or palette
SOURCE_HELP = (
    "expected 'demo-scenes', 'fashion-mnist-scenes[:DIR]', or a folder in the ADE20K layout "
    "(images/ and annotations/ with training/ and validation/), the Pascal VOC layout "
    "(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/) or pairs "
    "({train,val}/images/ and {train,val}/masks/)"
)


@dataclass
class SegmentationSample:
    """One image and its mask (same size), and the name errors and pictures use."""

    image: Image.Image
    mask: Image.Image
    name: str


class SegmentationSource(Dataset, abc.ABC):
    """Random access to `(SegmentationSample, index)`: what every segmentation layout is.

    `classes` names the mask values 0..num_classes-1; `native_size` is the side the images are
    made at when the source knows it (the built-in scenes), else None.
    """

    classes: list[str]
    origin: str = ""
    native_size: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of samples."""

    @abc.abstractmethod
    def sample(self, index: int) -> SegmentationSample:
        """Sample `index`, checked (ValueError naming the file when it is unusable)."""

    def __getitem__(self, index: int) -> tuple[SegmentationSample, int]:
        return self.sample(index), index


# -- layouts on disk ---------------------------------------------------------------------------


def read_mask(path: str | os.PathLike[str], max_pixels: int | None) -> Image.Image:
    """A label PNG -> Pillow "L" (class indices): single-channel or palette, else ValueError."""
    try:
        with open_regular(path) as stream:
            mask = open_raster(stream)
            check_size(path, mask.size, max_pixels)
            mask.load()
    except BadImageError:
        raise
    except Exception as error:
        raise BadImageError(path, describe_decode_error(error)) from None
    if mask.mode not in MASK_MODES:
        raise ValueError(
            f"{path}: a {mask.mode} mask; a mask holds one class index per pixel "
            "(single-channel or palette PNG), not colours"
        )
    if mask.mode == "L":
        return mask
    values = np.asarray(mask)  # a palette's indices, or integer labels
    if values.size and (values.min() < 0 or values.max() > IGNORE):
        raise ValueError(f"{path}: labels up to {values.max()} do not fit 8-bit masks (0-255)")
    return Image.fromarray(values.astype(np.uint8), "L")


class MaskedFiles(SegmentationSource):
    """Image files paired with mask files: what the ADE20K, VOC and pair layouts all are."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        classes: Sequence[str],
        origin: str,
        reduce_zero_label: bool = False,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if not pairs:
            raise ValueError(f"{origin}: no images found")
        self.pairs, self.classes, self.origin = list(pairs), list(classes), origin
        self.reduce_zero_label, self.max_pixels = reduce_zero_label, max_pixels

    def __len__(self) -> int:
        return len(self.pairs)

    def raw_labels(self, index: int) -> np.ndarray:
        """The mask's values as stored (before `reduce_zero_label`)."""
        return np.asarray(read_mask(self.pairs[index][1], self.max_pixels))

    def sample(self, index: int) -> SegmentationSample:
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path, self.max_pixels)
        mask = read_mask(mask_path, self.max_pixels)
        if mask.size != image.size:
            raise ValueError(
                f"{mask_path}: the mask is {mask.size[0]} x {mask.size[1]}, its image "
                f"{image_path} {image.size[0]} x {image.size[1]}: a mask labels its image's pixels"
            )
        labels = np.asarray(mask)
        if self.reduce_zero_label:
            labels = reduce_zero_label(labels)
        check_mask_labels(labels, len(self.classes), mask_path, self.reduce_zero_label)
        return SegmentationSample(image, Image.fromarray(labels, "L"), Path(image_path).stem)


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
    """ADE20K's rule: 0 ("other") becomes IGNORE, every other label one less."""
    reduced = labels.astype(np.int16) - 1
    reduced[labels == 0] = IGNORE
    reduced[labels == IGNORE] = IGNORE
    return reduced.astype(np.uint8)


def check_mask_labels(labels: np.ndarray, num_classes: int, path: str, reduced: bool) -> None:
    """ValueError naming `path` for a label that is neither a class nor IGNORE."""
    wrong = labels[(labels >= num_classes) & (labels != IGNORE)]
    if wrong.size:
        shift = " (after reduce_zero_label: stored label minus one)" if reduced else ""
        raise ValueError(
            f"{path}: label {int(wrong.max())}{shift} is outside the {num_classes} classes "
            f"(0-{num_classes - 1}, and {IGNORE} = ignore); fix the mask, or give the class list "
            "in classes.txt / --data.num_classes"
        )


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS
    )


def pair_by_name(images: Sequence[Path], masks: Path, where: str) -> list[tuple[str, str]]:
    """Each image with `masks/<its name>.png`; ValueError naming the first image without one."""
    pairs = []
    for image in images:
        mask = masks / f"{image.stem}.png"
        if not mask.is_file():
            raise ValueError(f"{image} has no mask: expected {mask} ({where})")
        pairs.append((str(image), str(mask)))
    return pairs


def ade20k_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    folder = {"train": "training", "val": "validation"}[split]
    images = root / "images" / folder
    if not images.is_dir():
        raise ValueError(f"ADE20K layout {root}: no {images} folder")
    return pair_by_name(_images_in(images), root / "annotations" / folder, "ADE20K layout")


def voc_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise ValueError(f"Pascal VOC layout {root}: no {listing}")
    names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
    images = []
    for name in filter(None, names):
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{listing}: {name!r} is not an image name")
        found = sorted((root / "JPEGImages").glob(f"{name}.*"))
        if not found:
            raise ValueError(f"{listing} lists {name}, but JPEGImages/ has no {name}.jpg")
        images.append(found[0])
    return pair_by_name(images, root / "SegmentationClass", "Pascal VOC layout")


def plain_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    images = root / split / "images"
    if not images.is_dir():
        raise ValueError(f"pair layout {root}: no {images} folder")
    return pair_by_name(_images_in(images), root / split / "masks", "pair layout")


LAYOUTS = {
    "ade20k": (("images", "annotations"), ade20k_pairs, True),
    "voc": (("JPEGImages", "SegmentationClass"), voc_pairs, False),
    "pairs": (("train/images", "train/masks"), plain_pairs, False),
}  # name: (folders that mark it, its pairs, whether label 0 is ignored by default)


def layout_of(root: Path) -> str:
    for name, (marks, _, _) in LAYOUTS.items():
        if all((root / mark).is_dir() for mark in marks):
            return name
    raise ValueError(f"data source {str(root)!r} is no segmentation layout: {SOURCE_HELP}")


def class_names(root: Path, layout: str, count: int, scan: MaskedFiles | None) -> list[str]:
    """`classes.txt`, else VOC's names, else `class_i` for `count` classes (or as many as the
    training masks `scan` hold, read once)."""
    listed = root / "classes.txt"
    if listed.is_file():
        names = [n.strip() for n in listed.read_text(encoding="utf-8").splitlines() if n.strip()]
        if not names:
            raise ValueError(f"{listed} lists no class")
        if count and count != len(names):
            raise ValueError(f"--data.num_classes {count} but {listed} lists {len(names)} classes")
    elif layout == "voc" and count in (0, len(VOC_CLASSES)):
        names = list(VOC_CLASSES)
    else:
        if not count:
            if scan is None:
                raise ValueError(f"{root}: give the classes in classes.txt or --data.num_classes")
            count = 1 + max_label(scan)
        names = [f"class_{i}" for i in range(count)]
    if len(names) > MAX_SEGMENTATION_CLASSES:
        raise ValueError(
            f"{root}: {len(names)} classes; 8-bit masks hold at most {MAX_SEGMENTATION_CLASSES}"
        )
    return names


def max_label(source: MaskedFiles) -> int:
    """The largest class label in every mask of `source` (one pass, no image decoded)."""
    largest = -1
    for i in range(len(source)):
        labels = source.raw_labels(i)
        if source.reduce_zero_label:
            labels = reduce_zero_label(labels)
        labels = labels[labels != IGNORE]
        if labels.size:
            largest = max(largest, int(labels.max()))
    if largest < 0:
        raise ValueError(f"{source.origin}: no mask labels any pixel with a class")
    return largest


def layout_source(
    root: Path,
    split: str,
    reduce: bool | None,
    num_classes: int = 0,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> MaskedFiles:
    """One split of a layout on disk, labelled by the whole layout's classes (the same in every
    split: read from the training split when no class list names them)."""
    layout = layout_of(root)
    _, pairs_of, zero_ignored = LAYOUTS[layout]
    reduce = zero_ignored if reduce is None else reduce
    origin = f"{root.resolve()} ({layout} layout, {split})"
    source = MaskedFiles(pairs_of(root, split), [], origin, reduce, max_pixels)
    train = source if split == "train" else None
    if not (root / "classes.txt").is_file() and not num_classes and layout != "voc":
        train = train or MaskedFiles(pairs_of(root, "train"), [], origin, reduce, max_pixels)
    source.classes = class_names(root, layout, num_classes, train)
    return source


# -- the built-in scenes -----------------------------------------------------------------------

SCENE_SIZE = 56
SCENE_ITEMS = (2, 4)  # items per scene, inclusive
ITEM_SIDES = (18, 28)  # an item's side on the canvas, inclusive (28 = its own size)
ITEM_THRESHOLD = 24  # an item's pixel brighter than this (of 255) belongs to it
SCENE_SEED = 20231211
SCENE_COUNTS = {
    "demo-scenes": {"train": 2_000, "val": 500},
    "fashion-mnist-scenes": {"train": 10_000, "val": 2_000},
}


def compose_scene(
    items: Sequence[np.ndarray], labels: Sequence[int], rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paste greyscale items [h, w] (uint8) onto a black `size` x `size` canvas at random sides
    and places, later items over earlier ones; each item pixel above ITEM_THRESHOLD takes the
    item's class + 1 in the mask (0 = background). -> (image, mask), both uint8 [size, size]."""
    image = np.zeros((size, size), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for item, label in zip(items, labels):
        side = int(rng.integers(ITEM_SIDES[0], ITEM_SIDES[1] + 1))
        pixels = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR))
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        inside = pixels > ITEM_THRESHOLD
        window = (slice(top, top + side), slice(left, left + side))
        image[window][inside] = pixels[inside]
        mask[window][inside] = label + 1
    return image, mask


class SceneSet(SegmentationSource):
    """Scenes of Fashion-MNIST items (see `compose_scene`), each a pure function of (split,
    index): train scenes take their items from the training images, val scenes from the test
    images, so no item of a val scene was seen in training."""

    native_size = SCENE_SIZE

    def __init__(self, items: ArrayDataset, name: str, split: str) -> None:
        self.items, self.split = items, canonical_split(split)
        self.count = SCENE_COUNTS[name][self.split]
        self.classes = ["background", *FASHION_MNIST_CLASSES]
        self.origin = f"{name}:{items.origin}"

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> SegmentationSample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([SCENE_SEED, self.split == "val", index])
        count = int(rng.integers(SCENE_ITEMS[0], SCENE_ITEMS[1] + 1))
        chosen = rng.choice(len(self.items), size=count, replace=False)
        items = [self.items.images[i] for i in chosen]
        labels = [int(self.items.labels[i]) for i in chosen]
        image, mask = compose_scene(items, labels, rng, SCENE_SIZE)
        return SegmentationSample(
            Image.fromarray(image, "L"), Image.fromarray(mask, "L"), f"scene {index}"
        )


def scene_items(source: str, split: str) -> ArrayDataset:
    if source == "demo-scenes":
        return DemoDataset(split)
    root = source.partition(":")[2] or DEFAULT_FASHION_MNIST_ROOT
    return FashionMNISTDataset(root, split)


def segmentation_source(
    source: str,
    split: str = "train",
    reduce: bool | None = None,
    num_classes: int = 0,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> SegmentationSource:
    """What `--data.source` names, for segmentation (see the module docstring); ValueError, in
    one line, for anything else."""
    split = canonical_split(split)
    name = source.partition(":")[0]
    if source == "demo-scenes" or name == "fashion-mnist-scenes":
        return SceneSet(scene_items(source, split), name, split)
    path = Path(source).expanduser()
    if not source or not path.is_dir():
        raise ValueError(f"segmentation data source {source!r} is not a folder: {SOURCE_HELP}")
    return layout_source(path, split, reduce, num_classes, max_pixels)


# -- views: the image and its mask transformed together ----------------------------------------

RATIO = [3 / 4, 4 / 3]  # the random crop's aspect range (torchvision's default)


class SegmentationView:
    """A sample -> (image [C, S, S] normalised, mask [S, S] int64), image and mask moved
    together. Evaluation (`train=False`): the shorter side resized to S (bicubic for the image,
    nearest for the mask), centre crop S x S: whole-image inference on that view, scored at its
    resolution. Training: a random resized crop of `crop_scale` of the area (aspect 3/4-4/3) to
    S x S and a horizontal flip, drawn from torch's CPU generator (seeded per sample by
    `AugmentedDataset`, so a resumed run draws the same)."""

    def __init__(
        self,
        size: int,
        in_chans: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        train: bool = False,
        crop_scale: tuple[float, float] = (0.5, 1.0),
    ) -> None:
        self.size, self.train, self.crop_scale = size, train, crop_scale
        self.mode = ConvertMode("L" if in_chans == 1 else "RGB")
        self.normalise = T.Normalize(*mean_std(in_chans, mean, std))

    def __call__(self, sample: SegmentationSample) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask, size = self.mode(sample.image), sample.mask, [self.size, self.size]
        if self.train:
            top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.crop_scale), RATIO)
            image = TF.resized_crop(image, top, left, h, w, size, InterpolationMode.BICUBIC)
            mask = TF.resized_crop(mask, top, left, h, w, size, InterpolationMode.NEAREST)
            if torch.rand(()) < 0.5:
                image, mask = TF.hflip(image), TF.hflip(mask)
        else:
            image = TF.center_crop(TF.resize(image, self.size, InterpolationMode.BICUBIC), size)
            mask = TF.center_crop(TF.resize(mask, self.size, InterpolationMode.NEAREST), size)
        pixels = self.normalise(TF.to_tensor(image))
        return pixels, torch.from_numpy(np.array(mask, dtype=np.int64))
