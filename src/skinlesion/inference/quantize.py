"""model.onnx -> model.int8.onnx: ONNX Runtime's static INT8 quantization, calibrated on the run's own images.

QDQ format, weights int8 per output channel (rounded by GPTQ: ``weight_rounding``), activations uint8 per tensor
(MinMax ranges) calibrated on a seeded sample of the run's training-part images taken through the run's one
``Preprocessing`` and ``BatchNormalizer`` (what every backend sees). The graph is the whole network (an ensemble's
too: its members, the resize and the mean are one graph), so the int8 file is scored by ``OnnxBackend`` and the same
``DecisionChain`` as model.onnx. Its metadata is model.onnx's (``source_sha256``: the best.pt it came from, so a
retrained run makes it stale) plus ``precision`` ``int8``, ``fp32_sha256`` (the model.onnx it was quantized from)
and ``quantization`` (how).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion import fileio
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.run_folder import split_part
from skinlesion.errors import SkinLesionError
from skinlesion.inference import weight_rounding

INT8_SUFFIX = ".int8.onnx"
CALIBRATION_IMAGES = 300  # a few hundred images fix the activation ranges; more only costs time
# ORT's calibrator and GPTQ's probe output every activation of a batch at once, so the peak grows with the batch
# (`/usr/bin/time skinlesion export --int8`, Lite0 at 128 px: 2.48 GB max RSS at 32 images, 1.97 GB at 8). Ranges,
# GPTQ's moments and the bias correction are extremes or sums over all images: the batch does not change them.
CALIBRATION_BATCH = 8
SPEED_BATCH = 32  # the batch evaluate and predict score with
LOGIT_SHIFT_KEY = "int8_logit_shift"  # the mean INT8 - fp32 logit per class that correct_bias removed
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


@dataclass(frozen=True)
class CalibrationImages:
    """Calibration images as normalised float32 batches (``calibration_batches``), read again on every pass over
    them: ONNX Runtime's ranges, GPTQ's layer inputs, the bias correction."""

    files: Sequence[str | Path]
    preprocessing: Preprocessing
    batch_size: int = CALIBRATION_BATCH

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)  # batches

    def __iter__(self) -> Iterator[np.ndarray]:
        return calibration_batches(self.files, self.preprocessing, self.batch_size)


def reader(images: CalibrationImages, input_name: str) -> Any:
    """ONNX Runtime's calibration reader over ``images`` (built here: onnxruntime is imported on use only)."""
    from onnxruntime.quantization import CalibrationDataReader

    batches = iter(images)

    class Batches(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {input_name: batch}

    return Batches()


def kept_in_fp32(model_path: Path) -> list[str]:
    """Nodes left in fp32: each stem convolution (3 input channels: it reads the image itself; an ensemble has one per
    member), the first convolution after it, and the classifier (Gemm / MatMul: its output is the logits).

    Why the first one after the stem: batch norm folded into that depthwise convolution leaves a few channels with
    very large weights and biases whose difference is then clipped to [0, 6], so 8-bit rounding there is amplified:
    on a Lite0 trained on HAM10000, quantizing that one layer alone took the logits' SQNR to 16.2 dB even with GPTQ
    rounding (every other layer but the stem alone: 24.6 dB or more; ``benchmarks/int8_sensitivity.py``), and
    keeping it in fp32 (with nearest rounding, before GPTQ) took INT8's decision agreement with fp32 on val from
    92.9 % to 95.6 % at no measurable speed cost (docs/benchmarks/README.md)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    stems = [n for n in graph.node if n.op_type == "Conv" and len(weights.get(n.input[1], [])) == 4
             and weights[n.input[1]][1] == 3]  # fmt: skip
    return ([n.name for n in stems] + first_convs_after(graph, stems)
            + [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")])  # fmt: skip


def first_convs_after(graph: Any, nodes: Sequence[Any], max_depth: int = 4) -> list[str]:
    """The convolutions first reached from ``nodes``' outputs through non-convolution nodes (the activation between
    them: Clip, Relu, Sigmoid + Mul, ...), at most ``max_depth`` nodes away."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: list[str] = []
    frontier = [out for node in nodes for out in node.output]
    for _ in range(max_depth):
        following = [n for tensor in frontier for n in consumers.get(tensor, [])]
        found += [n.name for n in following if n.op_type == "Conv" and n.name not in found]
        frontier = [out for n in following if n.op_type != "Conv" for out in n.output]
    return found


