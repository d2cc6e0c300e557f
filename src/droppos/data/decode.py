"""From a file's bytes to pixels: the one home of decoding, for every source and decode path.

`read_image` is the single dispatch over `--data.decode`: a Pillow image (`pil`), a uint8 tensor
decoded by torchvision (`tensor`), or a `LazyImage` whose header is read and whose pixels are
decoded later (`draft`: inside the crop; `device`: on the training device). Every path checks the
size from the header before decoding, raises `BadImageError` naming the file, maps unusual modes
to 8-bit greyscale or RGB (`to_grey_or_rgb` for Pillow, `eight_bit` for tensors), and draws its
crop and flip with `draw_crop_and_flip`, so all four take the same crops for the same seed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal, get_args

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as torchvision_decode_image

from droppos.sections import DEFAULT_MAX_IMAGE_PIXELS

DecodeMode = Literal["pil", "draft", "tensor", "device"]
"""The decode paths (`--data.decode`), the one list of them."""
DECODE_MODES: tuple[str, ...] = get_args(DecodeMode)
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class BadImageError(ValueError):
    """An image file that cannot be used: unreadable, truncated, not an image, or too large."""

    def __init__(self, path: str | os.PathLike[str], reason: str | None = None) -> None:
        # One argument: an already formed message (how DataLoader re-raises a worker's error).
        super().__init__(str(path) if reason is None else f"unreadable image {path}: {reason}")
        self.path, self.reason = ("", str(path)) if reason is None else (str(path), reason)


@contextlib.contextmanager
def _own_size_limit() -> Iterator[None]:
    """Pillow's decompression-bomb limit off: `check_size` applies ours, from the header."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_size(name: str | os.PathLike[str], size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImageError(
            name, f"{width} x {height} pixels is more than --data.max_image_pixels ({max_pixels})"
        )


def describe_decode_error(error: Exception) -> str:
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
        eight_bit_values = img.mode == "I" and values.max(initial=0) <= 255  # 8-bit in int32
        scaled = values if eight_bit_values else values / 257.0
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img.convert("L" if img.mode in _GREY_MODES else "RGB")


def eight_bit(image: torch.Tensor) -> torch.Tensor:
    """A decoded tensor [C, H, W] -> uint8 greyscale or RGB: 16-bit values keep their top
    byte, an alpha channel is dropped (the tensor and device paths' rule)."""
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.shape[0] in (2, 4):  # greyscale or RGB with alpha
        image = image[:-1]
    return image


# The raster formats a training image can be in. Pillow is never left to guess among all its
# plugins: some of them run other programs (EPS and PS start Ghostscript), so a file named .jpg
# that holds PostScript must be unreadable, not interpreted. (Pillow's JPEG reader also opens
# the multi-picture JPEGs some cameras write.)
RASTER_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


def open_raster(stream: BinaryIO | str | os.PathLike[str]) -> Image.Image:
    """`Image.open`, restricted to `RASTER_FORMATS` (anything else: UnidentifiedImageError)."""
    return Image.open(stream, formats=RASTER_FORMATS)


