"""``skinlesion ensemble RUN_DIR... --out DIR``: combine trained runs (seeds, backbones, image sizes, folds) into
one ensemble run folder (model/ensemble_run.py) that every other command accepts."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.data.split import format_summary, read_splits
from skinlesion.errors import SkinLesionError
from skinlesion.model import ensemble_run


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if (out / "best.pt").exists():
        if (out / "last.pt").exists() or (out / "history.csv").exists():  # a trained run: never overwritten
            raise SkinLesionError(f"{out} holds a trained run; pick another --out")
        if not args.overwrite:
            raise SkinLesionError(f"{out} already holds a model; pass --overwrite or another --out")
    path = ensemble_run.write(args.run_dirs, out)
    print(f"ensemble of {len(args.run_dirs)} runs: {path}")
    splits = read_splits(out / "splits.csv")
    print(format_summary(splits))
    have = set(splits["split"])
    where = "val" if "val" in have else "test" if "test" in have else None
    if where is None:
        print("note: every image trained some member; score the ensemble on an external set "
              f"(skinlesion evaluate --run-dir {out} --data-dir DIR)")  # fmt: skip
    else:
        print(f"next: skinlesion calibrate --run-dir {out} --split {where}  (optional), then "
              f"skinlesion evaluate --run-dir {out} --split {where}")  # fmt: skip
