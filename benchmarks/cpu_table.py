"""`bench_infer.py --cpu`: CPU inference against what the machine can do, and `evaluate --tta` per backend.

For each model (efficientnet_b0 at 224 px, tf_efficientnet_lite0 at 128 px; random weights: speed does not depend on
them) images/s at batch 1 and 32 of:

- PyTorch eager fp32 (what `--backend torch` runs on the CPU),
- PyTorch bf16 autocast + channels_last (what training uses where bf16 is native),
- ONNX Runtime fp32 (model.onnx, `skinlesion export`),
- ONNX Runtime INT8 (model.int8.onnx, the product's quantizer, calibrated on the bundled HAM10000 images),

in alternating rounds (the best round of each counts: other jobs only slow a round down), each as a share of the
machine's peak: model GFLOPs (torch's FlopCounterMode, 2 per multiply-add) x images/s against an fp32 matmul peak
measured here (torch.mm of 2048 x 2048, best of several, all threads). ``--eval-run RUN``: the wall time of
`skinlesion evaluate --tta --backend B` for each backend on a copy of RUN (which needs model.onnx and
model.int8.onnx), alternating backends per round.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

BATCHES = (1, 32)
MODELS = (("efficientnet_b0", 224), ("tf_efficientnet_lite0", 128))


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """fp32 GFLOP/s of the best of ``reps`` n x n matmuls (torch, all its threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def ort_gemm_peaks(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """ONNX Runtime's GOP/s on one n x n product in fp32 (MatMul) and in u8 x s8 (MatMulInteger, the kernel behind
    INT8 convolutions): their ratio is the most INT8 can gain over fp32 on this CPU (VNNI / AMX raise it)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    peaks = []
    for op, a_type, y_type, a, w in (
        ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((n, n), np.float32),
         rng.standard_normal((n, n), np.float32)),
        ("MatMulInteger", TensorProto.UINT8, TensorProto.INT32, rng.integers(0, 255, (n, n), np.uint8),
         rng.integers(-64, 64, (n, n), np.int8)),
    ):  # fmt: skip
        graph = helper.make_graph([helper.make_node(op, ["A", "W"], ["Y"])], op,
                                  [helper.make_tensor_value_info("A", a_type, [n, n])],
                                  [helper.make_tensor_value_info("Y", y_type, [n, n])],
                                  [numpy_helper.from_array(w, "W")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"A": a})
        best = min(_seconds(lambda s=session, a=a: s.run(None, {"A": a})) for _ in range(reps))
        peaks.append(2 * n**3 / best / 1e9)
    return peaks[0], peaks[1]


def model_gflops(model: torch.nn.Module, img_size: int) -> float:
    """GFLOPs of one image through ``model`` (2 per multiply-add, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 1e9


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def runners(run_dir: Path, img_size: int) -> dict[str, Callable[[np.ndarray], object]]:
    """One callable per backend, each scoring a normalised float batch (numpy)."""
    from skinlesion.device import autocast, retain_freed_memory
    from skinlesion.inference.onnx_backend import OnnxBackend
    from skinlesion.model import checkpoint

    retain_freed_memory()  # as `evaluate` and `predict` do on the CPU (ONNX Runtime has its own arena)
    model = checkpoint.load(run_dir).model.float().eval()
    model_cl = checkpoint.load(run_dir).model.float().eval().to(memory_format=torch.channels_last)
    fp32, int8 = OnnxBackend(run_dir).session, OnnxBackend(run_dir, int8=True).session

    @torch.inference_mode()
    def eager(x: np.ndarray) -> object:
        return model(torch.from_numpy(x))

    @torch.inference_mode()
    def bf16(x: np.ndarray) -> object:
        with autocast(torch.device("cpu"), torch.bfloat16):
            return model_cl(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    return {"PyTorch eager fp32": eager, "PyTorch bf16 channels_last": bf16,
            "ORT fp32": lambda x: fp32.run(None, {"input": x}), "ORT INT8": lambda x: int8.run(None, {"input": x})}


def images_per_s(fns: dict[str, Callable[[np.ndarray], object]], img_size: int, batch: int, rounds: int,
                 min_seconds: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Best-round images/s of each callable on one random batch (the product's timing, `export --int8` uses it)."""
    from skinlesion.inference.timing import images_per_s as timed

    x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size)).astype(np.float32)
    return timed(fns, x, rounds, min_seconds)


def make_int8_run(run_dir: Path, backbone: str, img_size: int) -> None:
    """best.pt (random weights), model.onnx, model.int8.onnx calibrated on the bundled HAM10000 sample."""
    from bench_infer import make_run

    from skinlesion.data.ham10000 import sample_dir
    from skinlesion.data.preprocessing import Preprocessing
    from skinlesion.inference import quantize
    from skinlesion.inference.onnx_export import add_metadata, export_onnx, props_of

    make_run(run_dir, backbone, img_size)
    fp32 = export_onnx(run_dir)[0]
    files = sorted((sample_dir() / "images").glob("*.jpg"))
    preprocessing = Preprocessing.from_meta(props_of(fp32.read_bytes()))
    graph = quantize.quantize_file(fp32, quantize.CalibrationImages(files, preprocessing))
    meta = quantize.int8_metadata(props_of(fp32.read_bytes()), "", len(files), quantize.REDUCE_RANGE)
    quantize.write(quantize.int8_path(fp32), add_metadata(graph, meta))


def model_table(rounds: int) -> None:
    from skinlesion.model import checkpoint

    measured = {}
    peak = matmul_peak_gflops()
    for backbone, size in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp)
            make_int8_run(run, backbone, size)
            gflops = model_gflops(checkpoint.load(run).model.eval(), size)
            fns = runners(run, size)
            measured[backbone, size] = gflops, {b: images_per_s(fns, size, b, rounds) for b in BATCHES}
        peak = max(peak, matmul_peak_gflops())  # measured between the models too: on a shared machine, the best
    print(f"\n## CPU inference vs the machine's peak: fp32 matmul peak {peak:.1f} GFLOP/s (torch.mm 2048, best of "
          f"{len(MODELS) + 1} measurements, {torch.get_num_threads()} threads)")  # fmt: skip
    ort_fp32, ort_int8 = ort_gemm_peaks()
    print(f"ONNX Runtime 2048 x 2048 product: fp32 {ort_fp32:.1f} GFLOP/s, u8 x s8 {ort_int8:.1f} GOP/s: INT8 can "
          f"gain at most {ort_int8 / ort_fp32:.2f}x over fp32 on this CPU")  # fmt: skip
    for (backbone, size), (gflops, speed) in measured.items():
        print(f"\n### {backbone} at {size} px: {gflops:.3f} GFLOPs per image; best of {rounds} alternating rounds")
        print(f"{'backend':28}{'b1 img/s':>10}{'b32 img/s':>11}{'b32 % of peak':>15}{'b32 vs ORT fp32':>17}")
        for name in speed[1]:
            b1, b32 = speed[1][name], speed[32][name]
            share = 100 * gflops * b32 / peak
            print(f"{name:28}{b1:10.1f}{b32:11.1f}{share:14.1f}%{b32 / speed[32]['ORT fp32']:16.2f}x")


def evaluate_times(run: Path, rounds: int, backends: tuple[str, ...] = ("torch", "onnx", "onnx-int8")) -> None:
    """Wall time of `skinlesion evaluate --tta --backend B` on a copy of ``run`` (its files are left alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("last.pt", "tensorboard", "eval_*", "figures"))
        print(f"\n## `skinlesion evaluate --tta --backend B --run-dir {run}` wall time (s), {rounds} round(s)")
        best = dict.fromkeys(backends, float("inf"))
        for r in range(rounds):
            for backend in backends if r % 2 == 0 else backends[::-1]:
                cmd = [sys.executable, "-m", "skinlesion", "evaluate", "--run-dir", str(copy), "--tta", "--backend",
                       backend]  # fmt: skip
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if proc.returncode != 0:
                    sys.exit(f"evaluate --backend {backend} failed:\n{proc.stderr[-2000:]}")
                summary = [line for line in proc.stdout.splitlines() if "images," in line]
                print(f"  round {r} {backend:10s} {seconds:8.1f} s  {summary[0] if summary else ''}", flush=True)
                best[backend] = min(best[backend], seconds)
        print("  best: " + ", ".join(f"{b} {s:.1f} s" for b, s in best.items()) + "; torch / " +
              ", torch / ".join(f"{b} {best['torch'] / best[b]:.2f}x" for b in backends if b != "torch"))  # fmt: skip
