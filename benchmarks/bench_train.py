"""Training throughput on this machine: plain fp32 eager vs the project's default path.

    python benchmarks/bench_train.py [--backbone efficientnet_b0] [--img-size 224] [--batch-size 32] [--iters 5]

"plain" = fp32, contiguous (NCHW) memory format, eager. "default" = what `skinlesion train` does by
default: channels_last, plus bf16 autocast where the CPU (or GPU) supports it. Random data, AdamW,
cross-entropy; a warm-up iteration per path is not timed. Prints images/s for each, the ratio and the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_b0")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
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
