"""Decoding on the training device (`--data.decode device`): the workers only choose the crop.

A worker reads the file's bytes and its header, draws the crop and the flip exactly as every
other path does (`draw_crop_and_flip`, so the same crops), and sends the still encoded bytes with
those numbers. On the device, `decode_batch` decodes the whole batch (on a GPU with nvJPEG
through `torchvision.io.decode_jpeg(device="cuda")`), crops, resizes and flips each image there.
The CPU work per image shrinks to reading a file, so a GPU is fed by far fewer cores. On a CPU
device the same code decodes in the training process.

A file this path cannot decode behaves as on the others: a batch nvJPEG refuses is decoded image
by image; an image nvJPEG cannot take (CMYK, palette, progressive where the hardware decoder
refuses it) or refuses is decoded on the CPU (torchvision, then Pillow); one nothing can decode
is unreadable, and `replace` (the training set's `replacement`) gives the neighbour the Pillow
path would have given, counted the same way.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data._utils.collate import collate, default_collate_fn_map
from torchvision.io import decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

from droppos.data.decode import (
    BadImageError,
    CropDraw,
    LazyImage,
    ToChannels,
    decode_pil,
    decode_with_torchvision,
    draw_crop_and_flip,
)

NVJPEG_MODES = ("RGB", "L")  # what the GPU decoder takes as it is


@dataclass
class EncodedCrop:
    """One sample on its way to the device: encoded bytes [B] (uint8), the crop to take in the
    source's pixels, and what the worker knew of the file (its name, whether it is a JPEG, its
    header's mode, its index in the training set): numbers the training process never has to
    read back from a tensor."""

    data: torch.Tensor
    crop: CropDraw
    name: str = ""
    jpeg: bool = False
    mode: str = "RGB"
    index: int = -1


class ChooseCrop:
    """Worker side of the device path: LazyImage -> EncodedCrop."""

    takes_context = True  # AugmentedDataset passes the sample's SampleContext (its index)

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, image: LazyImage, context: Any = None) -> EncodedCrop:
        width, height = image.size
        crop = draw_crop_and_flip(height, width, self.scale)
        data = image.read_bytes()
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        index = -1 if context is None else context.index
        return EncodedCrop(encoded, crop, image.name, data[:2] == b"\xff\xd8", image.mode, index)


def collate_encoded(batch: list[Any]) -> Any:
    """default_collate, keeping EncodedCrops (of different lengths) as a list."""
    mapping = {**default_collate_fn_map, EncodedCrop: lambda items, **_: list(items)}
    return collate(batch, collate_fn_map=mapping)


Replace = Callable[[EncodedCrop, BadImageError], torch.Tensor]


def decode_batch(
    items: list[EncodedCrop],
    size: tuple[int, int],
    channels: int,
    device: torch.device,
    replace: Replace | None = None,
) -> torch.Tensor:
    """EncodedCrops -> uint8 [N, channels, H, W] on `device`: decoded (batched nvJPEG on a GPU
    for the JPEGs it takes), cropped, resized (bicubic, antialiased) and flipped there. An image
    nothing decodes raises BadImageError, or is `replace`d (a finished crop of a neighbour)."""
    decoded: list[torch.Tensor | None] = [None] * len(items)
    if device.type == "cuda":
        _decode_on_gpu(items, decoded, device)
    to_channels = ToChannels(channels)
    out = []
    for item, image in zip(items, decoded):
        try:
            if image is None:
                image = _decode_on_cpu(item).to(device, non_blocking=True)
        except BadImageError as error:
            if replace is None:
                raise
            out.append(replace(item, error))
            continue
        box = item.crop
        crop = F2.resized_crop(
            to_channels(image), box.top, box.left, box.height, box.width, list(size),
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        out.append(crop.flip(-1) if box.flip else crop)
    return torch.stack(out)


def _decode_on_gpu(
    items: list[EncodedCrop], decoded: list[torch.Tensor | None], device: torch.device
) -> None:
    """nvJPEG for the JPEGs it takes, all in one call; image by image when that call fails.
    What stays None goes to the CPU."""
    picked = [i for i, item in enumerate(items) if item.jpeg and item.mode in NVJPEG_MODES]
    if not picked:
        return
    try:
        batch = decode_jpeg([items[i].data for i in picked], device=device)
    except RuntimeError:  # one file nvJPEG refuses fails the whole batch call: image by image
        batch = None
    if batch is not None:
        for i, image in zip(picked, batch):
            decoded[i] = image
        return
    for i in picked:
        try:
            decoded[i] = decode_jpeg(items[i].data, device=device)
        except RuntimeError:
            decoded[i] = None


def _decode_on_cpu(item: EncodedCrop) -> torch.Tensor:
    """torchvision's decoder (libjpeg-turbo, libpng), then Pillow's; BadImageError if neither."""
    with contextlib.suppress(RuntimeError):  # a format or mode libjpeg/libpng refuse
        return decode_with_torchvision(item.data, item.mode)
    image = decode_pil(io.BytesIO(bytes(item.data.numpy())), item.name, max_pixels=None)
    return F.pil_to_tensor(image)
