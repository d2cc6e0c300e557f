"""Pictures of a segmentation: each image beside its ground truth and the prediction, with a key.

One colour per class, the same in both maps and in every picture of a run; ignored pixels are
dark grey. The key lists only the classes the shown maps contain, so it stays readable for
ADE20K's 150.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from droppos.visual.jigsaw import font

IGNORED_COLOUR = (64, 64, 64)
FIRST_COLOURS = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip
"""Class 0 black (background in the built-in scenes and in VOC), then Sasha Trubetskoy's 20
distinct colours; more classes take evenly spread hues."""


def class_colours(count: int) -> np.ndarray:
    """[count, 3] uint8: a fixed colour per class index (see FIRST_COLOURS)."""
    colours = list(FIRST_COLOURS[:count])
    for i in range(len(colours), count):
        hue = (i * 0.618033988749895) % 1.0
        colours.append(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.95)))
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def colour_map(labels: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """A label map [H, W] -> an RGB picture [H, W, 3] (ignored pixels dark grey)."""
    picture = colours[np.clip(labels, 0, len(colours) - 1)]
    picture[labels == ignore_index] = IGNORED_COLOUR
    return picture


def draw_segmentation(
    images: np.ndarray,
    truth: np.ndarray,
    predicted: np.ndarray,
    classes: Sequence[str],
    caption: str = "",
    ignore_index: int = 255,
    cell: int = 168,
) -> Image.Image:
    """images [N, H, W, 3] uint8, truth and predicted [N, H, W] class maps -> one picture: a row
    per image (image | ground truth | prediction), titles above, a colour key and `caption`
    below."""
    colours = class_colours(len(classes))
    scale = max(1, cell // max(images.shape[1:3]))
    height, width = images.shape[1] * scale, images.shape[2] * scale
    gap, top, small = 8, 24, font(13)
    shown = sorted(
        int(v) for v in np.union1d(np.unique(truth), np.unique(predicted)) if v < len(classes)
    )
    has_ignored = bool((truth == ignore_index).any())
    key = [(tuple(colours[i]), classes[i]) for i in shown]
    key += [(IGNORED_COLOUR, "ignored")] if has_ignored else []
    columns = 3 * width + 4 * gap
    per_row = max(1, columns // 170)
    key_rows = -(-len(key) // per_row)
    canvas = Image.new(
        "RGB",
        (columns, top + len(images) * (height + gap) + 20 * key_rows + 28),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((gap + c * (width + gap), 4), title, fill=(0, 0, 0), font=font(15))
    for r in range(len(images)):
        y = top + r * (height + gap)
        panels = (
            images[r],
            colour_map(truth[r], colours, ignore_index),
            colour_map(predicted[r], colours, ignore_index),
        )
        for c, panel in enumerate(panels):
            picture = Image.fromarray(panel).resize((width, height), Image.NEAREST)
            canvas.paste(picture, (gap + c * (width + gap), y))
    y = top + len(images) * (height + gap)
    for i, (colour, name) in enumerate(key):
        x = gap + (i % per_row) * 170
        row_y = y + (i // per_row) * 20
        draw.rectangle((x, row_y + 2, x + 12, row_y + 14), fill=colour, outline=(0, 0, 0))
        draw.text((x + 17, row_y), name[:22], fill=(0, 0, 0), font=small)
    draw.text((gap, y + 20 * key_rows + 6), caption, fill=(0, 0, 0), font=small)
    return canvas