def decode_pil(
    stream: BinaryIO,
    name: str | os.PathLike[str],
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """An open binary stream (a file, or a member of a tar shard) -> a Pillow image, "L" or
    "RGB", decoded fully; greyscale stays grey (a 1-channel model reads it without a round trip
    through three identical channels)."""
    try:
        with _own_size_limit():
            img = open_raster(stream)
            check_size(name, img.size, max_pixels)
            img.load()
    except BadImageError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
        raise BadImageError(name, describe_decode_error(error)) from None
    return to_grey_or_rgb(img)


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """A binary stream of a regular file. Opened without blocking and checked before any read:
    a FIFO or a device named `.png` would otherwise hang the reader forever (OSError)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a socket)")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a regular file (see `open_regular`)."""
    with open_regular(path) as stream:
        return stream.read()


def load_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """`decode_pil` of a file (closed afterwards)."""
    try:
        with open_regular(path) as stream:
            return decode_pil(stream, path, max_pixels)
    except OSError as error:
        raise BadImageError(path, error.strerror or str(error)) from None


def decode_tensor(
    data: bytes, name: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor [C, H, W] in the file's own channels (1 or 3),
    decoded by torchvision (libjpeg-turbo / libpng) without a trip through Pillow's image.
    (torchvision 0.29 announces that TorchCodec will take over its image decoders; this is the
    one place to change when it does.) The size is read from the header first."""
    try:
        with _own_size_limit(), open_raster(io.BytesIO(data)) as header:
            check_size(name, header.size, max_pixels)
            mode = header.mode
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_with_torchvision(encoded, mode)
    except BadImageError:
        raise
    except Exception as error:
        raise BadImageError(name, describe_decode_error(error)) from None


# Modes whose channels are not colours as they stand: CMYK JPEGs would come back as four
# channels (read as RGB + alpha), palette PNGs as their index map. torchvision converts these
# to RGB when asked to.
_NEEDS_RGB = {"CMYK", "YCbCr", "P", "PA", "LAB", "HSV"}


def decode_with_torchvision(encoded: torch.Tensor, mode: str | None) -> torch.Tensor:
    """Encoded bytes [B] (uint8) -> uint8 [C, H, W], greyscale or RGB, for a file whose header
    says `mode` (Pillow's name); raises torchvision's error for a file it cannot decode."""
    read = ImageReadMode.RGB if mode in _NEEDS_RGB else ImageReadMode.UNCHANGED
    return eight_bit(torchvision_decode_image(encoded, mode=read))


class LazyImage:
    """An image file whose header has been read but not its pixels.

    The transform picks the crop first and then decodes (`decode`), a JPEG at a reduced scale
    when the crop allows it (Pillow's draft mode: the DCT skips the detail that the resize would
    throw away); the device path sends its bytes to the GPU. Holds the path, or the bytes of a
    shard member.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | bytes,
        name: str | os.PathLike[str],
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.source, self.name = source, str(name)
        try:
            with _own_size_limit(), self._open() as header:  # the limit is --data's, not Pillow's
                self.size: tuple[int, int] = header.size
                self.mode: str = header.mode
        except Exception as error:
            raise BadImageError(name, describe_decode_error(error)) from None
        check_size(name, self.size, max_pixels)

    def _open(self) -> Image.Image:
        if isinstance(self.source, bytes):
            return open_raster(io.BytesIO(self.source))
        if not stat.S_ISREG(os.stat(self.source).st_mode):  # a FIFO would hang the open
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a socket)")
        return open_raster(self.source)

    def read_bytes(self) -> bytes:
        """The encoded file."""
        if isinstance(self.source, bytes):
            return self.source
        try:
            return read_regular(self.source)
        except OSError as error:
            raise BadImageError(self.name, error.strerror or str(error)) from None

    def decode(self, reduce: int = 1) -> Image.Image:
        """The pixels ("L" or "RGB"); a JPEG at 1/`reduce` scale (2, 4 or 8) when asked."""
        try:
            with _own_size_limit(), self._open() as image:  # the size was checked already
                if reduce > 1 and image.format == "JPEG":
                    width, height = image.size
                    image.draft(image.mode, (-(-width // reduce), -(-height // reduce)))
                image.load()
                return to_grey_or_rgb(image.copy() if image.mode in ("L", "RGB") else image)
        except Exception as error:
            raise BadImageError(self.name, describe_decode_error(error)) from None


DecodedImage = Image.Image | torch.Tensor | LazyImage


def read_image(
    source: str | os.PathLike[str] | bytes,
    name: str | os.PathLike[str],
    max_pixels: int | None,
    decode: str,
) -> DecodedImage:
    """A file (a path, or the bytes of a shard member) as `--data.decode` wants it: a Pillow
    image (pil), a uint8 tensor (tensor, see `decode_tensor`) or a `LazyImage` (draft, device:
    decoded later, in the transform or on the device)."""
    if decode in ("draft", "device"):
        return LazyImage(source, name, max_pixels)
    if decode == "pil":
        if isinstance(source, bytes):
            return decode_pil(io.BytesIO(source), name, max_pixels)
        return load_image(source, max_pixels)
    if decode != "tensor":
        raise ValueError(f"--data.decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if not isinstance(source, bytes):
        try:
            source = read_regular(source)
        except OSError as error:
            raise BadImageError(name, error.strerror or str(error)) from None
    return decode_tensor(source, name, max_pixels)


_GREY_WEIGHTS: dict[torch.device, torch.Tensor] = {}


class ToChannels:
    """Pillow image or uint8 tensor [C, H, W] -> uint8 tensor with `channels` (1 or 3) channels;
    greyscale from RGB with Pillow's "L" weights (ITU-R 601-2)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = T.functional.pil_to_tensor(image)
        if image.shape[0] == self.channels:
            return image
        if self.channels == 3:
            return image.expand(3, -1, -1).contiguous()
        weights = _GREY_WEIGHTS.get(image.device)
        if weights is None:  # once per device: not a copy per image
            weights = _GREY_WEIGHTS[image.device] = torch.tensor(
                [299, 587, 114], dtype=torch.int32
            ).to(image.device)[:, None, None]
        grey = (image.to(torch.int32) * weights).sum(dim=0, keepdim=True) + 500
        return (grey // 1000).to(torch.uint8)

    def __repr__(self) -> str:
        return f"ToChannels({self.channels})"


RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class CropDraw:
    """The augmentation's random choice for one image: a crop box in its pixels, and a flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_crop_and_flip(
    height: int,
    width: int,
    scale: tuple[float, float] | list[float],
    ratio: tuple[float, float] | list[float] = RATIO,
) -> CropDraw:
    """RandomResizedCrop's box and RandomHorizontalFlip's coin, from torch's generator, with
    exactly their calls: every decode path uses this, so the same seed gives the same crops
    whichever path decodes (and whatever it decodes into)."""
    top, left, h, w = T.RandomResizedCrop.get_params(
        torch.empty(1, 1, 1).expand(1, height, width), list(scale), list(ratio)
    )
    return CropDraw(top, left, h, w, bool(torch.rand(1) < 0.5))
