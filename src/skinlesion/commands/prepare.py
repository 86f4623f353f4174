"""`skinlesion prepare`: decode-check every image, print a summary per source, build the image cache."""

from __future__ import annotations

import argparse
from typing import Any

import pandas as pd

from skinlesion.data.cache import ImageCache
from skinlesion.data.datasets import DataSpec, load_dataset, summary_lines
from skinlesion.data.ham10000 import LIST_MAX
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.split import class_order


def class_table(table: pd.DataFrame) -> pd.DataFrame:
    """Images, lesions and image share per class, plus a total row."""
    by = table.groupby("dx")
    out = pd.DataFrame({"images": by.size(), "lesions": by["lesion_id"].nunique()}).reindex(class_order(table["dx"]))
    out = out.fillna(0).astype(int).rename_axis(None)
    out["share"] = (out["images"] / out["images"].sum() * 100).map(lambda s: f"{s:.1f}%")
    out.loc["total"] = [len(table), table["lesion_id"].nunique(), "100.0%"]
    return out


def images_per_lesion(table: pd.DataFrame) -> str:
    counts = table.groupby("lesion_id").size().value_counts().sort_index()
    return ", ".join(f"{k}: {n}" for k, n in counts.items())


def _listing(items: Any) -> str:
    items = [str(i) for i in items]
    if not items:
        return "none"
    more = f" ... and {len(items) - LIST_MAX} more" if len(items) > LIST_MAX else ""
    return f"{len(items)} ({', '.join(items[:LIST_MAX])}{more})"


def source_lines(a: dict[str, Any]) -> list[str]:
    """What one source folder held and what was dropped from it."""
    dropped = list(a.get("dropped") or ())
    missing = [d["image_id"] for d in dropped if d["reason"] == "missing"]
    corrupt = [f"{d['image_id']}: {d['reason']}" for d in dropped if d["reason"] != "missing"]
    layout = f" (layout: {a['layout']})" if a.get("layout") else ""
    return [
        f"{a.get('source')}: {a.get('data_dir')}{layout}",
        f"  labels:    {a.get('labels_file')} ({a.get('label_set')} labels)",
        f"  images in: {', '.join(map(str, a.get('image_dirs', [])))}",
        f"  missing files (dropped): {_listing(missing)}",
        f"  corrupt files (dropped): {_listing(corrupt)}",
        f"  repeated rows (first kept): {_listing(a.get('duplicate_rows', ()))}",
        f"  image files without a row (ignored): {_listing(a.get('extra_files', ()))}",
        f"  ages outside 0-120 or not numbers (unknown): {a.get('age_invalid', 0)}",
    ]


def summary(table: pd.DataFrame) -> str:
    lines = [line for a in table.attrs.get("sources", []) for line in source_lines(a)]
    lines += ["", class_table(table).to_string(), ""]
    lines += [f"images per lesion (images: lesions): {images_per_lesion(table)}",
              f"age missing: {int(table['age'].isna().sum())}; sex: "
              + ", ".join(f"{k} {v}" for k, v in table["sex"].value_counts().items())]  # fmt: skip
    return "\n".join([*lines, *summary_lines(table)])


def main(args: argparse.Namespace) -> None:
    table = load_dataset(DataSpec.of(args), check="full", progress=True)
    print(summary(table))
    if args.cache:
        # The pixels of a run at --img-size (mean / std act after the cache, so any backbone's run reads it).
        preprocessing = Preprocessing.for_training(args.img_size, color_constancy=args.color_constancy)
        cache = ImageCache.open_or_build(table, preprocessing, cache_dir=args.cache_dir, progress=True)
        print(f"image cache: {cache.folder} ({len(cache)} images, short side {preprocessing.resize_size}px for "
              f"{args.img_size}px runs, {cache.nbytes / 2**20:.0f} MiB)")  # fmt: skip
    else:
        print("image cache: skipped (--no-cache)")
