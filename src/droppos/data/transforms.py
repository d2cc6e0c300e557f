"""Image transforms (docs/method.md) and per-sample seeded augmentation.

Default normalisation: ImageNet's mean/std for 3 channels (what the released checkpoints were
trained with); (0.5,)/(0.5,) for 1 channel, i.e. [0, 1] -> [-1, 1], which fits any greyscale
data without pretending to know its statistics (Fashion-MNIST's own, FASHION_MNIST_MEAN/STD,
are here for who wants them).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as auto_augment_ops
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from droppos.data.datasets import DatasetWrapper, LazyImage

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "GREY_MEAN",
    "GREY_STD",
    "AugmentedDataset",
    "ConvertMode",
    "default_mean_std",
    "eval_transform",
    "finetune_transform",
    "pretrain_transform",
    "sample_seed",
    "seeded_cpu_rngs",
]

GREY_MEAN, GREY_STD = (0.5,), (0.5,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.286,), (0.353,)

Size = int | tuple[int, int]


def default_mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's statistics for RGB, (0.5,)/(0.5,) for greyscale (see the module docstring)."""
    if in_chans == 3:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if in_chans == 1:
        return GREY_MEAN, GREY_STD
    raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")


class ConvertMode:
    """PIL mode conversion ("L" or "RGB") as a picklable callable, for data-loader workers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def _prologue_epilogue(
    in_chans: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[ConvertMode, list[Callable[..., Any]]]:
    default_mean, default_std = default_mean_std(in_chans)
    mean = tuple(default_mean if mean is None else mean)
    std = tuple(default_std if std is None else std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(
            f"mean and std need {in_chans} value(s) for in_chans={in_chans}, "
            f"got mean={mean}, std={std}"
        )
    return ConvertMode("L" if in_chans == 1 else "RGB"), [T.ToTensor(), T.Normalize(mean, std)]


def _hw(img_size: Size) -> tuple[int, int]:
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    return int(h), int(w)


class ToChannels:
    """PIL image or uint8 tensor [C, H, W] -> uint8 tensor with `channels` (1 or 3) channels;
    greyscale from RGB with Pillow's "L" weights (ITU-R 601-2)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = T.functional.pil_to_tensor(image)
        if image.shape[0] == self.channels:
            return image
        if self.channels == 3:
            return image.expand(3, -1, -1).contiguous()
        weights = torch.tensor([299, 587, 114], dtype=torch.int32, device=image.device)[
            :, None, None
        ]
        grey = (image.to(torch.int32) * weights).sum(dim=0, keepdim=True) + 500
        return (grey // 1000).to(torch.uint8)

    def __repr__(self) -> str:
        return f"ToChannels({self.channels})"


class TensorCropFlip:
    """RandomResizedCrop (bicubic, antialiased) and a horizontal flip on uint8 tensors, drawing
    the crop and the flip with the very calls of the Pillow path's RandomResizedCrop and
    RandomHorizontalFlip: for the same seed, the same crops. Resampling is
    `transforms.v2.functional.resized_crop`; the output stays uint8 [C, H, W]."""

    def __init__(
        self, size: tuple[int, int], channels: int, scale: tuple[float, float] = (0.2, 1.0)
    ) -> None:
        self.size, self.scale, self.ratio = list(size), list(scale), [3 / 4, 4 / 3]
        self.to_channels = ToChannels(channels)

    def __call__(self, image: Any) -> torch.Tensor:
        image = self.to_channels(image)
        top, left, h, w = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        crop = F2.resized_crop(
            image, top, left, h, w, self.size,
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        return crop.flip(-1) if torch.rand(1) < 0.5 else crop

    def __repr__(self) -> str:
        return f"TensorCropFlip(size={self.size}, scale={self.scale}, {self.to_channels})"


class DraftRandomResizedCrop(T.RandomResizedCrop):
    """RandomResizedCrop that chooses the crop before decoding.

    Given a `LazyImage`, it draws the crop exactly as RandomResizedCrop does (same calls, same
    random numbers), then decodes a JPEG at the smallest scale (1/2, 1/4, 1/8) that still leaves
    the crop at least the output size, so the shortcut never upsamples; without a reduction the
    result is bit-identical to RandomResizedCrop's. PIL images pass through RandomResizedCrop.
    """

    def __init__(self, size: Size, mode: str, **kwargs: Any) -> None:
        super().__init__(size, **kwargs)
        self.mode = mode

    def forward(self, img: Any) -> Image.Image:
        if not isinstance(img, LazyImage):
            return super().forward(img.convert(self.mode) if img.mode != self.mode else img)
        width, height = img.size
        top, left, h, w = self.get_params(
            torch.empty(1, 1, 1).expand(1, height, width), self.scale, self.ratio
        )
        out_h, out_w = self.size
        reduce = next((r for r in (8, 4, 2) if w / r >= out_w and h / r >= out_h), 1)
        image = img.decode(reduce)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if reduce == 1:
            return T.functional.resized_crop(
                image, top, left, h, w, self.size, self.interpolation, antialias=self.antialias
            )
        sx, sy = image.width / width, image.height / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return image.resize((out_w, out_h), Image.BICUBIC, box=box)


def normalise_on_device(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 batches [N, C, H, W] (the tensor path's output) -> normalised float, computed where
    the batch already is (the GPU): 4x fewer bytes cross the bus. Float batches pass through."""
    if images.dtype != torch.uint8:
        return images
    shift = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    scale = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return images.float().div_(255).sub_(shift).div_(scale)


def pretrain_transform(
    img_size: Size = 224,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    decode: str = "pil",
) -> Callable[[Any], torch.Tensor]:
    """DropPos / MAE pre-training augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + flip.

    PIL image (any size, "L" or "RGB") -> float tensor [in_chans, H, W], normalised.
    `crop_scale` is the paper's (0.2, 1) unless a preset says otherwise. `decode` follows
    `--data.decode`: "draft" takes `LazyImage`s and decodes inside the crop
    (`DraftRandomResizedCrop`); "tensor" runs the same augmentation on uint8 tensors
    (torchvision.transforms.v2; input a PIL image or a decoded uint8 tensor) and stops before
    normalisation, which `normalise_on_device` does.
    """
    if decode == "device":  # the workers only choose the crop; see droppos.data.device_decode
        from droppos.data.device_decode import ChooseCrop

        _prologue_epilogue(in_chans, mean, std)
        return ChooseCrop(crop_scale)
    if decode == "tensor":
        _prologue_epilogue(in_chans, mean, std)  # the same checks of mean and std
        return TensorCropFlip(_hw(img_size), in_chans, crop_scale)
    convert, to_tensor = _prologue_epilogue(in_chans, mean, std)
    if decode == "draft":  # decode inside the crop: JPEGs at a reduced scale when it allows
        crop = DraftRandomResizedCrop(
            _hw(img_size), convert.mode, scale=crop_scale, interpolation=InterpolationMode.BICUBIC
        )
        return T.Compose([crop, T.RandomHorizontalFlip(), *to_tensor])
    return T.Compose(
        [
            convert,
            T.RandomResizedCrop(
                _hw(img_size), scale=crop_scale, interpolation=InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
            *to_tensor,
        ]
    )


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
    convert, to_tensor = _prologue_epilogue(in_chans, mean, std)
    h, w = _hw(img_size)
    resize = math.floor(max(h, w) / crop_pct + 1e-6)  # 1e-6: 224 / 0.875 must be 256, not 255
    return T.Compose(
        [
            convert,
            T.Resize(resize, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop((h, w)),
            *to_tensor,
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
    convert, to_tensor = _prologue_epilogue(in_chans, mean, std)
    hw = _hw(img_size)
    steps: list[Callable[..., Any]] = [
        convert,
        T.RandomResizedCrop(hw, scale=crop_scale, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if auto_augment:
        mean_used = to_tensor[1].mean
        fill = tuple(min(255, round(255 * m)) for m in mean_used)
        hparams = {
            "translate_const": int(min(hw) * 0.45),
            "img_mean": fill if in_chans == 3 else fill[0],
            "interpolation": Image.BICUBIC,
        }
        steps.append(_pillow_safe(rand_augment_transform(auto_augment, hparams)))
    steps += to_tensor
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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch, index): nearby triples share no streams."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, index])
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded_cpu_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and numpy's global RNG; restore them afterwards.

    Only the CPU generator: torch.manual_seed would also reseed CUDA, which would clobber the
    training process's mask noise when the loader runs in the main process (num_workers=0).
    Python's and numpy's RNGs are covered because timm's RandAugment draws from them.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class AugmentedDataset(DatasetWrapper):
    """Applies ``transform`` with randomness that is a pure function of (seed, epoch, index).

    So a sample's augmentation does not depend on the number of workers, of DDP ranks, or on
    whether the run was interrupted and resumed. Returns ``(tensor image, label)``.

    The epoch lives in a shared-memory tensor: ``persistent_workers`` keep their own copy of the
    dataset, and a plain attribute set in the main process would never reach them. Call
    ``set_epoch`` before iterating the loader (``droppos.data.set_epoch`` does both hooks).
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[Any], Any],
        seed: int = 0,
        torch_rng_only: bool = False,
    ) -> None:
        super().__init__(dataset)
        self.transform = transform
        self.seed = seed
        # A transform that draws only from torch (transforms.v2) skips seeding Python's and
        # NumPy's generators: a tenth of a millisecond per image.
        self.torch_rng_only = torch_rng_only
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.dataset[index]
        seed = sample_seed(self.seed, self.epoch, index)
        if self.torch_rng_only:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                return self.transform(img), label
        with seeded_cpu_rngs(seed):
            return self.transform(img), label
