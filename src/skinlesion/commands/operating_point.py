"""``skinlesion operating-point``: set a minimum sensitivity per class (e.g. mel=0.75) on the run's val split and
store the decision biases in best.pt (``--remove`` takes them out)."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.decision import operating_point
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import fitting
from skinlesion.inference.options import ScoringOptions
from skinlesion.model import checkpoint


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    if args.remove:
        if args.min_sensitivity:
            raise SkinLesionError("--remove takes the operating point out; leave --min-sensitivity off with it")
        had = fitting.remove(run_dir, "operating_point")
        print(f"removed the operating point from {run_dir / 'best.pt'}" if had else f"{run_dir / 'best.pt'} had none")
        return
    targets = operating_point.parse_targets(args.min_sensitivity, checkpoint.read(run_dir)["classes"])
    if not targets:
        raise SkinLesionError("say which class needs which sensitivity, e.g. --min-sensitivity mel=0.75")
    point = fitting.set_operating_point(run_dir, targets, args.split, args.tta, ScoringOptions.from_args(args))
    print(operating_point.report_line(point))
    print(f"stored in {run_dir / 'best.pt'}; re-run evaluate (and export for the ONNX backend) to use it")
