"""``skinlesion gradcam``: image | heatmap | overlay of one image, titled with the run's decision."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.device import resolve_device
from skinlesion.inference.classifier import Classifier
from skinlesion.reporting.explain import explain, figure, title


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    classifier = Classifier.load(run_dir, "torch", str(resolve_device(args.device)))
    exp = explain(classifier, classifier.decode(args.image), args.target_class, args.method)
    out = Path(args.out) if args.out else run_dir / "figures" / f"gradcam_{Path(args.image).stem}.png"
    figure(exp, out, args.method)
    print(title(exp).replace("\n", "; "))
    print(f"wrote {out}")
