"""Pictures of the pretext task: the jigsaw the model solves, where it errs, what it weighs.

One picture per image, five panels side by side: the input; the patches the encoder saw (an
orange frame marks those whose position was dropped); the visible patches placed where the model
*predicts* they belong (each cell taken once, most confident first); a per-patch error map
(grid distance between predicted and true cell); and the attentive-reconstruction weights as a
heat map. Each picture carries its own key: a caption (what was drawn, at which epoch, and this
image's accuracy), the error map's colours and the heat map's scale, so it reads without this
docstring. Drawn with Pillow alone and written as PNG. A method that solves a jigsaw says what
it did as a `JigsawView`; this module knows nothing of models.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from droppos.data.catalog import build_source
from droppos.data.decode import BadImageError
from droppos.data.sources import Share, alone
from droppos.data.transforms import eval_transform
from droppos.outputs import write_atomic

PANELS = ("input", "visible", "predicted places", "error (cells)", "attentive weights")
FRAME = np.array([255, 140, 0], dtype=np.uint8)  # dropped position: orange
# hidden: a blue no image holds in grey, and far from the black of a dark background
HIDDEN, KEPT = np.array([120, 160, 215], np.uint8), np.array([170, 170, 170], np.uint8)
NEXT_BEST = np.array([200, 0, 200], np.uint8)  # a patch whose best cell another patch took
STATES = (np.array([30, 30, 30], np.uint8), np.array([255, 220, 60], np.uint8))  # no, yes
OFF_BY = np.array([[40, 170, 60], [240, 200, 40], [220, 40, 40]], np.uint8)  # 0, 1, 2+ cells
ERROR_KEY = (
    (FRAME, "position dropped (frame, panel 2)"),
    (OFF_BY[0], "right cell"),
    (OFF_BY[1], "1 cell off"),
    (OFF_BY[2], "2+ cells off"),
    (KEPT, "position kept"),
    (HIDDEN, "hidden"),
)
PANEL_SIDE = 192  # pixels of each panel: a 28-pixel image is drawn 7 times larger


def assign_cells(logits: torch.Tensor) -> torch.Tensor:
    """logits [V, L] -> a distinct cell [V] per patch: most confident patch first, each taking
    its best free cell. A confident, correct prediction is placed exactly where it belongs."""
    probs = logits.float().softmax(dim=-1)
    cells = torch.full((logits.shape[0],), -1, dtype=torch.long)
    free = torch.ones(logits.shape[1], dtype=torch.bool)
    for patch in probs.max(dim=-1).values.argsort(descending=True).tolist():
        choice = int(probs[patch].masked_fill(~free, -1).argmax())
        cells[patch], free[choice] = choice, False
    return cells


def to_patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, C] -> [L, p, p, C] in row-major grid order."""
    h, w, c = pixels.shape
    grid = pixels.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape(-1, patch, patch, c)


def place_patches(
    patches: np.ndarray, which: np.ndarray, cells: np.ndarray, grid: tuple[int, int], fill=HIDDEN
) -> np.ndarray:
    """Patches `which` [K] of `patches` [L, p, p, C] put at grid `cells` [K]; the rest `fill`."""
    rows, cols = grid
    p, c = patches.shape[1], patches.shape[3]
    canvas = np.empty((rows, cols, p, p, c), dtype=patches.dtype)
    canvas[:] = fill[:c] if c == len(fill) else fill.mean().astype(patches.dtype)
    for patch, cell in zip(which.tolist(), cells.tolist()):
        canvas[cell // cols, cell % cols] = patches[patch]
    return canvas.transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, c)


def heat(values: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] -> RGB [..., 3]: black, red, yellow, white."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.concatenate(
        [np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1
    )
    return (rgb * 255).astype(np.uint8)


