"""Build the bundled sample (src/skinlesion/data/sample/) from the downsized real HAM10000 images.

Class-balanced: up to 100 images per class, whole lesions only (a lesion's images all go in or
none do), seeded. JPEGs are copied byte for byte. Run once; the result is committed:

    .venv/bin/python scripts/make_sample.py --source ../shared/data/ham10000_200x150
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.classes import CLASSES
from skinlesion.data.ham10000 import load_table, sample_dir
from skinlesion.fileio import write_csv, write_text

NOTICE = """# Bundled HAM10000 sample

{n_images} dermatoscopic images ({n_lesions} lesions; up to {per_class} images per class, whole lesions
only) and their metadata rows, taken from the HAM10000 dataset and downsized to 200x150 pixels.
Built by `scripts/make_sample.py --seed {seed}`.

Source: Tschandl P., Rosendahl C., Kittler H. "The HAM10000 dataset, a large collection of
multi-source dermatoscopic images of common pigmented skin lesions." Sci. Data 5, 180161 (2018),
doi:10.1038/sdata.2018.161; Harvard Dataverse doi:10.7910/DVN/DBW86T.

Licence: Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International (CC BY-NC-SA 4.0),
https://creativecommons.org/licenses/by-nc-sa/4.0/ - attribution, non-commercial use only, and
derivatives under the same licence. This licence covers these images and metadata only; the
skinlesion code has its own licence. Changes made: images downsized, subset selected.

Images per class: {counts}.
"""


def pick(meta: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Whole lesions per class in a seeded random order, as long as they fit under ``per_class``."""
    rng = np.random.default_rng(seed)
    keep: list[str] = []
    for dx in CLASSES:
        lesions = meta[meta["dx"] == dx].groupby("lesion_id")["image_id"].apply(sorted).sort_index()
        n = 0
        for lesion in rng.permutation(lesions.index.to_numpy()):
            if n + len(lesions[lesion]) <= per_class:
                keep += lesions[lesion]
                n += len(lesions[lesion])
    return meta[meta["image_id"].isin(keep)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/ham10000_200x150"))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    table = load_table(args.source)
    chosen = pick(table, args.per_class, args.seed)
    out = sample_dir()
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    (out / "images").mkdir(parents=True)
    for path in chosen["path"]:
        shutil.copy2(path, out / "images" / Path(path).name)
    raw = pd.read_csv(table.attrs["metadata"], dtype=str, keep_default_na=False)
    write_csv(out / "HAM10000_metadata.csv", raw[raw["image_id"].isin(chosen["image_id"])])
    counts = chosen["dx"].value_counts().reindex(list(CLASSES))
    write_text(
        out / "NOTICE.md",
        NOTICE.format(
            n_images=len(chosen),
            n_lesions=chosen["lesion_id"].nunique(),
            per_class=args.per_class,
            seed=args.seed,
            counts=", ".join(f"{c} {n}" for c, n in counts.items()),
        ),
    )
    print(f"wrote {len(chosen)} images of {chosen['lesion_id'].nunique()} lesions to {out}")


if __name__ == "__main__":
    main()
