"""Which layers INT8 hurts: each convolution of a run's model.onnx quantized alone, through the product's quantizer.

    python benchmarks/int8_sensitivity.py RUN [--calibration-images 64] [--images 128] [--top 12] [--json FILE]

For every Conv node: only that node quantized (``quantize.quantize_file(only=[node])``: the settings and the
calibration sample of `skinlesion export --int8`), ``--images`` of the run's val images (its one preprocessing)
scored by ONNX Runtime, and the logits compared with model.onnx's: SQNR in dB (10 log10 of signal over error power;
higher is closer) and top-1 agreement. Printed worst first, marked where ``quantize.kept_in_fp32`` keeps the node in
fp32; last, the whole INT8 graph the product writes, for reference. This is the measurement behind kept_in_fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.shape_inference import quant_pre_process

from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.run_folder import split_part
from skinlesion.inference import quantize


def logits(model: str | bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    error = float(((reference - other) ** 2).sum())
    sqnr = float("inf") if error == 0 else 10 * np.log10(float((reference**2).sum()) / error)
    return {"sqnr_db": sqnr, "top1_agreement": float(np.mean(reference.argmax(1) == other.argmax(1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder with model.onnx (`skinlesion export`) and a val part")
    ap.add_argument("--calibration-images", type=int, default=64, help="training images that fix the ranges")
    ap.add_argument("--images", type=int, default=128, help="val images scored")
    ap.add_argument("--top", type=int, default=12, help="rows printed (worst first)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    a = ap.parse_args()

    fp32_path = a.run / "model.onnx"
    preprocessing = Preprocessing.from_meta(quantize.metadata_props(fp32_path))
    calibration = quantize.calibration_table(a.run, a.calibration_images)["path"].tolist()
    val = split_part(a.run, "val").sample(n=a.images, random_state=1)["path"].tolist()
    x = np.concatenate(list(quantize.calibration_batches(val, preprocessing)))
    reference = logits(str(fp32_path), x)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
        kept = set(quantize.kept_in_fp32(prepared))
    images = quantize.CalibrationImages(calibration, preprocessing)

    rows = []
    for i, name in enumerate(convs):
        graph = quantize.quantize_file(fp32_path, images, only=[name])
        rows.append({"node": name, "position": i, "kept_in_fp32": name in kept, **compare(reference, logits(graph, x))})
        print(f"\r{i + 1}/{len(convs)} convolutions", end="", flush=True)
    whole = compare(reference, logits(quantize.quantize_file(fp32_path, images), x))
    print(f"\n# {fp32_path}: each of {len(convs)} convolutions quantized alone; {len(val)} val images, "
          f"{len(calibration)} calibration images")  # fmt: skip
    print(f"{'node':28}{'position':>9}{'logit SQNR dB':>15}{'top-1 agree':>13}  kept in fp32")
    for row in sorted(rows, key=lambda r: r["sqnr_db"])[: a.top]:
        print(f"{row['node']:28}{row['position']:9d}{row['sqnr_db']:15.1f}{row['top1_agreement']:13.3f}  "
              f"{'yes' if row['kept_in_fp32'] else ''}")  # fmt: skip
    print(f"whole INT8 graph (as `skinlesion export --int8` writes it): logit SQNR {whole['sqnr_db']:.1f} dB, "
          f"top-1 agreement {whole['top1_agreement']:.3f}")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({"run": str(a.run), "rows": rows, "whole": whole}, indent=2))


if __name__ == "__main__":
    main()
