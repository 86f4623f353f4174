"""``skinlesion split``: a lesion-grouped, stratified train/val(/test) split to a CSV."""

from __future__ import annotations

import argparse

from skinlesion.data.datasets import DataSpec, grouping_text, load_dataset
from skinlesion.data.split import format_summary, make_split, write_splits


def main(args: argparse.Namespace) -> None:
    table = load_dataset(DataSpec.of(args))
    frame = make_split(
        table, val_frac=args.val_frac, test_frac=args.test_frac, folds=args.folds, fold=args.fold, seed=args.seed
    )
    path = write_splits(args.out, frame)
    how = f"fold {args.fold} of {args.folds}" if args.folds else f"val {args.val_frac:g}"
    print(f"split of {len(frame)} images ({how}, test {args.test_frac:g}, seed {args.seed}); images per class:")
    print(format_summary(frame))
    print(f"kept together: {grouping_text(table)}")
    print(f"wrote {path}")