def quantize_file(fp32_path: Path, images: CalibrationImages, reduce_range: bool = REDUCE_RANGE,
                  only: Sequence[str] | None = None, rounding: str = "gptq",
                  damping: float = weight_rounding.DAMPING) -> bytes:
    """The int8 QDQ graph of ``fp32_path`` (no metadata yet), calibrated on ``images``, its
    convolution weights rounded by GPTQ on them (``rounded``; ``rounding="nearest"``: as ONNX Runtime rounded them)
    and its classifier bias corrected on them (``correct_bias``); ``only``: quantize just these nodes (what
    benchmarks/int8_sensitivity.py measures one layer at a time) instead of all but ``kept_in_fp32``."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if rounding not in weight_rounding.ROUNDINGS:
        raise SkinLesionError(f"--weight-rounding {rounding}: choose one of {', '.join(weight_rounding.ROUNDINGS)}")
    input_name = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="skinlesion-int8-") as tmp:
        prepared, out = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            # Shape inference and constant folding first (what ORT recommends before quantize_static).
            quant_pre_process(str(fp32_path), str(prepared))
            quantize_static(str(prepared), str(out), reader(images, input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=[] if only else kept_in_fp32(prepared),
                            nodes_to_quantize=list(only or []))  # fmt: skip
            graph = (rounded(out, prepared, images, input_name, reduce_range, damping) if rounding == "gptq"
                     else out.read_bytes())  # fmt: skip
        except SkinLesionError:
            raise
        except Exception as e:  # noqa: BLE001 - a quantizer failure is reported in one line
            raise SkinLesionError(f"INT8 quantization of {fp32_path} failed ({fileio.first_line(e)}); the fp32 "
                                  "model.onnx is unaffected") from e  # fmt: skip
        return correct_bias(graph, fp32_path, iter(images), input_name)


def rounded(int8_path: Path, prepared: Path, batches: Iterable[np.ndarray], input_name: str,
            reduce_range: bool, damping: float = weight_rounding.DAMPING) -> bytes:  # fmt: skip
    """The QDQ graph at ``int8_path`` with its convolution weights re-rounded by GPTQ (``weight_rounding``) against
    the fp32 weights of ``prepared`` (the graph ORT quantized: batch norm already folded in)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    model = onnx.load(str(int8_path))
    fp32_weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(prepared)).graph.initializer}
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.INT8, reduce_range=reduce_range, symmetric=True)
    weight_rounding.round_weights(model, fp32_weights, batches, input_name, int(qmin), int(qmax), damping)
    return model.SerializeToString()


