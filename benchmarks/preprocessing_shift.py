"""How far the numbers published before the one-preprocessing change (issue 25) could move: a run's val split scored
through the product's path (``Classifier.view_logits_of_table``: the one Preprocessing) and through the image
cache as it was before (PIL bilinear resize of the decoded image when larger than the resize size, then the same
crop and normalisation), side by side, through the same decision chain.

    python benchmarks/preprocessing_shift.py RUN [--tta] [--json docs/measured/preprocessing_shift.json]

Prints the largest probability difference, how many decisions differ, and balanced accuracy / macro AUC both ways
with the paired lesion-bootstrap difference. The "before" path is re-written here on purpose: it is the baseline
being compared, not a product path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skinlesion.data.run_folder import labels_of, split_part
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_scoring import compare, host, print_rows  # noqa: E402


def old_cache_pixels(classifier: Classifier, path: str) -> torch.Tensor:
    """What the image cache stored before issue 25 (PIL's bilinear resize, never upscaling), finished and cropped."""
    prep = classifier.preprocessing
    image = prep.open(path)
    w, h = image.size
    if min(w, h) > prep.resize_size:
        long = int(prep.resize_size * max(w, h) / min(w, h))
        image = image.resize((prep.resize_size, long) if w <= h else (long, prep.resize_size),
                             Image.Resampling.BILINEAR, reducing_gap=None)  # fmt: skip
    return prep.crop(prep.finish(np.asarray(image)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", type=Path, help="also write the result here (scripts/results_tables.py renders it)")
    args = p.parse_args()
    classifier = Classifier.load(args.run_dir)
    table = split_part(args.run_dir, "val")
    y, lesions = labels_of(table, classifier.classes), table["lesion_id"].astype(str).to_numpy()
    n_views = classifier.n_views(args.tta)
    now = classifier.view_logits_of_table(table, n_views, ScoringOptions(), "one preprocessing")
    chunks = []
    for start in range(0, len(table), 64):
        batch = torch.stack([old_cache_pixels(classifier, f) for f in table["path"].iloc[start:start + 64]])
        chunks.append(classifier.backend.view_logits(batch, n_views))
    before = np.concatenate(chunks, axis=1)
    chain, offsets = classifier.chain, classifier.chain.offsets(table)
    pool = lesions if chain.pool_lesions else None
    a, b = chain(now, offsets, pool), chain(before, offsets, pool)
    differ, max_dp = int((a.labels != b.labels).sum()), float(np.abs(a.probabilities - b.probabilities).max())
    views = f"TTA {n_views} views" if args.tta else "single view"
    print(f"host {host()}; {args.run_dir}: {len(y)} val images, {views}")
    print(f"max |p(now) - p(before)| = {max_dp:.4f}; decisions differing: {differ} of {len(y)}")
    rows = compare(y, lesions, (a.probabilities, a.labels), [(b.probabilities, b.labels)], args.bootstrap)
    print_rows(rows, "now", "before")
    if args.json:
        result = {"host": host(), "run": args.run_dir.name, "n_images": len(y), "views": views, "max_abs_dp": max_dp,
                  "decisions_differ": differ, "bootstrap": args.bootstrap, "rows": rows}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
