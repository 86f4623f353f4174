"""model.onnx -> model.int8.onnx: ONNX Runtime's static INT8 quantization, calibrated on the run's own images.

QDQ format, weights int8 per output channel, activations uint8 per tensor (MinMax ranges) calibrated on a seeded
sample of the run's training-part images taken through the run's one ``Preprocessing`` and ``BatchNormalizer``
(what every backend sees). The graph is the whole network (an ensemble's too: its members, the resize and the mean
are one graph), so the int8 file is scored by ``OnnxBackend`` and the same ``DecisionChain`` as model.onnx. Its
metadata is model.onnx's (``source_sha256``: the best.pt it came from, so a retrained run makes it stale) plus
``precision`` ``int8``, ``fp32_sha256`` (the model.onnx it was quantized from) and ``quantization`` (how).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion import fileio
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.run_folder import split_part
from skinlesion.errors import SkinLesionError

INT8_SUFFIX = ".int8.onnx"
CALIBRATION_IMAGES = 300  # a few hundred images fix the activation ranges; more only costs time
CALIBRATION_BATCH = 32
# reduce_range: 7-bit weights. AVX2 / AVX-512 CPUs without VNNI multiply u8 x s8 pairs into saturating 16-bit
# sums (VPMADDUBSW); 7-bit weights keep every pair sum in range, so a file made here is exact on any x86 CPU.
REDUCE_RANGE = True


def int8_path(fp32_path: str | Path) -> Path:
    """model.onnx -> model.int8.onnx beside it (any other name: <stem>.int8.onnx)."""
    path = Path(fp32_path)
    return path.with_name(path.name.removesuffix(".onnx") + INT8_SUFFIX)


def calibration_table(run_dir: str | Path, n: int = CALIBRATION_IMAGES, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of ``n`` images of the run's training part (splits.csv joined with its data folder)."""
    if n < 1:
        raise SkinLesionError(f"--calibration-images {n}: pass at least 1 (default {CALIBRATION_IMAGES})")
    train = split_part(Path(run_dir), "train")
    return train.sample(n=min(n, len(train)), random_state=seed).reset_index(drop=True)


def calibration_batches(
    files: Sequence[str | Path], preprocessing: Preprocessing, batch_size: int = CALIBRATION_BATCH
) -> Iterator[np.ndarray]:
    """Normalised float32 batches (N, 3, S, S) of ``files``: the preprocessing's uint8 crops, then its normalizer."""
    normalize = preprocessing.normalizer("cpu")
    for start in range(0, len(files), batch_size):
        yield normalize(preprocessing.batch(files[start : start + batch_size])).numpy()


def reader(batches: Iterator[np.ndarray], input_name: str) -> Any:
    """ONNX Runtime's calibration reader over ``batches`` (built here: onnxruntime is imported on use only)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {input_name: batch}

    return Batches()


def kept_in_fp32(model_path: Path) -> list[str]:
    """Nodes left in fp32: each stem convolution (3 input channels: it reads the image itself, and an ensemble has
    one per member) and the classifier (Gemm / MatMul: its output is the logits). On a Lite0 trained on HAM10000
    this took INT8's decision agreement with fp32 on val from 94.2 % to 95.4 % and max |dp| from 0.71 to 0.38, for
    a few per cent of the compute (docs/benchmarks/README.md)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    stems = [n.name for n in graph.node if n.op_type == "Conv" and len(weights.get(n.input[1], [])) == 4
             and weights[n.input[1]][1] == 3]  # fmt: skip
    return stems + [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]


def quantize_file(fp32_path: Path, batches: Iterator[np.ndarray], reduce_range: bool = REDUCE_RANGE) -> bytes:
    """The int8 QDQ graph of ``fp32_path`` (no metadata yet), calibrated on ``batches``."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="skinlesion-int8-") as tmp:
        prepared, out = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            # Shape inference and constant folding first (what ORT recommends before quantize_static).
            quant_pre_process(str(fp32_path), str(prepared))
            quantize_static(str(prepared), str(out), reader(batches, input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=kept_in_fp32(prepared))  # fmt: skip
        except SkinLesionError:
            raise
        except Exception as e:  # noqa: BLE001 - a quantizer failure is reported in one line
            raise SkinLesionError(f"INT8 quantization of {fp32_path} failed ({fileio.first_line(e)}); the fp32 "
                                  "model.onnx is unaffected") from e  # fmt: skip
        return out.read_bytes()


def int8_metadata(fp32_props: dict[str, str], fp32_sha256: str, n_images: int, reduce_range: bool) -> dict[str, str]:
    """model.onnx's metadata plus what makes the int8 file traceable (stale when best.pt changes: source_sha256)."""
    import onnxruntime as ort

    how = {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8, per tensor",
           "fp32": "stem convolutions and the classifier",
           "calibration": {"method": "MinMax", "images": n_images, "split": "train"},
           "reduce_range": reduce_range, "onnxruntime": ort.__version__}  # fmt: skip
    return {**fp32_props, "precision": "int8", "fp32_sha256": fp32_sha256, "quantization": json.dumps(how)}


def metadata_props(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def quantize_run(
    run_dir: str | Path,
    fp32_path: str | Path | None = None,
    n_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
    reduce_range: bool = REDUCE_RANGE,
) -> tuple[bytes, int]:
    """model.int8.onnx's bytes for a run folder with an exported model.onnx (``fp32_path``, default RUN/model.onnx),
    calibrated on ``n_images`` of the run's training images (fewer when it has fewer), and how many. Nothing is
    written here (see ``write``)."""
    from skinlesion.inference.onnx_export import add_metadata

    run_dir = Path(run_dir)
    fp32_path = Path(fp32_path) if fp32_path else run_dir / "model.onnx"
    if not fp32_path.is_file():
        raise SkinLesionError(f"no {fp32_path}; run `skinlesion export --run-dir {run_dir}` first")
    props = metadata_props(fp32_path)
    if props.get("precision") == "int8":
        raise SkinLesionError(f"{fp32_path} is already int8; quantize the fp32 model.onnx")
    table = calibration_table(run_dir, n_images, seed)
    preprocessing = Preprocessing.from_meta(props)
    graph = quantize_file(fp32_path, calibration_batches(table["path"].tolist(), preprocessing), reduce_range)
    metadata = int8_metadata(props, fileio.sha256_file(fp32_path), len(table), reduce_range)
    return add_metadata(graph, metadata), len(table)


def write(target: str | Path, model_bytes: bytes, drift: dict[str, Any] | None = None) -> Path:
    """Write model.int8.onnx atomically, with the measured drift (``drift.measure``) in its metadata."""
    from skinlesion.inference.onnx_export import add_metadata, props_of

    if drift is not None:
        model_bytes = add_metadata(model_bytes, {**props_of(model_bytes), "int8_drift": json.dumps(drift)})
    return fileio.write_bytes(target, model_bytes)
