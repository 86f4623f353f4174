"""Inference speed: PyTorch eager vs ONNX Runtime, and the web server under a bounded local load.

    python benchmarks/bench_infer.py [--img-size 224] [--runs 50] [--requests 200] [--duration 30]
        [--ensembles 1,3,5] [--only-ensembles]
    python benchmarks/bench_infer.py --cpu [--rounds 3] [--eval-run RUN] [--eval-rounds 1]

``--cpu``: PyTorch eager fp32, PyTorch bf16 channels_last, ONNX Runtime fp32 and INT8 side by side at batch 1 and 32
(efficientnet_b0 at 224 px, tf_efficientnet_lite0 at 128 px), each as a share of the machine's measured matmul
peak; with ``--eval-run`` also `evaluate --tta` wall time per backend (benchmarks/cpu_table.py).

Builds an efficientnet_b0 checkpoint with random weights (speed does not depend on them) in a
temporary run folder, exports it with ``skinlesion export``, then prints side by side:
single-image latency p50/p95 and batch-32 images/s for both backends; and requests/s and
latency of ``POST /api/predict`` for ``skinlesion serve --backend torch|onnx`` on 127.0.0.1,
loaded by ``--concurrency`` client threads for a fixed request count, stopped early at ``--duration``.
First, ensembles of 1, 3 and 5 such members (``skinlesion ensemble``'s code): batch-1 latency with both
backends and the resident memory each adds. Loopback only; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import timm
import torch
from PIL import Image

from skinlesion.data.preprocessing import Preprocessing
from skinlesion.inference.onnx_backend import OnnxBackend
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.model import checkpoint

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000_originals"


def make_run(run_dir: Path, backbone: str, img_size: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=7).eval()
    meta = dict(
        backbone=backbone,
        **checkpoint.preprocessing_entries(Preprocessing.for_training(img_size)),
        epoch=0,
        metrics={},
        config={},
        splits_sha256="",
    )
    checkpoint.save(run_dir / "best.pt", model, meta)


PEAK_RSS = """
import sys, torch
from pathlib import Path
run, backend, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def hwm():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
base = hwm()
x = torch.randn(1, 3, size, size)
if backend == "torch":
    from skinlesion.model import checkpoint
    model = checkpoint.load(run).model
    with torch.inference_mode():
        model(x)
else:
    from skinlesion.inference.onnx_backend import OnnxBackend
    session = OnnxBackend(run).session
    session.run(None, {"input": x.numpy()})