def cell_map(colors: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """[L, 3] colours -> an image of the grid with each cell `patch` pixels wide."""
    rows, cols = grid
    return np.kron(colors.reshape(rows, cols, 3), np.ones((patch, patch, 1), np.uint8)).astype(
        np.uint8
    )


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's own scalable font
    except (TypeError, OSError):  # Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def heat_levels(weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights -> heat levels in [0, 1] on a square-root scale of the largest weight, and that
    weight: attentive weights are peaked, and on a linear scale one dominant patch leaves every
    other cell black (a tenth of the largest weight is drawn at level 0.32, not 0.1)."""
    top = float(weights.max()) if weights.size and weights.max() > 0 else 1.0
    return np.sqrt(np.clip(weights / top, 0, 1)), top


def compose(
    panels: list[np.ndarray], titles: tuple[str, ...], caption: str, heat_top: float,
    heat_label: str, key: tuple[tuple[np.ndarray, str], ...] = ERROR_KEY,
    states: tuple[str, str] | None = None,
) -> Image.Image:  # fmt: skip
    """Panels [H, W, 3] side by side, enlarged (nearest) to PANEL_SIDE, with their titles, a
    caption, the key of the colours drawn (`key`: the error map's, those that apply) and the
    heat map's colour scale, or, for a yes/no map, its two `states`' colours."""
    scale = max(1, -(-PANEL_SIDE // panels[0].shape[0]))
    tiles = [Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST)
             for p in panels]  # fmt: skip
    gap, line, small = 8, 20, font(13)
    width = sum(t.width for t in tiles) + gap * (len(tiles) + 1)
    top = line + gap // 2
    height = top + tiles[0].height + gap + 3 * line + gap
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    x = gap
    for tile, name in zip(tiles, titles):
        draw.text((x, 3), name, fill=(0, 0, 0), font=font(15))
        picture.paste(tile, (x, top))
        x += tile.width + gap
    below = top + tiles[0].height + gap
    draw.text((gap, below), caption, fill=(0, 0, 0), font=small)
    x = gap  # the error map's colours, in one row
    for colour, meaning in key:
        y = below + line + 3
        draw.rectangle((x, y, x + 12, y + 12), fill=tuple(int(c) for c in colour),
                       outline=(0, 0, 0))  # fmt: skip
        draw.text((x + 17, y - 1), meaning, fill=(0, 0, 0), font=small)
        x += 17 + int(draw.textlength(meaning, font=small)) + 14
    left = width - gap - tiles[-1].width  # the heat map's scale, under the heat map
    if states is not None:  # a yes/no map: its two colours, not a continuous scale
        y = below + 2 * line + 2
        x = width - gap - sum(31 + int(draw.textlength(m, font=small)) for m in states) + 14
        for colour, meaning in zip(STATES, states):
            draw.rectangle((x, y, x + 12, y + 12), fill=tuple(int(c) for c in colour),
                           outline=(0, 0, 0))  # fmt: skip
            draw.text((x + 17, y - 1), meaning, fill=(0, 0, 0), font=small)
            x += 17 + int(draw.textlength(meaning, font=small)) + 14
        return picture
    bar = heat(np.linspace(0, 1, tiles[-1].width)[None, :].repeat(10, axis=0))
    y = below + 2 * line + 2
    picture.paste(Image.fromarray(bar), (left, y))
    draw.rectangle((left, y, left + tiles[-1].width - 1, y + 9), outline=(0, 0, 0))
    for level, anchor in ((0.0, "left"), (0.5, "middle"), (1.0, "right")):  # sqrt scale ticks
        text = "0" if level == 0 else f"{heat_top * level**2:.3g}"
        width_of = int(draw.textlength(text, font=small))
        x = left + int(level * (tiles[-1].width - 1))
        x -= {"left": 0, "middle": width_of // 2, "right": width_of}[anchor]
        draw.text((x, y + 11), text, fill=(0, 0, 0), font=small)
    label_x = left - int(draw.textlength(heat_label, font=small)) - 8
    draw.text((label_x, y - 2), heat_label, fill=(0, 0, 0), font=small)
    return picture


def rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


@dataclass
class JigsawView:
    """What a position-predicting model did on a batch, for drawing: the grid and patch size,
    the visible patches' true cells `ids_keep` [N, V], which of them lost their position
    `dropped` [N, V], the predicted cell logits [N, V, L], and a per-patch weight [N, L] to
    show as a heat map (the attentive weights)."""

    grid: tuple[int, int]
    patch_size: int
    ids_keep: torch.Tensor
    dropped: torch.Tensor
    logits: torch.Tensor
    attention: torch.Tensor
    titles: tuple[str, ...] = PANELS
    """The five panels' titles (a method names its own visible set and heat map)."""
    heat_label: str = "attentive weight (square-root scale)"
    """What the heat map's values are, written beside its colour scale."""
    heat_states: tuple[str, str] | None = None
    """For a yes/no map (0 or 1 per patch): the two states' names, drawn in two colours with
    their key instead of a heat scale."""


@torch.no_grad()
def draw_jigsaw(
    images: torch.Tensor,
    view: JigsawView,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    caption: str = "",
) -> list[Image.Image]:
    """images [N, C, H, W], normalised with mean/std -> one five-panel picture per image,
    captioned `caption` and this image's accuracy on the patches whose position was dropped."""
    n, grid, p = images.shape[0], view.grid, view.patch_size
    num_patches = grid[0] * grid[1]
    shift = torch.tensor(mean, device=images.device)[:, None, None]
    scale = torch.tensor(std, device=images.device)[:, None, None]
    pixels = ((images * scale + shift).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
    pictures = []
    for i in range(n):
        image = rgb(pixels[i].cpu().numpy())
        patches = to_patches(image, p)
        visible = view.ids_keep[i].cpu().numpy()
        dropped = view.dropped[i].cpu().numpy()
        some_kept = not dropped.all()  # every position dropped (MP3): a frame says nothing
        framed = frame(patches, visible[dropped], FRAME) if some_kept else patches
        seen = place_patches(framed, visible, visible, grid)
        predicted_cells = assign_cells(view.logits[i].cpu()).numpy()
        best = view.logits[i].argmax(dim=-1).cpu().numpy()
        moved = predicted_cells != best  # two patches claimed one cell: the less sure moved on
        solved = place_patches(frame(patches, visible[moved], NEXT_BEST), visible,
                               predicted_cells, grid)  # fmt: skip
        errors = np.tile(HIDDEN, (num_patches, 1))
        errors[visible] = KEPT
        dy = best // grid[1] - visible // grid[1]
        dx = best % grid[1] - visible % grid[1]
        distance = np.sqrt(dy**2 + dx**2)
        errors[visible[dropped]] = OFF_BY[np.minimum(np.ceil(distance[dropped]), 2).astype(int)]
        weights = view.attention[i].float().cpu().numpy()
        levels, top = heat_levels(weights)
        if view.heat_states is not None:
            heat_cells = np.where((weights > 0.5)[:, None], STATES[1], STATES[0])
        else:
            heat_cells = heat(levels)
        panels = [image, seen, solved, cell_map(errors, grid, p), cell_map(heat_cells, grid, p)]
        key = tuple(
            (colour, meaning)
            for colour, meaning in ERROR_KEY
            if (some_kept or (colour is not FRAME and colour is not KEPT))
            and (len(visible) < num_patches or colour is not HIDDEN)
        )
        if moved.any():
            key += ((NEXT_BEST, "best cell taken: placed in the next best (panel 3)"),)
        right = int((distance[dropped] == 0).sum())
        said = f"image {i}: {right} of {int(dropped.sum())} dropped-position patches in their cell"
        line = f"{caption}   {said}" if caption else said
        pictures.append(
            compose(panels, view.titles, line, top, view.heat_label, key, view.heat_states)
        )
    return pictures


def frame(patches: np.ndarray, which: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """A copy of `patches` [L, p, p, C] with a one-pixel `colour` frame around patches `which`."""
    framed = patches.copy()
    for edge in (np.s_[:, 0], np.s_[:, -1], np.s_[:, :, 0], np.s_[:, :, -1]):
        frames = framed[which]
        frames[edge] = colour[: patches.shape[-1]]
        framed[which] = frames
    return framed


def save_pictures(pictures: list[Image.Image], folder: str | Path, stem: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, picture in enumerate(pictures):
        path = folder / f"{stem}-{i:02d}.png"
        write_atomic(path, functools.partial(picture.save, format="PNG"))
        paths.append(path)
    return paths


def picture_batch(
    source: str, img_size: int | tuple[int, int], in_chans: int, count: int,
    mean: tuple[float, ...], std: tuple[float, ...], share: Share = alone,
) -> torch.Tensor:  # fmt: skip
    """`count` images spread over the val split of `source` (else its train split), in the
    deterministic evaluation view: [count, C, H, W]. An unreadable pick gives way to its next
    readable neighbour (a picture is no reason to stop a run)."""
    try:
        dataset = build_source(source, "val", share=share)
    except ValueError:
        dataset = build_source(source, "train", share=share)
    transform = eval_transform(img_size, in_chans, mean, std)
    size = len(dataset)  # type: ignore[arg-type]
    picks = sorted({round(i * size / count) for i in range(count)} - {size})
    found = (_readable_from(dataset, i, size) for i in picks)
    images = [image for image in found if image is not None]
    if not images:
        raise BadImageError(f"no readable image among the first picks of {source}")
    return torch.stack([transform(image) for image in images])


def _readable_from(dataset: Any, start: int, size: int) -> Any:
    for index in range(start, min(size, start + 16)):
        try:
            return dataset[index][0]
        except BadImageError:
            continue
    return None
