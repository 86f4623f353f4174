"""Training throughput on this machine: plain fp32 eager vs the project's default path; or, with
``--before REF``, the whole `skinlesion train` loop of this checkout against the one of git REF.

    python benchmarks/bench_train.py [--backbone efficientnet_b0] [--img-size 224] [--batch-size 32] [--iters 5]
    python benchmarks/bench_train.py --before HEAD~3 [--data-dir DIR] [--batches 15] [--workers 2] [--rounds 3]

"plain" = fp32, contiguous (NCHW) memory format, eager. "default" = what `skinlesion train` does by
default: channels_last, plus bf16 autocast where the CPU (or GPU) supports it. Random data, AdamW,
cross-entropy; a warm-up iteration per path is not timed. Prints images/s for each, the ratio and the peak RSS.

``--before REF`` checks that a change to the loop (data loading included) made nothing slower: REF's source is
exported to a temporary folder (git archive) and both run the same `python -m skinlesion train` command (Lite0 at
128 px, the bundled sample by default, one epoch of --batches batches), alternating round by round; each side's
best round of training images/s (history.csv) is reported, then ``after/before: N.NN×``.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from skinlesion.device import resolve_device
from skinlesion.training.loop import amp_dtype


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)


def images_per_s(model, x, y, channels_last: bool, dtype: torch.dtype | None, iters: int, warmup: int) -> float:
    device = x.device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    x = x.contiguous(memory_format=memory_format)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - start)


REPO = Path(__file__).resolve().parents[1]


def loop_images_per_s(src: Path, args: argparse.Namespace, out: Path, cache: Path) -> float:
    """One `skinlesion train` epoch of ``args.batches`` batches with the package at ``src``; its train images/s."""
    import pandas as pd

    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "SKINLESION_CACHE_DIR": str(cache)}
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    cmd = [sys.executable, "-m", "skinlesion", "train", *data, "--out", str(out), "--run-name", "bench",
           "--backbone", "tf_efficientnet_lite0", "--weights", "lite0", "--img-size", str(args.img_size),
           "--batch-size", str(args.batch_size), "--epochs", "1", "--max-train-batches", str(args.batches),
           "--workers", str(args.workers), "--logger", "none"]  # fmt: skip
    out.mkdir(parents=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    if proc.returncode != 0:
        sys.exit(f"train failed with {src}:\n{proc.stderr[-2000:]}")
    return float(pd.read_csv(out / "bench" / "history.csv")["images_per_s"].iloc[0])


def compare_loops(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = subprocess.run(["git", "archive", args.before, "src"], cwd=REPO, capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp / "before", filter="data")
        sides = {"before": tmp / "before" / "src", "after": REPO / "src"}
        best = dict.fromkeys(sides, 0.0)
        print(f"`skinlesion train` one epoch of {args.batches} batches: Lite0 {args.img_size}px batch "
              f"{args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs; before = {args.before}, "
              "after = this checkout")
        for r in range(args.rounds + 1):  # round 0 builds the image cache and warms the page cache: not counted
            for name, src in sides.items():
                out = tmp / f"{name}{r}"
                speed = loop_images_per_s(src, args, out / "runs", tmp / "cache")
                if r:
                    best[name] = max(best[name], speed)
                    print(f"  round {r} {name:6s} {speed:7.1f} train images/s", flush=True)
        print(f"  best: before {best['before']:.1f}, after {best['after']:.1f} train images/s")
        print(f"after/before: {best['after'] / best['before']:.2f}× (target: not slower beyond the noise, >= 0.95×)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_b0")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--before", metavar="REF", help="compare the whole train loop with git REF's (see above)")
    p.add_argument("--data-dir", help="with --before: the data (default: the bundled sample)")
    p.add_argument("--batches", type=int, default=15, help="with --before: batches per timed epoch")
    p.add_argument("--workers", type=int, default=2, help="with --before: loader workers")
    p.add_argument("--rounds", type=int, default=3, help="with --before: timed rounds per side")
    a = p.parse_args()
    if a.before:
        if a.img_size == 224 and "--img-size" not in sys.argv:
            a.img_size = 128
        compare_loops(a)
        return
    device = resolve_device(a.device)
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, 3, a.img_size, a.img_size, device=device)
    y = torch.randint(0, 7, (a.batch_size,), device=device)
    dtype = amp_dtype(device)
    print(
        f"{a.backbone} {a.img_size}px batch {a.batch_size} on {device} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; default autocast dtype: {dtype}"
    )
    results = {}
    for name, cl, dt in (("plain fp32 NCHW eager", False, None), ("default channels_last + amp", True, dtype)):
        torch.manual_seed(0)
        model = timm.create_model(a.backbone, pretrained=False, num_classes=7)
        results[name] = images_per_s(model, x, y, cl, dt, a.iters, a.warmup)
        print(f"  {name:32s} {results[name]:8.1f} images/s   peak RSS so far {peak_rss_mib():7.0f} MiB", flush=True)
    plain, default = results.values()
    print(f"  ratio default/plain: {default / plain:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
