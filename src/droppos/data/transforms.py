"""Image transforms (docs/method.md): pre-training, evaluation and fine-tuning views.

Every random crop and flip is drawn by `data/decode.py:draw_crop_and_flip`, so the Pillow,
draft, tensor and device paths take the same crops for the same seed. Default normalisation:
ImageNet's mean/std for 3 channels (what the released checkpoints were trained with);
(0.5,)/(0.5,) for 1 channel, i.e. [0, 1] -> [-1, 1], which fits any greyscale data without
pretending to know its statistics (Fashion-MNIST's own, FASHION_MNIST_MEAN/STD, are here for
who wants them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as auto_augment_ops
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from droppos.data.decode import LazyImage, ToChannels, draw_crop_and_flip

GREY_MEAN, GREY_STD = (0.5,), (0.5,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.286,), (0.353,)
PRETRAIN_CROP_SCALE = (0.2, 1.0)  # the paper's; the demo preset uses (0.5, 1.0)

Size = int | tuple[int, int]


def default_mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's statistics for RGB, (0.5,)/(0.5,) for greyscale (see the module docstring)."""
    if in_chans == 3:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if in_chans == 1:
        return GREY_MEAN, GREY_STD
    raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")


def mean_std(
    in_chans: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The given normalisation, else the default for `in_chans`; one value per channel."""
    default_mean, default_std = default_mean_std(in_chans)
    mean = tuple(default_mean if mean is None else mean)
    std = tuple(default_std if std is None else std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(
            f"mean and std need {in_chans} value(s) for in_chans={in_chans}, "
            f"got mean={mean}, std={std}"
        )
    return mean, std


class ConvertMode:
    """PIL mode conversion ("L" or "RGB") as a picklable callable, for data-loader workers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def _mode(in_chans: int) -> ConvertMode:
    return ConvertMode("L" if in_chans == 1 else "RGB")


def _to_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable[..., Any]]:
    return [T.ToTensor(), T.Normalize(mean, std)]


def _hw(img_size: Size) -> tuple[int, int]:
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    return int(h), int(w)


