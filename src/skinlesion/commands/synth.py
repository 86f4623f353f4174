"""``skinlesion synth``: write a synthetic HAM10000-layout folder that a small network learns fast."""

from __future__ import annotations

import argparse

import pandas as pd

from skinlesion.classes import CLASSES
from skinlesion.data.synth import parse_size, write_synthetic


def main(args: argparse.Namespace) -> None:
    out = write_synthetic(
        args.out, n_per_class=args.n_per_class, size=parse_size(args.size), imbalance=args.imbalance, seed=args.seed
    )
    meta = pd.read_csv(out / "HAM10000_metadata.csv")
    counts = meta["dx"].value_counts().reindex(list(CLASSES), fill_value=0)
    print(f"wrote {len(meta)} images of {meta['lesion_id'].nunique()} lesions to {out}")
    print("  ".join(f"{c} {n}" for c, n in counts.items()))