def correct_bias(int8_bytes: bytes, fp32_path: Path, batches: Iterator[np.ndarray], input_name: str) -> bytes:
    """Subtract the INT8 graph's mean logit shift from fp32 on ``batches`` from its classifier bias (kept in fp32).

    Rounding shifts every class's logit a little on average (on a Lite0 trained on HAM10000, as `export --int8`
    prints it: with nearest rounding melanoma +0.114, bkl -0.131, with GPTQ at most 0.052); removing it (bias
    correction, Nagel et al. 2019) took balanced accuracy's INT8 drift on val from -0.036 to -0.019 (nearest
    rounding). An ensemble's logits are its members' mean, so each member's classifier takes the same correction. A
    graph without a Gemm classifier with a constant bias is left as it is."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load_from_string(int8_bytes)
    initializers = {t.name: t for t in model.graph.initializer}
    biases = [initializers[n.input[2]] for n in model.graph.node
              if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in initializers]  # fmt: skip
    if not biases:
        return int8_bytes
    sessions = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (str(fp32_path), int8_bytes)]
    total, count = 0.0, 0
    for batch in batches:
        reference, quantized = (s.run(None, {input_name: batch})[0] for s in sessions)
        total, count = total + (quantized - reference).sum(0), count + len(batch)
    shift = np.asarray(total / max(count, 1), dtype=np.float32)
    for bias in biases:
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) - shift, bias.name))
    entry = model.metadata_props.add()  # kept by quantize_run: `export --int8` prints it
    entry.key, entry.value = LOGIT_SHIFT_KEY, json.dumps([round(float(v), 4) for v in shift])
    return model.SerializeToString()


def int8_metadata(fp32_props: dict[str, str], fp32_sha256: str, n_images: int, reduce_range: bool,
                  rounding: str = "gptq") -> dict[str, str]:  # fmt: skip
    """model.onnx's metadata plus what makes the int8 file traceable (stale when best.pt changes: source_sha256)."""
    import onnxruntime as ort

    how = {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8, per tensor",
           "fp32": "stem convolutions, the first convolution after each, the classifier",
           "weight_rounding": (f"GPTQ on the calibration images (damping {weight_rounding.DAMPING})"
                               if rounding == "gptq" else "nearest"),
           "bias_correction": "classifier bias minus the mean logit shift on the calibration images",
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
    rounding: str = "gptq",
) -> tuple[bytes, int]:
    """model.int8.onnx's bytes for a run folder with an exported model.onnx (``fp32_path``, default RUN/model.onnx),
    calibrated on ``n_images`` of the run's training images (fewer when it has fewer), and how many. Nothing is
    written here (see ``write``)."""
    from skinlesion.inference.onnx_export import add_metadata, props_of

    run_dir = Path(run_dir)
    fp32_path = Path(fp32_path) if fp32_path else run_dir / "model.onnx"
    if not fp32_path.is_file():
        raise SkinLesionError(f"no {fp32_path}; run `skinlesion export --run-dir {run_dir}` first")
    props = metadata_props(fp32_path)
    if props.get("precision") == "int8":
        raise SkinLesionError(f"{fp32_path} is already int8; quantize the fp32 model.onnx")
    table = calibration_table(run_dir, n_images, seed)
    preprocessing = Preprocessing.from_meta(props)
    files = table["path"].tolist()
    graph = quantize_file(fp32_path, CalibrationImages(files, preprocessing), reduce_range, rounding=rounding)
    metadata = int8_metadata(props, fileio.sha256_file(fp32_path), len(table), reduce_range, rounding)
    return add_metadata(graph, {**props_of(graph), **metadata}), len(table)


def measure_speed(fp32_path: Path, int8_bytes: bytes, img_size: int, batch: int = SPEED_BATCH, rounds: int = 3,
                  min_seconds: float = 0.5) -> dict[str, Any]:  # fmt: skip
    """Images/s of model.onnx and the INT8 graph on this CPU at ``batch`` (the best of ``rounds`` alternating rounds of
    about ``min_seconds`` each: another job only slows a round down). INT8 is not faster everywhere: without VNNI
    ONNX Runtime's u8 x s8 kernel gains at most ~1.1-1.2x over fp32, and a network whose activations (SiLU,
    squeeze-excitation) stay fp32 between quantize / dequantize pairs ends up slower (efficientnet_b0 at 224 px:
    0.88x on an AVX2 host)."""
    import onnxruntime as ort

    from skinlesion.inference.timing import cpu_model, images_per_s

    x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size)).astype(np.float32)
    sessions = {name: ort.InferenceSession(model, providers=["CPUExecutionProvider"])
                for name, model in (("fp32", str(fp32_path)), ("int8", int8_bytes))}  # fmt: skip
    best = images_per_s({name: lambda x, s=s: s.run(None, {s.get_inputs()[0].name: x}) for name, s in sessions.items()},
                        x, rounds, min_seconds)  # fmt: skip
    return {"batch": batch, "fp32_img_s": round(best["fp32"], 1), "int8_img_s": round(best["int8"], 1),
            "cpu": cpu_model()}  # fmt: skip


def write(target: str | Path, model_bytes: bytes, drift: dict[str, Any] | None = None,
          speed: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write model.int8.onnx atomically, with the measured drift (``drift.measure``) and speed (``measure_speed``)
    in its metadata."""
    from skinlesion.inference.onnx_export import add_metadata, props_of

    extra = {"int8_drift": drift, "int8_speed": speed}
    measured = {key: json.dumps(value) for key, value in extra.items() if value is not None}
    if measured:
        model_bytes = add_metadata(model_bytes, {**props_of(model_bytes), **measured})
    return fileio.write_bytes(target, model_bytes)
