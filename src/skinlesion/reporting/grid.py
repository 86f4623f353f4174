"""``skinlesion grid``: a labelled grid of example lesions, one column per class with its full name."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from skinlesion.classes import FULL_NAMES
from skinlesion.data.images import open_rgb
from skinlesion.data.split import class_order
from skinlesion.errors import SkinLesionError

PAD = 8


@dataclass
class Tile:
    dx: str
    image_id: str | None  # None: the class had fewer images than asked for
    box: tuple[int, int, int, int]  # left, top, right, bottom in the grid image


def pick_examples(table: pd.DataFrame, n_per_class: int, seed: int = 0) -> dict[str, list[pd.Series]]:
    """Up to ``n_per_class`` rows per class, from different lesions where possible."""
    rng = np.random.default_rng(seed)
    picked: dict[str, list[pd.Series]] = {}
    for dx in class_order(table["dx"]):
        rows = table[table["dx"] == dx]
        rows = rows.iloc[rng.permutation(len(rows))]
        one_per_lesion = rows.drop_duplicates("lesion_id")
        rest = rows.drop(one_per_lesion.index)
        picked[dx] = [r for _, r in pd.concat([one_per_lesion, rest]).head(n_per_class).iterrows()]
    return picked


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def make_grid(
    table: pd.DataFrame, n_per_class: int = 1, size: int = 256, seed: int = 0, names: dict[str, str] | None = None
) -> tuple[Image.Image, list[Tile]]:
    """The grid image (white background, ``size`` px square tiles, one column per class of the table) and where each
    tile lies; ``names``: the classes' full names (default: HAM10000's)."""
    if n_per_class < 1 or size < 32:
        raise SkinLesionError("--n-per-class must be >= 1 and --size >= 32")
    picked = pick_examples(table, n_per_class, seed)
    font = _font(max(10, size // 14))
    line_h = font.getbbox("Ag")[3] + 4
    chars = max(8, int(size / (font.getlength("x") or 1)))
    classes, names = class_order(table["dx"]), names or FULL_NAMES
    headers = {dx: [f"{dx} (n={int((table['dx'] == dx).sum())})", *textwrap.wrap(names.get(dx, dx), chars)]
               for dx in classes}  # fmt: skip
    header_h = max(len(v) for v in headers.values()) * line_h + PAD
    width = len(classes) * (size + PAD) + PAD
    height = header_h + n_per_class * (size + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    tiles = []
    for col, dx in enumerate(classes):
        left = PAD + col * (size + PAD)
        for k, line in enumerate(headers[dx]):
            draw.text((left, PAD // 2 + k * line_h), line, fill="black", font=font)
        for row in range(n_per_class):
            top = header_h + row * (size + PAD)
            box = (left, top, left + size, top + size)
            if row < len(picked[dx]):
                r = picked[dx][row]
                canvas.paste(ImageOps.fit(open_rgb(r["path"]), (size, size)), box[:2])
                tiles.append(Tile(dx, str(r["image_id"]), box))
            else:
                draw.rectangle(box, outline="grey")
                draw.text((left + PAD, top + size // 2), "no image", fill="grey", font=font)
                tiles.append(Tile(dx, None, box))
    return canvas, tiles
