"""``skinlesion synth``: write a synthetic folder that a small network learns fast: HAM10000's layout, or (``--layout``)
a small copy of another source's (ISIC 2019 / 2020, PAD-UFES-20, a labels CSV, an ImageFolder)."""

from __future__ import annotations

import argparse

from skinlesion.data.datasets import DataSpec, load_dataset
from skinlesion.data.synth import parse_size, write_synthetic
from skinlesion.data.synth_sources import CSV_OPTIONS, write_layout


def main(args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    if args.layout == "ham10000":
        out = write_synthetic(args.out, n_per_class=args.n_per_class, size=size, imbalance=args.imbalance,
                              seed=args.seed)  # fmt: skip
    else:
        out = write_layout(args.out, args.layout, n_per_class=args.n_per_class, size=size, seed=args.seed)
    csv = tuple(CSV_OPTIONS.items()) if args.layout == "csv" else ()
    table = load_dataset(DataSpec((str(out),), csv=csv, classes=args.classes))
    counts = table["source_label"].value_counts()
    print(f"wrote {len(table)} images of {table['lesion_id'].nunique()} lesions to {out} ({args.layout} layout)")
    print("  ".join(f"{c} {n}" for c, n in counts.items()))
    if args.layout == "csv":
        print("read it with: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in CSV_OPTIONS.items()))