print(hwm() - base)
"""


def peak_rss_mib(run: Path, backend: str, img_size: int) -> float:
    """Peak resident memory a fresh process adds to load the model and score one image (Linux; nan elsewhere)."""
    if not Path("/proc/self/status").exists():
        return float("nan")
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(run), backend, str(img_size)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def make_member(run_dir: Path, backbone: str, img_size: int, seed: int) -> Path:
    """A run folder `skinlesion ensemble` accepts: best.pt (random weights), config.json, a one-row splits.csv."""
    torch.manual_seed(seed)
    make_run(run_dir, backbone, img_size)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "splits.csv").write_text("image_id,lesion_id,dx,split\nx,l,nv,val\n")
    return run_dir


def bench_ensembles(tmp: Path, backbone: str, img_size: int, sizes: list[int], runs: int) -> None:
    """Batch-1 latency of both backends and the peak memory loading an ensemble of n members and scoring one image
    adds to a fresh process, through the product's ensemble (model/ensemble_run.write -> checkpoint.load,
    export_onnx -> OnnxBackend)."""
    from skinlesion.model import ensemble_run

    members = [make_member(tmp / f"member{i}", backbone, img_size, i) for i in range(max(sizes))]
    x1 = torch.randn(1, 3, img_size, img_size)
    print(f"\n## ensembles of {backbone} (members' logits averaged in one graph), batch 1")
    print(f"{'members':>8}{'torch p50 ms':>14}{'onnx p50 ms':>13}{'torch peak MiB':>16}{'onnx peak MiB':>15}"
          f"{'model.onnx MB':>15}")  # fmt: skip
    for n in sizes:
        run = tmp / f"ensemble{n}"
        ensemble_run.write(members[:n], run)
        model = checkpoint.load(run).model

        def torch_run(model=model):
            with torch.inference_mode():
                model(x1)

        torch_ms = float(np.percentile(timings(torch_run, runs), 50)) * 1000
        del model
        export_onnx(run)
        session = OnnxBackend(run).session
        onnx_ms = float(np.percentile(timings(lambda s=session: s.run(None, {"input": x1.numpy()}), runs), 50)) * 1000
        del session
        torch_mem, onnx_mem = (peak_rss_mib(run, b, img_size) for b in ("torch", "onnx"))
        size = (run / "model.onnx").stat().st_size / 1e6
        print(f"{n:8d}{torch_ms:14.1f}{onnx_ms:13.1f}{torch_mem:16.0f}{onnx_mem:15.0f}{size:15.1f}")


def timings(fn, runs: int, warmup: int = 5) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return np.array(out)


def bench_backends(run_dir: Path, img_size: int, runs: int) -> dict[str, dict[str, float]]:
    model = checkpoint.load(run_dir).model
    session = OnnxBackend(run_dir).session
    x1, x32 = torch.randn(1, 3, img_size, img_size), torch.randn(32, 3, img_size, img_size)

    def torch_run(x):
        with torch.inference_mode():
            model(x)

    def onnx_run(x):
        session.run(None, {"input": x.numpy()})

    results = {}
    for name, run in (("PyTorch eager", torch_run), ("ONNX Runtime", onnx_run)):
        single = timings(lambda run=run: run(x1), runs) * 1000
        batch = timings(lambda run=run: run(x32), max(3, runs // 10), warmup=2)
        results[name] = {
            "p50_ms": float(np.percentile(single, 50)),
            "p95_ms": float(np.percentile(single, 95)),
            "batch32_img_s": 32 / float(np.median(batch)),
        }
    return results


def sample_jpeg(img_size: int) -> bytes:
    """A 224-px (img_size) JPEG: a real HAM10000 image when ../shared is present, else noise."""
    files = sorted(SAMPLE.glob("**/*.jpg"))
    if files:
        image = Image.open(files[0]).convert("RGB")
    else:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (450, 600, 3), dtype=np.uint8))
    image = image.resize((img_size * image.width // image.height, img_size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(
    run_dir: Path, backend: str, payload: bytes, requests: int, duration: float, concurrency: int, cam: bool = False
) -> dict[str, float]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "skinlesion",
        "serve",
        "--run-dir",
        str(run_dir),
        "--port",
        str(port),
        "--backend",
        backend,
        "--log-level",
        "warning",
    ]
    from bench_serve_soak import wait_healthy  # the sibling script's wait for /api/health

    log = run_dir / f"serve-{backend}.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, log, timeout=120)
        with httpx.Client() as c:  # warm-up
            for _ in range(3):
                c.post(f"{url}/api/predict", params={"cam": cam}, files={"file": ("x.jpg", payload, "image/jpeg")})

        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        remaining = [requests]
        stop_at = time.monotonic() + duration

        def worker():
            with httpx.Client(timeout=60) as c:
                while time.monotonic() < stop_at:
                    with lock:
                        if remaining[0] == 0:
                            return
                        remaining[0] -= 1
                    t = time.perf_counter()
                    r = c.post(
                        f"{url}/api/predict", params={"cam": cam}, files={"file": ("x.jpg", payload, "image/jpeg")}
                    )
                    dt = time.perf_counter() - t
                    with lock:
                        latencies.append(dt)
                        errors[0] += r.status_code != 200

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    lat = np.array(latencies) * 1000
    return {
        "requests": len(lat),
        "errors": errors[0],
        "req_s": len(lat) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
    }


def cpu_name() -> str:
    """The CPU model (the name `export --int8` stores) and its vector extensions that matter for int8 / bf16."""
    from skinlesion.inference.timing import cpu_model

    info = Path("/proc/cpuinfo")
    if not info.exists():
        return cpu_model()
    text = info.read_text()
    name = cpu_model()
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return f"{name} ({' '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet_b0")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=50, help="single-image timings per backend")
    ap.add_argument("--requests", type=int, default=200, help="requests per server load test")
    ap.add_argument("--duration", type=float, default=30.0, help="cap on each load test, seconds")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--cam-requests", type=int, default=20, help="requests with ?cam=true (0 to skip)")
    ap.add_argument("--ensembles", default="1,3,5", help="ensemble sizes to time ('' to skip)")
    ap.add_argument("--only-ensembles", action="store_true", help="skip the single-model and server parts")
    ap.add_argument("--cpu", action="store_true", help="only the CPU table: 4 backends vs the machine's peak")
    ap.add_argument("--rounds", type=int, default=3, help="with --cpu: alternating timed rounds")
    ap.add_argument("--eval-run", help="with --cpu: also time `evaluate --tta` per backend on this run folder")
    ap.add_argument("--eval-rounds", type=int, default=1, help="with --eval-run: rounds per backend")
    args = ap.parse_args()
    if args.cpu:
        from cpu_table import evaluate_times, model_table

        print(f"# CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
              f"threads), onnxruntime {ort_version()}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        model_table(args.rounds)
        if args.eval_run:
            evaluate_times(Path(args.eval_run), args.eval_rounds)
        return

    print(
        f"# {args.backbone} at {args.img_size} px, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [int(n) for n in args.ensembles.split(",") if n.strip()]
        if sizes:
            bench_ensembles(Path(tmp), args.backbone, args.img_size, sizes, max(10, args.runs // 2))
        if args.only_ensembles:
            return
        run_dir = Path(tmp) / "bench"
        make_run(run_dir, args.backbone, args.img_size)
        export_onnx(run_dir)

        res = bench_backends(run_dir, args.img_size, args.runs)
        torch_r, onnx_r = res["PyTorch eager"], res["ONNX Runtime"]
        print("\n## model only (preprocessed tensors)")
        print(f"{'':24}{'PyTorch eager':>15}{'ONNX Runtime':>15}{'ONNX / PyTorch':>16}")
        print(
            f"{'batch 1 p50 latency ms':24}{torch_r['p50_ms']:15.2f}{onnx_r['p50_ms']:15.2f}"
            f"{torch_r['p50_ms'] / onnx_r['p50_ms']:15.2f}x"
        )
        print(
            f"{'batch 1 p95 latency ms':24}{torch_r['p95_ms']:15.2f}{onnx_r['p95_ms']:15.2f}"
            f"{torch_r['p95_ms'] / onnx_r['p95_ms']:15.2f}x"
        )
        print(
            f"{'batch 32 images/s':24}{torch_r['batch32_img_s']:15.1f}{onnx_r['batch32_img_s']:15.1f}"
            f"{onnx_r['batch32_img_s'] / torch_r['batch32_img_s']:15.2f}x"
        )

        payload = sample_jpeg(args.img_size)
        print(
            f"\n## server: POST /api/predict, {len(payload) / 1024:.0f} kB JPEG, concurrency {args.concurrency}, "
            f"up to {args.requests} requests / {args.duration:g} s each, 127.0.0.1"
        )
        print(f"{'serve --backend':24}{'requests':>10}{'errors':>8}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}")
        rows = [("torch", False, args.requests), ("onnx", False, args.requests)]
        if args.cam_requests:
            rows.append(("onnx", True, args.cam_requests))
        for backend, cam, n in rows:
            r = load_test(run_dir, backend, payload, n, args.duration, args.concurrency, cam)
            label = backend + (" + ?cam=true" if cam else "")
            print(
                f"{label:24}{r['requests']:10d}{r['errors']:8d}{r['req_s']:10.1f}{r['p50_ms']:10.1f}{r['p95_ms']:10.1f}"
            )


if __name__ == "__main__":
    main()
