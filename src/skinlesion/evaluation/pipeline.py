"""A recipe end to end, as ``skinlesion train`` and ``skinlesion.train`` run it: training (one run, or K folds and
their ensemble) and then the post-hoc steps the recipe asks for, each the same library call its own command makes:
the logit adjustment, the metadata prior, then the operating point (it sits on top of both). Under torchrun every
rank trains and rank 0 alone runs the post-hoc steps; on nodes that keep their own run-folder copy, the finished
best.pt is sent from rank 0."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from skinlesion import fileio
from skinlesion.decision import metadata_prior, operating_point
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import cross_validation, fitting, safeguard_fitting
from skinlesion.inference.options import ScoringOptions
from skinlesion.model import checkpoint, logit_adjustment
from skinlesion.training import distributed, loop
from skinlesion.training.config import TrainConfig


def train(
    config: TrainConfig,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    given: Iterable[str] | None = None,
) -> Path:
    """Train the run ``config`` describes, then its recipe's post-hoc steps; the run folder (with ``--folds K`` and no
    ``--fold``: the parent folder holding the folds and their ensemble)."""
    d = distributed.setup(config.device)
    try:
        if config.folds and config.fold is None:
            return cross_validation.run(config, d, resume, stop_after_epochs, given)[0]
        run_dir, config = loop.run(config, d, resume, stop_after_epochs, given)

        def finish() -> bytes | None:
            if not (run_dir / "best.pt").is_file():
                return None
            post_hoc(run_dir, config, ScoringOptions(2 * config.batch_size, str(d.device), config.workers,
                                                     config.cache, config.cache_dir))  # fmt: skip
            return (run_dir / "best.pt").read_bytes() if d.enabled else None

        best = distributed.from_main(d, finish)
        copy = run_dir / "best.pt"
        if best and not d.is_main and d.local_rank == 0 and copy.is_file() and copy.read_bytes() != best:
            fileio.write_bytes(copy, best)  # this node's own copy (a shared folder already has rank 0's bytes)
        return run_dir
    finally:
        distributed.teardown(d)


def post_hoc(run_dir: Path, config: TrainConfig, options: ScoringOptions) -> None:
    """The recipe's steps after training, in order, each stored in best.pt."""
    if config.logit_adjust_tau:
        offset = logit_adjustment.set_logit_adjustment(run_dir / "best.pt", config.logit_adjust_tau)
        print(f"logit adjustment tau {config.logit_adjust_tau:g} stored in best.pt: {np.round(offset, 2).tolist()}")
    if config.metadata_prior:
        prior = fitting.fit_metadata_prior(run_dir)
        if prior is not None:
            print(f"{metadata_prior.summary(prior)}; stored in best.pt")
        else:  # e.g. one image folder without a metadata CSV: the image model is complete on its own
            print("metadata prior skipped: the training images have no age, sex or localization")
    if config.min_sensitivity:
        targets = operating_point.parse_targets(config.min_sensitivity, checkpoint.read(run_dir)["classes"])
        try:
            point = fitting.set_operating_point(run_dir, targets, "val", True, options)
            print(f"{operating_point.report_line(point)}; stored in best.pt")
        except SkinLesionError as e:  # e.g. no melanoma in a tiny val split: the model stays usable as it is
            print(f"operating point skipped: {e}")
    safeguards(run_dir, config, options)


def safeguards(run_dir: Path, config: TrainConfig, options: ScoringOptions) -> None:
    """The recipe's safeguards, fitted on val after the decision chain is complete."""
    fit = safeguard_fitting
    steps = (("conformal sets", config.conformal, lambda: fit.fit_conformal(run_dir, config.conformal,
                                                                            options=options)),
             ("referral rule", config.referral, lambda: fit.fit_referral(run_dir, config.referral, options=options)),
             ("out-of-distribution detector", config.ood, lambda: fit.fit_ood(run_dir, config.ood, options=options)))
    for name, wanted, step in steps:
        if not wanted:
            continue
        try:
            step()
            print(f"{name} fitted on val; stored in best.pt")
        except SkinLesionError as e:
            print(f"{name} skipped: {e}")
