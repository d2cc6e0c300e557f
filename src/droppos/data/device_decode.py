"""Decoding on the training device (`--data.decode device`): the workers only choose the crop.

A worker reads the file's bytes and its header, draws the crop and the flip exactly as the
Pillow path does (same calls, same random numbers, so the same crops), and sends the still
encoded bytes with those five numbers. On the device, `decode_batch` decodes the whole batch
(on a GPU with nvJPEG through `torchvision.io.decode_jpeg(device="cuda")`), crops, resizes and
flips each image there. The CPU work per image shrinks to reading a file, so a GPU is fed by
far fewer cores. On a CPU device the same code decodes in the training process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data._utils.collate import collate, default_collate_fn_map
from torchvision import transforms as T
from torchvision.io import decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from droppos.data.datasets import BadImageError, LazyImage
from droppos.data.transforms import ToChannels


@dataclass
class EncodedCrop:
    """One sample on its way to the device: encoded bytes [B] (uint8) and the crop to take,
    `params` = [top, left, height, width, flip] in the source's pixels."""

    data: torch.Tensor
    params: torch.Tensor
    name: str = ""


class ChooseCrop:
    """Worker side of the device path: LazyImage -> EncodedCrop, drawing the crop and the flip
    with RandomResizedCrop's and RandomHorizontalFlip's own calls."""

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.scale, self.ratio = scale, ratio

    def __call__(self, image: LazyImage) -> EncodedCrop:
        width, height = image.size
        top, left, h, w = T.RandomResizedCrop.get_params(
            torch.empty(1, 1, 1).expand(1, height, width), list(self.scale), list(self.ratio)
        )
        flip = int(torch.rand(1) < 0.5)
        source = image.source
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return EncodedCrop(encoded, torch.tensor([top, left, h, w, flip]), image.name)


def collate_encoded(batch: list[Any]) -> Any:
    """default_collate, keeping EncodedCrops (of different lengths) as a list."""
    mapping = {**default_collate_fn_map, EncodedCrop: lambda items, **_: list(items)}
    return collate(batch, collate_fn_map=mapping)


def decode_batch(
    items: list[EncodedCrop], size: tuple[int, int], channels: int, device: torch.device
) -> torch.Tensor:
    """EncodedCrops -> uint8 [N, channels, H, W] on `device`: decoded (batched nvJPEG on a GPU
    for JPEGs), cropped, resized (bicubic, antialiased) and flipped there."""
    jpeg = [item.data[:2].tolist() == [0xFF, 0xD8] for item in items]
    images: list[torch.Tensor | None] = [None] * len(items)
    if device.type == "cuda" and any(jpeg):
        picked = [i for i, is_jpeg in enumerate(jpeg) if is_jpeg]
        decoded = decode_jpeg([items[i].data for i in picked], device=device)
        for i, image in zip(picked, decoded):
            images[i] = image
    to_channels = ToChannels(channels)
    out = []
    for item, image in zip(items, images):
        if image is None:
            try:
                image = decode_image(item.data).to(device, non_blocking=True)
            except RuntimeError as error:
                raise BadImageError(item.name, str(error).splitlines()[0]) from None
        if image.dtype == torch.uint16:
            image = (image.to(torch.int32) >> 8).to(torch.uint8)
        if image.shape[0] in (2, 4):
            image = image[:-1]
        image = to_channels(image)
        top, left, h, w, flip = item.params.tolist()
        crop = F2.resized_crop(
            image, top, left, h, w, list(size),
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)
