"""``skinlesion train``: the TrainConfig the command line asks for, trained with its recipe's post-hoc steps
(evaluation/pipeline.py; with ``--folds K`` every fold and their ensemble)."""

from __future__ import annotations

import argparse
import dataclasses

from skinlesion.evaluation import pipeline
from skinlesion.training.config import TrainConfig
from skinlesion.training.recipes import recipe


def train_options(args: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """The TrainConfig a parsed ``train`` command line asks for, and the options it named (recipe < --config file <
    command line)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if isinstance(given.get("min_sensitivity"), list):  # repeated flag: one spelling
        given["min_sensitivity"] = ",".join(given["min_sensitivity"])
    base = recipe(args.recipe or "reference")
    return TrainConfig.from_dict({**base.to_dict(), **given}, "train options"), list(given)


def main(args: argparse.Namespace) -> None:
    config, given = train_options(args)
    pipeline.train(config, resume=args.resume, stop_after_epochs=args.stop_after_epochs, given=given)
