"""``skinlesion export --int8``: model.onnx -> model.int8.onnx, with the parity report against PyTorch and the
drift from fp32 measured on the run's labelled val (or test) images, stored in the file's metadata."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinlesion import fileio
from skinlesion.decision.chain import DecisionChain
from skinlesion.inference import drift, quantize
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.onnx_backend import OnnxBackend
from skinlesion.inference.onnx_export import check_against_torch, sample_inputs
from skinlesion.inference.options import ScoringOptions
from skinlesion.model import checkpoint


@dataclass(frozen=True)
class Int8Export:
    path: Path
    parity: tuple[float, float, float]  # max |dp|, max |dlogit|, largest |logit| vs PyTorch on the sample inputs
    drift: dict[str, Any] | None  # drift.measure's report; None when the run has no labelled val / test part
    calibration_images: int
    speed: dict[str, Any]  # quantize.measure_speed: fp32 and INT8 images/s on this CPU


def export_int8(
    run_dir: str | Path,
    fp32_path: str | Path | None = None,
    n_images: int = quantize.CALIBRATION_IMAGES,
    options: ScoringOptions | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    rounding: str = "gptq",
) -> Int8Export:
    """Quantize the run's model.onnx (``fp32_path``), compare it with PyTorch and with fp32, time both on this CPU,
    write model.int8.onnx beside it (atomically, drift and speed in its metadata)."""
    run_dir = Path(run_dir)
    run_folder = run_dir if run_dir.is_dir() else run_dir.parent
    fp32_path = Path(fp32_path) if fp32_path else run_folder / "model.onnx"
    int8_bytes, calibrated = quantize.quantize_run(run_folder, fp32_path, n_images, seed, rounding=rounding)
    loaded = checkpoint.load(checkpoint.checkpoint_file(run_dir))
    chain = DecisionChain.from_meta(loaded.meta)
    parity = check_against_torch(loaded.model.float().eval(), int8_bytes, sample_inputs(loaded.preprocessing), chain)
    measured = None
    split = drift.split_to_measure(run_folder)
    if split is not None:
        with tempfile.TemporaryDirectory(prefix="skinlesion-int8-") as tmp:
            candidate = fileio.write_bytes(Path(tmp) / "model.int8.onnx", int8_bytes)
            fp32, int8 = (Classifier(b, DecisionChain.from_meta(b.meta)) for b in
                          (OnnxBackend(fp32_path), OnnxBackend(candidate)))  # fmt: skip
            measured = drift.measure(run_folder, fp32, int8, split, options, bootstrap, seed)
    speed = quantize.measure_speed(fp32_path, int8_bytes, loaded.preprocessing.img_size)
    target = quantize.write(quantize.int8_path(fp32_path), int8_bytes, measured, speed)
    return Int8Export(target, parity, measured, calibrated, speed)
