"""``skinlesion train``: train (training/loop.py), then the post-hoc steps the recipe asks for, each the same
library call its own command makes: the logit adjustment, the metadata prior, then the operating point (it
sits on top of both). Under torchrun every rank trains and rank 0 alone runs the post-hoc steps. With ``--folds
K`` (and no ``--fold``): every fold, then their ensemble with its steps fitted out of fold
(evaluation/cross_validation.py). On nodes that keep their own run-folder copy, the finished best.pt is sent
from rank 0."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion import fileio
from skinlesion.classes import CLASSES
from skinlesion.decision import metadata_prior, operating_point
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import cross_validation, fitting
from skinlesion.model import logit_adjustment
from skinlesion.training import distributed, loop


def main(args: argparse.Namespace) -> None:
    d = distributed.setup(getattr(args, "device", None) or "auto")
    try:
        if getattr(args, "folds", None) and getattr(args, "fold", None) is None:
            cross_validation.run(args, d)  # K folds + their ensemble, post-hoc steps fitted out of fold
            return
        run_dir, cfg = loop.run(args, d)

        def finish() -> bytes | None:
            if not (run_dir / "best.pt").is_file():
                return None
            post_hoc(run_dir, cfg, str(d.device))
            return (run_dir / "best.pt").read_bytes() if d.enabled else None

        best = distributed.from_main(d, finish)
        copy = run_dir / "best.pt"
        if best and not d.is_main and d.local_rank == 0 and copy.is_file() and copy.read_bytes() != best:
            fileio.write_bytes(copy, best)  # this node's own copy (a shared folder already has rank 0's bytes)
    finally:
        distributed.teardown(d)


def post_hoc(run_dir: Path, cfg: dict[str, Any], device: str) -> None:
    if cfg.get("logit_adjust_tau"):
        offset = logit_adjustment.set_logit_adjustment(run_dir / "best.pt", cfg["logit_adjust_tau"])
        print(f"logit adjustment tau {cfg['logit_adjust_tau']:g} stored in best.pt: {np.round(offset, 2).tolist()}")
    if cfg.get("metadata_prior"):
        prior = fitting.fit_metadata_prior(run_dir)
        if prior is not None:
            print(f"{metadata_prior.summary(prior)}; stored in best.pt")
        else:  # e.g. one image folder without a metadata CSV: the image model is complete on its own
            print("metadata prior skipped: the training images have no age, sex or localization")
    if cfg.get("min_sensitivity") not in (None, "", "none"):
        targets = operating_point.parse_targets(cfg["min_sensitivity"], CLASSES)
        try:
            point = fitting.set_operating_point(run_dir, targets, "val", True, 2 * cfg["batch_size"], device,
                                                cfg["workers"], cfg.get("cache_dir"), cfg["cache"])  # fmt: skip
        except SkinLesionError as e:  # e.g. no melanoma in a tiny val split: the model stays usable as it is
            print(f"operating point skipped: {e}")
            return
        print(f"{operating_point.report_line(point)}; stored in best.pt")
