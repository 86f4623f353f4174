"""``skinlesion calibrate``: fit temperature scaling on the run's val split; stores T in best.pt and writes
calibration.json, then sets a stored operating point again (it lives after the temperature)."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.decision import conformal
from skinlesion.evaluation import fitting, safeguard_fitting
from skinlesion.inference.options import ScoringOptions


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    options = fitting.run_options(run_dir, ScoringOptions.from_args(args))
    spec = fitting.CalibrationSpec(args.method, args.split, args.folds, args.seed, args.slice_frac)
    result = fitting.calibrate(run_dir, spec, options)
    b, a = result["before"], result["after"]
    print(f"temperature {result['temperature']:.3f} ({result['method']}; fitted on {result['fit_on']})")
    print(f"scored on {result['scored_on']} ({result['n_scored']} images):")
    print(f"  ECE {b['ece']:.4f} -> {a['ece']:.4f}   NLL {b['log_loss']:.4f} -> {a['log_loss']:.4f}")
    print(f"stored T in {run_dir / 'best.pt'}; wrote {run_dir / 'calibration.json'} (re-run evaluate to use it)")
    line = fitting.refit_operating_point(run_dir, "the new temperature", options)
    if line:
        print(line)
    for line in safeguard_fitting.refit_dependents(run_dir, "the new temperature", options):
        print(line)
    if args.conformal is not None:
        fitted = safeguard_fitting.fit_conformal(run_dir, args.conformal, args.conformal_method, args.split, options)
        print(f"{conformal.describe(fitted)}; stored in best.pt")
    if args.ood is not None:
        detector = safeguard_fitting.fit_ood(run_dir, args.ood, args.ood_refusal, args.split, options)
        print(f"out-of-distribution detector ({detector['kind']}): threshold {detector['threshold']:.4g}, refusing "
              f"{args.ood_refusal:.0%} of the {args.split} images; stored in best.pt")  # fmt: skip
