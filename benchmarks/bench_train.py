"""Training throughput on this machine: plain fp32 eager vs the project's default path; or, with
``--before REF``, the whole `skinlesion train` loop of this checkout against the one of git REF.

    python benchmarks/bench_train.py [--backbone efficientnet_b0] [--img-size 224] [--batch-size 32] [--iters 5]
    python benchmarks/bench_train.py --before HEAD~3 [--data-dir DIR] [--batches 15] [--workers 2] [--rounds 3]
    python benchmarks/bench_train.py --vs-timm [--data-dir DIR] [--images 400] [--epochs 2] [--workers 2]
        [--rounds 3] [--timm-train-py PATH] [--timm-flags="--amp --amp-dtype bfloat16 --channels-last"]

"plain" = fp32, contiguous (NCHW) memory format, eager. "default" = what `skinlesion train` does by
default: channels_last, plus bf16 autocast where the CPU (or GPU) supports it. Both run the product's own step
(training/step.train_step on the optimizer, schedule, loss and normaliser training/builders makes for the reference
recipe) on random uint8 batches; a warm-up iteration per path is not timed. Prints images/s for each, the ratio
and the peak RSS.

``--before REF`` checks that a change to the loop (data loading included) made nothing slower: REF's source is
exported to a temporary folder (git archive) and both run the same `python -m skinlesion train` command (Lite0 at
128 px, the bundled sample by default, one epoch of --batches batches), alternating round by round; each side's
best round of training images/s (history.csv) is reported, then ``after/before: N.NN×``.

``--vs-timm``: `skinlesion train` against timm's own train.py (pinned commit, the installed timm) on the same
images, split into start-up, first epoch and steady-state epoch (benchmarks/vs_timm.py).
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

import torch

from skinlesion.device import amp_dtype, resolve_device


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)


def images_per_s(backbone: str, img_size: int, batch_size: int, device: torch.device, channels_last: bool,
                 amp: bool, iters: int, warmup: int) -> float:  # fmt: skip
    """Training images/s of the reference recipe's step (train_step) with these switches, on random uint8 batches."""
    import numpy as np

    from skinlesion.training import builders, distributed
    from skinlesion.training.recipes import REFERENCE
    from skinlesion.training.step import train_step

    config = REFERENCE.replace(backbone=backbone, pretrained=False, img_size=img_size, batch_size=batch_size,
                               channels_last=channels_last, amp=amp)  # fmt: skip
    torch.manual_seed(0)
    model, _ = builders.build_model(config, 7, load_weights=False)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    preprocessing = builders.preprocessing_of(config, model)
    stepper = builders.build_stepper(config, model, preprocessing, np.ones(7), iters + warmup,
                                     distributed.Dist(device=device))  # fmt: skip
    model.train()
    x = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8)
    y = torch.randint(0, 7, (batch_size,))
    for _ in range(warmup):
        train_step(stepper, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        train_step(stepper, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * batch_size / (time.perf_counter() - start)


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
    p.add_argument("--rounds", type=int, default=3, help="with --before / --vs-timm: timed rounds per side")
    p.add_argument("--vs-timm", action="store_true", help="skinlesion train vs timm's train.py (see above)")
    p.add_argument("--images", type=int, default=400, help="with --vs-timm: images used (lesion-grouped 80/20)")
    p.add_argument("--epochs", type=int, default=2, help="with --vs-timm: epochs")
    p.add_argument("--timm-train-py", help="with --vs-timm: a local train.py (default: fetched at the pinned commit)")
    p.add_argument("--timm-flags", help="with --vs-timm: timm's precision / layout flags, one string (write "
                   "--timm-flags=\"...\"); default: --amp --amp-dtype bfloat16 --channels-last where the CPU does "
                   "bf16 natively, else --channels-last")  # fmt: skip
    a = p.parse_args()
    if a.vs_timm:
        sys.path.insert(0, str(Path(__file__).parent))
        from vs_timm import compare

        compare(a)
        return
    if a.before:
        if a.img_size == 224 and "--img-size" not in sys.argv:
            a.img_size = 128
        compare_loops(a)
        return
    device = resolve_device(a.device)
    dtype = amp_dtype(device)
    print(
        f"{a.backbone} {a.img_size}px batch {a.batch_size} on {device} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; default autocast dtype: {dtype}"
    )
    results = {}
    for name, cl, amp in (("plain fp32 NCHW eager", False, False), ("default channels_last + amp", True, True)):
        results[name] = images_per_s(a.backbone, a.img_size, a.batch_size, device, cl, amp, a.iters, a.warmup)
        print(f"  {name:32s} {results[name]:8.1f} images/s   peak RSS so far {peak_rss_mib():7.0f} MiB", flush=True)
    plain, default = results.values()
    print(f"  ratio default/plain: {default / plain:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
