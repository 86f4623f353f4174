"""``skinlesion fit-metadata-prior``: fit p(class | age, sex, site) on the run's train split and store it in
best.pt (``--remove`` takes it out), then set a stored operating point again."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.decision import metadata_prior
from skinlesion.device import resolve_device
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import fitting, safeguard_fitting
from skinlesion.inference.options import ScoringOptions


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    if args.remove:
        had = fitting.remove(run_dir, "metadata_prior")
        print(f"removed the metadata prior from {run_dir / 'best.pt'}" if had else f"{run_dir / 'best.pt'} had none")
    else:
        model = fitting.fit_metadata_prior(run_dir)
        if model is None:
            raise SkinLesionError("no age, sex or localization in the training metadata; the metadata prior needs a "
                                  "HAM10000-style metadata CSV with those columns")  # fmt: skip
        print(f"{metadata_prior.summary(model)}; stored in {run_dir / 'best.pt'} (evaluate, predict and serve use it; "
              "re-run `skinlesion export` for the ONNX backend)")  # fmt: skip
    # An operating point was set on the probabilities with the old prior (or none): set it again.
    options = fitting.run_options(run_dir, ScoringOptions(device=str(resolve_device())))
    line = fitting.refit_operating_point(run_dir, "the metadata prior", options)
    if line:
        print(line)
    for line in safeguard_fitting.refit_dependents(run_dir, "the metadata prior", options):
        print(line)
