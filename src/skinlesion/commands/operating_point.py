"""``skinlesion operating-point``: set a minimum sensitivity per class (e.g. mel=0.75) on the run's val split and
store the decision biases in best.pt (``--remove`` takes them out); ``--referral`` fits the referral rule on the same
images (evaluation/safeguard_fitting.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.decision import operating_point, referral
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import fitting, safeguard_fitting
from skinlesion.inference.options import ScoringOptions
from skinlesion.model import checkpoint


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    options = fitting.run_options(run_dir, ScoringOptions.from_args(args))
    if args.remove:
        if args.min_sensitivity:
            raise SkinLesionError("--remove takes the operating point out; leave --min-sensitivity off with it")
        had = fitting.remove(run_dir, "operating_point")
        print(f"removed the operating point from {run_dir / 'best.pt'}" if had else f"{run_dir / 'best.pt'} had none")
    elif args.min_sensitivity:
        targets = operating_point.parse_targets(args.min_sensitivity, checkpoint.read(run_dir)["classes"])
        point = fitting.set_operating_point(run_dir, targets, args.split, args.tta, options)
        print(operating_point.report_line(point))
        for line in safeguard_fitting.refit_dependents(run_dir, "the new operating point", options):
            print(line)
    elif args.referral is None:
        raise SkinLesionError("say which class needs which sensitivity (--min-sensitivity mel=0.75) and / or the "
                              "accuracy the images not referred must reach (--referral 0.9)")  # fmt: skip
    if args.referral_melanoma and args.referral is None:
        raise SkinLesionError("--referral-melanoma refines --referral; give --referral ACCURACY too")
    if args.referral is not None:
        rule = safeguard_fitting.fit_referral(run_dir, args.referral, args.referral_melanoma, args.split, options)
        on = rule["on_fit"]
        print(f"{referral.describe(rule)}: on these {args.split} images it refers {on['n_referred']} "
              f"({1 - on['coverage']:.1%}); the rest have accuracy {on['accuracy']:.3f} (in-sample)")  # fmt: skip
    print(f"stored in {run_dir / 'best.pt'}; re-run evaluate (and export for the ONNX backend) to use it")
