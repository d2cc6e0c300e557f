"""Decoding on the training device (`--data.decode device`): the workers only choose the crop.

A worker reads the file's bytes and its header, draws the crop and the flip exactly as every
other path does (`draw_crop_and_flip`, so the same crops), and sends the still encoded bytes with
those five numbers. On the device, `decode_batch` decodes the whole batch (on a GPU with nvJPEG
through `torchvision.io.decode_jpeg(device="cuda")`), crops, resizes and flips each image there.
The CPU work per image shrinks to reading a file, so a GPU is fed by far fewer cores. On a CPU
device the same code decodes in the training process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data._utils.collate import collate, default_collate_fn_map
from torchvision.io import decode_image as torchvision_decode_image
from torchvision.io import decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from droppos.data.decode import BadImageError, LazyImage, ToChannels, draw_crop_and_flip, eight_bit


@dataclass
class EncodedCrop:
    """One sample on its way to the device: encoded bytes [B] (uint8) and the crop to take,
    `params` = [top, left, height, width, flip] in the source's pixels."""

    data: torch.Tensor
    params: torch.Tensor
    name: str = ""


class ChooseCrop:
    """Worker side of the device path: LazyImage -> EncodedCrop."""

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, image: LazyImage) -> EncodedCrop:
        width, height = image.size
        crop = draw_crop_and_flip(height, width, self.scale)
        encoded = torch.frombuffer(bytearray(image.read_bytes()), dtype=torch.uint8)
        params = torch.tensor([crop.top, crop.left, crop.height, crop.width, int(crop.flip)])
        return EncodedCrop(encoded, params, image.name)


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
                image = torchvision_decode_image(item.data).to(device, non_blocking=True)
            except RuntimeError as error:
                raise BadImageError(item.name, str(error).splitlines()[0]) from None
        image = to_channels(eight_bit(image))
        top, left, h, w, flip = item.params.tolist()
        crop = F2.resized_crop(
            image, top, left, h, w, list(size),
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)
