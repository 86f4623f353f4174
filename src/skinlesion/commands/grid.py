"""``skinlesion grid``: a labelled grid of example lesions per class."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from skinlesion import fileio
from skinlesion.data.datasets import DataSpec, load_dataset
from skinlesion.reporting.grid import make_grid


def main(args: argparse.Namespace) -> None:
    table = load_dataset(DataSpec.of(args))
    image, tiles = make_grid(table, args.n_per_class, args.size, args.seed)
    out = Path(args.out)
    png = io.BytesIO()
    image.save(png, format="PNG")  # in memory first: a full disk's message then says how much it needs
    fileio.write_bytes(out, png.getvalue())
    shown = sum(t.image_id is not None for t in tiles)
    print(f"wrote {out} ({image.width}x{image.height}, {shown} images, {table['dx'].nunique()} classes)")
