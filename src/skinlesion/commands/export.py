"""``skinlesion export``: best.pt -> model.onnx, written only after ONNX Runtime agrees with PyTorch."""

from __future__ import annotations

import argparse

from skinlesion.errors import SkinLesionError
from skinlesion.inference.onnx_export import TOLERANCE, check_opset, export_onnx, written_opset


def main(args: argparse.Namespace) -> None:
    if args.format != "onnx":
        raise SkinLesionError(f"unsupported --format {args.format}; only onnx")
    check_opset(args.opset)  # before loading anything
    target, p_diff, logit_diff, logit_scale = export_onnx(args.run_dir, args.out, args.opset)
    size_mb = target.stat().st_size / 1e6
    print(f"wrote {target} ({size_mb:.1f} MB, opset {written_opset(target)}, dynamic batch)")
    print(
        f"check: ONNX Runtime vs PyTorch on 3 bundled HAM10000 images + 1 random-pixel image: "
        f"max |dp| = {p_diff:.2e} (tolerance {TOLERANCE:g}), max |dlogit| = {logit_diff:.2e} "
        f"(largest |logit| {logit_scale:.3g})"
    )
