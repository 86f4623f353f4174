"""How INT8 weights are rounded: ONNX Runtime's nearest step against GPTQ at several dampings, through the product's
quantizer, scored on held-out training images (never val: this is where the default damping was chosen).

    python benchmarks/int8_rounding.py RUN [--images 512] [--dampings 0.01,0.1,0.3,1] [--json FILE]

Every row is ``quantize.quantize_file`` on the run's model.onnx with the calibration sample of `skinlesion export
--int8` (300 training images), then ``--images`` other training images (seeded, not in the calibration sample) scored
by ONNX Runtime and compared with model.onnx: logit SQNR in dB (10 log10 of signal over error power; higher is
closer), top-1 agreement and the seconds the quantization took on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.run_folder import split_part
from skinlesion.inference import quantize, weight_rounding


def logits(model: str | bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder with model.onnx (`skinlesion export`)")
    ap.add_argument("--images", type=int, default=512, help="held-out training images scored")
    ap.add_argument("--dampings", default="0.01,0.1,0.3,1", help="GPTQ dampings tried (share of H's mean diagonal)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()

    fp32_path = a.run / "model.onnx"
    preprocessing = Preprocessing.from_meta(quantize.metadata_props(fp32_path))
    calibration = quantize.calibration_table(a.run)["path"].tolist()
    train = split_part(a.run, "train")
    held_out = train[~train["path"].isin(set(calibration))]
    files = held_out.sample(n=min(a.images, len(held_out)), random_state=7)["path"].tolist()
    x = np.concatenate(list(quantize.calibration_batches(files, preprocessing)))
    reference = logits(str(fp32_path), x)

    images = quantize.CalibrationImages(calibration, preprocessing)

    variants = [("nearest", None)] + [("gptq", float(d)) for d in a.dampings.split(",")]
    if any(d is not None and d <= 0 for _, d in variants):
        ap.error("--dampings: every damping must be > 0 (H is often singular without it)")
    rows = []
    for rounding, damping in variants:
        start = time.perf_counter()
        graph = quantize.quantize_file(fp32_path, images, rounding=rounding,
                                       damping=weight_rounding.DAMPING if damping is None else damping)  # fmt: skip
        seconds = time.perf_counter() - start
        y = logits(graph, x)
        sqnr = 10 * np.log10(float((reference**2).sum()) / float(((reference - y) ** 2).sum()))
        agreement = float(np.mean(reference.argmax(1) == y.argmax(1)))
        rows.append({"rounding": rounding, "damping": damping, "sqnr_db": sqnr, "top1_agreement": agreement,
                     "seconds": seconds})  # fmt: skip
    print(f"# {fp32_path}: {len(calibration)} calibration images, {len(files)} held-out training images "
          f"(default damping {weight_rounding.DAMPING})")  # fmt: skip
    print(f"{'rounding':10}{'damping':>9}{'logit SQNR dB':>15}{'top-1 agree':>13}{'quantize s':>12}")
    for row in rows:
        damping = "" if row["damping"] is None else f"{row['damping']:g}"
        print(f"{row['rounding']:10}{damping:>9}{row['sqnr_db']:15.1f}{row['top1_agreement']:13.3f}"
              f"{row['seconds']:12.1f}")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({"run": str(a.run), "images": len(files), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