class CropFlip:
    """RandomResizedCrop (bicubic, antialiased) then a horizontal flip, on Pillow images."""

    def __init__(self, size: tuple[int, int], scale: tuple[float, float]) -> None:
        self.size, self.scale = list(size), scale

    def __call__(self, image: Image.Image) -> Image.Image:
        crop = draw_crop_and_flip(image.height, image.width, self.scale)
        image = T.functional.resized_crop(
            image, crop.top, crop.left, crop.height, crop.width, self.size,
            InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        return T.functional.hflip(image) if crop.flip else image

    def __repr__(self) -> str:
        return f"CropFlip(size={self.size}, scale={self.scale})"


class TensorCropFlip:
    """`CropFlip` on uint8 tensors [C, H, W] (`transforms.v2.functional.resized_crop`); the
    output stays uint8, normalised later on the device."""

    def __init__(
        self, size: tuple[int, int], channels: int, scale: tuple[float, float] = (0.2, 1.0)
    ) -> None:
        self.size, self.scale = list(size), scale
        self.to_channels = ToChannels(channels)

    def __call__(self, image: Any) -> torch.Tensor:
        image = self.to_channels(image)
        crop = draw_crop_and_flip(image.shape[-2], image.shape[-1], self.scale)
        out = F2.resized_crop(
            image, crop.top, crop.left, crop.height, crop.width, self.size,
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        return out.flip(-1) if crop.flip else out

    def __repr__(self) -> str:
        return f"TensorCropFlip(size={self.size}, scale={self.scale}, {self.to_channels})"


class DraftCropFlip:
    """`CropFlip` that chooses the crop before decoding.

    Given a `LazyImage`, it draws the crop, then decodes a JPEG at the smallest scale (1/2, 1/4,
    1/8) that still leaves the crop at least the output size, so the shortcut never upsamples;
    without a reduction the result is bit-identical to `CropFlip`'s. Pillow images pass through
    `CropFlip`.
    """

    def __init__(self, size: tuple[int, int], mode: str, scale: tuple[float, float]) -> None:
        self.crop_flip = CropFlip(size, scale)
        self.size, self.mode = size, mode

    def __call__(self, img: Any) -> Image.Image:
        if not isinstance(img, LazyImage):
            return self.crop_flip(img.convert(self.mode) if img.mode != self.mode else img)
        width, height = img.size
        crop = draw_crop_and_flip(height, width, self.crop_flip.scale)
        out_h, out_w = self.size
        reduce = next(
            (r for r in (8, 4, 2) if crop.width / r >= out_w and crop.height / r >= out_h), 1
        )
        image = img.decode(reduce)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if reduce == 1:
            image = T.functional.resized_crop(
                image, crop.top, crop.left, crop.height, crop.width, list(self.size),
                InterpolationMode.BICUBIC, antialias=True,
            )  # fmt: skip
        else:
            sx, sy = image.width / width, image.height / height
            box = (
                crop.left * sx,
                crop.top * sy,
                (crop.left + crop.width) * sx,
                (crop.top + crop.height) * sy,
            )
            image = image.resize((out_w, out_h), Image.BICUBIC, box=box)
        return T.functional.hflip(image) if crop.flip else image


class DeviceNormaliser:
    """uint8 batches [N, C, H, W] (the tensor and device paths' output) -> normalised float,
    computed where the batch already is (the GPU): 4x fewer bytes cross the bus. Float batches
    pass through. Mean and std are put on the device once, here, not at every batch (building
    them there from Python numbers is a copy that waits for the device's queue)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        self.scale = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        return images.float().div_(255).sub_(self.shift).div_(self.scale)


def pretrain_transform(
    img_size: Size = 224,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_scale: tuple[float, float] = PRETRAIN_CROP_SCALE,
    decode: str = "pil",
    normalised: bool = True,
) -> Callable[[Any], Any]:
    """DropPos / MAE pre-training augmentation: RandomResizedCrop (bicubic) + flip.

    An image of any size ("L" or "RGB") -> a float tensor [in_chans, H, W], normalised, or, as
    `decode` (`--data.decode`) asks: "draft" takes `LazyImage`s and decodes inside the crop;
    "tensor" crops uint8 tensors and stops before normalisation, which `DeviceNormaliser`
    does; "device" only chooses the crop (`data/device_decode.py`). `normalised=False` stops
    the pil and draft paths at uint8 too: pre-training normalises every batch where it trains,
    with the same arithmetic (so the same floats), a quarter of the bytes through the loader's
    shared memory and a third less of each worker's time per image.
    """
    mean, std = mean_std(in_chans, mean, std)  # checked on every path
    if decode == "device":
        from droppos.data.device_decode import ChooseCrop

        return ChooseCrop(crop_scale)
    if decode == "tensor":
        return TensorCropFlip(_hw(img_size), in_chans, crop_scale)
    convert = _mode(in_chans)
    finish = _to_tensor(mean, std) if normalised else [T.PILToTensor()]
    if decode == "draft":
        crop: Callable[[Any], Any] = DraftCropFlip(_hw(img_size), convert.mode, crop_scale)
        return T.Compose([crop, *finish])
    return T.Compose([convert, CropFlip(_hw(img_size), crop_scale), *finish])


def eval_transform(
    img_size: Size = 224,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = 224 / 256,
) -> T.Compose:
    """Deterministic evaluation view: resize the shorter side to size / crop_pct, centre crop.

    The standard 256 -> 224 protocol of the fine-tuning recipe (docs/method.md). For a non-square
    ``img_size`` (h, w) the shorter side goes to max(h, w) / crop_pct, so the crop always fits.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    mean, std = mean_std(in_chans, mean, std)
    h, w = _hw(img_size)
    resize = math.floor(max(h, w) / crop_pct + 1e-6)  # 1e-6: 224 / 0.875 must be 256, not 255
    return T.Compose(
        [
            _mode(in_chans),
            T.Resize(resize, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop((h, w)),
            *_to_tensor(mean, std),
        ]
    )


def finetune_transform(
    img_size: Size = 224,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
) -> T.Compose:
    """The MAE fine-tuning augmentation (docs/method.md), from timm's parts, for RGB and greyscale.

    RandomResizedCrop (bicubic) + flip + RandAugment on the PIL image, then normalise and
    random-erase (pixel mode) the tensor: what timm's `create_transform` builds, except that
    it works on 1-channel images too (RandAugment's fill colour follows the channel count).
    """
    mean, std = mean_std(in_chans, mean, std)
    hw = _hw(img_size)
    steps: list[Callable[..., Any]] = [_mode(in_chans), CropFlip(hw, crop_scale)]
    if auto_augment:
        fill = tuple(min(255, round(255 * m)) for m in mean)
        hparams = {
            "translate_const": int(min(hw) * 0.45),
            "img_mean": fill if in_chans == 3 else fill[0],
            "interpolation": Image.BICUBIC,
        }
        steps.append(_pillow_safe(rand_augment_transform(auto_augment, hparams)))
    steps += _to_tensor(mean, std)
    if reprob > 0:
        steps.append(RandomErasing(reprob, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(steps)


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, but 0 bits gives the black image older Pillow gave (Pillow >= 11
    raises instead, which would crash about one training image in a thousand)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe(augment: RandAugment) -> RandAugment:
    for op in augment.ops:
        if op.aug_fn is auto_augment_ops.posterize:
            op.aug_fn = _posterize
    return augment
