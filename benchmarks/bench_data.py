"""Data-loader throughput: decoding the original JPEGs vs reading the image cache.

    python benchmarks/bench_data.py [--data-dir ../shared/data/ham10000_originals] [--img-size 224]
                                    [--batch-size 32] [--workers 2] [--rounds 5] [--torch-threads N]

Both paths run the same DataLoader (training transform at --img-size, shuffled batches of
--batch-size, --workers processes) over every image of the folder. After one untimed warm-up
epoch each (worker start-up, JPEGs into the page cache), the two paths alternate epoch by epoch
and each one's fastest epoch is reported. The cache is built into a temporary folder first (its
build time is printed). Prints images/s of each path, side by side, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from skinlesion.data.cache import ImageCache, cache_short_side
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.ham10000 import load_table
from skinlesion.data.transforms import train_transform

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000_originals"


def loader(dataset: LesionDataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0)


def epoch_seconds(loader: DataLoader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def best_images_per_s(loaders: dict[str, DataLoader], rounds: int) -> dict[str, float]:
    """Alternate the paths epoch by epoch and keep each one's fastest epoch: on a shared machine
    other jobs only ever slow an epoch down, so the best one is the least disturbed measurement."""
    for dl in loaders.values():
        epoch_seconds(dl)  # warm-up: worker start, page cache, lazy memory maps
    best = dict.fromkeys(loaders, float("inf"))
    for _ in range(rounds):
        for name, dl in loaders.items():
            best[name] = min(best[name], epoch_seconds(dl))
    return {name: len(dl.dataset) / best[name] for name, dl in loaders.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--torch-threads", type=int, help="torch intra-op threads of this process (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5, help="timed epochs per path (best one reported)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    load_before = os.getloadavg()[0]
    table = load_table(args.data_dir)
    short = cache_short_side(args.img_size)
    transform = train_transform(args.img_size, short)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = ImageCache.open_or_build(table, short, cache_dir=tmp, progress=False)
        build_s = time.perf_counter() - start
        speed = best_images_per_s(
            {
                "originals": loader(LesionDataset(table, transform), args.batch_size, args.workers),
                "cache": loader(LesionDataset(table, transform, cache), args.batch_size, args.workers),
            },
            args.rounds,
        )
        original, cached = speed["originals"], speed["cache"]

    with Image.open(table["path"][0]) as first:
        size = f"{first.width}x{first.height}"
    print(f"data: {args.data_dir} ({len(table)} images, first one {size})")
    print(
        f"loader: train transform at {args.img_size}, batch {args.batch_size}, {args.workers} workers, "
        f"{torch.get_num_threads()} torch threads in this process, best of {args.rounds} epochs each; "
        f"load average before {load_before:.1f}"
    )
    print(f"cache build (once): {build_s:.1f} s, {cache.nbytes / 2**20:.0f} MiB at short side {short}")
    print(f"{'path':<12}{'images/s':>10}")
    print(f"{'originals':<12}{original:>10.1f}")
    print(f"{'cache':<12}{cached:>10.1f}")
    print(f"ratio cache/originals: {cached / original:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
