"""`skinlesion prepare`: decode-check every image, print a summary, build the image cache."""

from __future__ import annotations

import argparse

import pandas as pd

from skinlesion import rules
from skinlesion.classes import CLASSES
from skinlesion.data.cache import ImageCache
from skinlesion.data.ham10000 import LIST_MAX, load_table
from skinlesion.data.preprocessing import Preprocessing


def class_table(table: pd.DataFrame) -> pd.DataFrame:
    """Images, lesions and image share per class, plus a total row."""
    by = table.groupby("dx")
    out = pd.DataFrame({"images": by.size(), "lesions": by["lesion_id"].nunique()}).reindex(list(CLASSES))
    out = out.fillna(0).astype(int).rename_axis(None)
    out["share"] = (out["images"] / out["images"].sum() * 100).map(lambda s: f"{s:.1f}%")
    out.loc["total"] = [len(table), table["lesion_id"].nunique(), "100.0%"]
    return out


def images_per_lesion(table: pd.DataFrame) -> str:
    counts = table.groupby("lesion_id").size().value_counts().sort_index()
    return ", ".join(f"{k}: {n}" for k, n in counts.items())


def _listing(items: list[str]) -> str:
    if not items:
        return "none"
    more = f" ... and {len(items) - LIST_MAX} more" if len(items) > LIST_MAX else ""
    return f"{len(items)} ({', '.join(items[:LIST_MAX])}{more})"


def summary(table: pd.DataFrame) -> str:
    a = table.attrs
    dropped = a.get("dropped", [])
    missing = [d["image_id"] for d in dropped if d["reason"] == "missing"]
    corrupt = [f"{d['image_id']}: {d['reason']}" for d in dropped if d["reason"] != "missing"]
    sexes = table["sex"].value_counts()
    # -5, 1e309, -inf: not ages (rules.clean_ages); counted by the loader where it cleans them, else here.
    refused = a.get("ages_refused", rules.clean_ages(table["age"])[1])
    lines = [
        f"data:      {a.get('data_dir')} (layout: {a.get('layout')})",
        f"metadata:  {a.get('metadata')}",
        f"images in: {', '.join(a.get('image_dirs', []))}",
        "",
        class_table(table).to_string(),
        "",
        f"images per lesion (images: lesions): {images_per_lesion(table)}",
        f"age missing: {int(table['age'].isna().sum())}; not an age (outside 0-120, taken as unknown): "
        f"{refused}; sex: " + ", ".join(f"{k} {v}" for k, v in sexes.items()),
        f"missing files (dropped): {_listing(missing)}",
        f"corrupt files (dropped): {_listing(corrupt)}",
        f"duplicate rows in metadata (first kept): {_listing(a.get('duplicate_rows', []))}",
        f"duplicate image files (first kept): {_listing(a.get('duplicate_files', []))}",
        f"image files without a metadata row (ignored): {_listing(a.get('extra_files', []))}",
        "rows with unknown dx: 0",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    table = load_table(
        args.data_dir, args.metadata, args.images, allow_missing=args.allow_missing, check="full", progress=True
    )
    print(summary(table))
    if args.cache:
        # The pixels of a run at --img-size (mean / std act after the cache, so any backbone's run reads it).
        preprocessing = Preprocessing.for_training(args.img_size, color_constancy=args.color_constancy)
        cache = ImageCache.open_or_build(table, preprocessing, cache_dir=args.cache_dir, progress=True)
        print(f"image cache: {cache.folder} ({len(cache)} images, short side {preprocessing.resize_size}px for "
              f"{args.img_size}px runs, {cache.nbytes / 2**20:.0f} MiB)")  # fmt: skip
    else:
        print("image cache: skipped (--no-cache)")
