"""``skinlesion export``: best.pt -> model.onnx, written only after ONNX Runtime agrees with PyTorch; with --int8
also model.int8.onnx (static INT8), with its agreement with PyTorch and its drift from fp32 on val."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skinlesion.errors import SkinLesionError
from skinlesion.inference import drift, quantize, selection
from skinlesion.inference.int8_export import export_int8
from skinlesion.inference.onnx_export import TOLERANCE, check_opset, export_onnx, written_opset
from skinlesion.inference.options import ScoringOptions

SAMPLE = "3 bundled HAM10000 images + 1 random-pixel image"


def main(args: argparse.Namespace) -> None:
    if args.format != "onnx":
        raise SkinLesionError(f"unsupported --format {args.format}; only onnx")
    check_opset(args.opset)  # before loading anything
    target, p_diff, logit_diff, logit_scale = export_onnx(args.run_dir, args.out, args.opset)
    size_mb = target.stat().st_size / 1e6
    print(f"wrote {target} ({size_mb:.1f} MB, opset {written_opset(target)}, dynamic batch)")
    print(
        f"check: ONNX Runtime vs PyTorch on {SAMPLE}: "
        f"max |dp| = {p_diff:.2e} (tolerance {TOLERANCE:g}), max |dlogit| = {logit_diff:.2e} "
        f"(largest |logit| {logit_scale:.3g})"
    )
    if getattr(args, "int8", False):
        int8(args, target)


def int8(args: argparse.Namespace, fp32_path: Path) -> None:
    options = ScoringOptions.from_args(args)
    rounding = getattr(args, "weight_rounding", "gptq")
    result = export_int8(args.run_dir, fp32_path, args.calibration_images, options, rounding=rounding)
    p_diff, logit_diff, logit_scale = result.parity
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB, static INT8 QDQ, per-channel weights, "
          f"calibrated on {result.calibration_images} training images, weights rounded by "
          f"{'GPTQ' if rounding == 'gptq' else 'nearest step'})")  # fmt: skip
    print(f"check: INT8 vs PyTorch on {SAMPLE}: max |dp| = {p_diff:.2e}, max |dlogit| = {logit_diff:.2e} "
          f"(largest |logit| {logit_scale:.3g})")  # fmt: skip
    props = quantize.metadata_props(result.path)
    if quantize.LOGIT_SHIFT_KEY in props:
        shift = zip(json.loads(props["classes"]), json.loads(props[quantize.LOGIT_SHIFT_KEY]), strict=True)
        print("classifier bias corrected by INT8's mean logit shift on the calibration images: "
              + ", ".join(f"{c} {v:+.3f}" for c, v in shift))  # fmt: skip
    fast = result.speed
    print(f"speed on this CPU at batch {fast['batch']}: fp32 {fast['fp32_img_s']:.1f} img/s, INT8 "
          f"{fast['int8_img_s']:.1f} img/s ({fast['int8_img_s'] / fast['fp32_img_s']:.2f}x)")  # fmt: skip
    if not selection.faster(fast):
        print("note: INT8 is not faster than fp32 on this CPU, so `--backend auto` keeps to fp32 here (pass "
              "--backend onnx-int8 to use it)", file=sys.stderr)  # fmt: skip
    if result.drift is None:
        print("note: the run has no labelled val or test part: INT8's drift from fp32 was not measured, so "
              "`--backend auto` keeps to fp32 (pass --backend onnx-int8 to use it)")  # fmt: skip
        return
    for line in drift.describe(result.drift):
        print(line)
    warning = drift.warning(result.drift)
    if warning:
        print(warning, file=sys.stderr)
