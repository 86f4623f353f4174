"""Data-loader throughput: decoding the original images every epoch vs reading the image cache.

    python benchmarks/bench_data.py [--data-dir ../shared/data/ham10000_originals] [--img-size 224]
                                    [--batch-size 32] [--workers 2] [--rounds 5] [--torch-threads N]
                                    [--paths originals,cache] [--max-images N] [--device cpu]
                                    [--cache-dir DIR] [--json FILE]

Both paths are the product's: the same DataLoader `skinlesion train` builds (shuffled batches of --batch-size,
--workers processes) over every image of the folder (or the first --max-images of it, in a seeded shuffle), with
the run's ``Preprocessing`` and training preset at --img-size (uint8 crops out of the workers), then
``BatchNormalizer`` on each batch in the main process, on --device:

* ``originals``: each image decoded and resized by the preprocessing every epoch (``train --no-cache``);
* ``cache``: the preprocessing's pixels read from the image cache (the default; the same pixels, bit for bit).

The main-process step (``BatchNormalizer``: float conversion and Normalize) is timed separately (``step_cpu_s``:
CPU seconds of this process inside it, the device synchronised).

After one untimed warm-up epoch each (worker start-up, JPEGs into the page cache, memory maps), the paths
alternate epoch by epoch for --rounds rounds, and each path's best epoch is kept (other jobs on a shared machine
only ever slow an epoch down). Measured per epoch:

* ``wall_s``: wall-clock seconds -> images/s;
* ``worker_cpu_s``: CPU seconds (all threads) the loader worker processes used, read from /proc/<pid>/task/*/
  schedstat (ns; else /proc/<pid>/stat, else psutil) before and after the epoch; with --workers 0 the loading
  runs in this process: its CPU time over the epoch minus the main-process step -> images per worker-CPU-second,
  the figure that says how many cores the loader needs for a given GPU speed;
* ``main_cpu_s``: CPU seconds of this process over the epoch (iteration, pin-memory thread, the step);
* ``step_cpu_s``: CPU seconds of this process inside the main-process step (BatchNormalizer).

The cache is built into --cache-dir (default: a temporary folder; never the data folder) first; its build time is
printed. The last line is ``cache vs originals: N.NNx`` (images per second).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from skinlesion.data.cache import ImageCache
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.ham10000 import load_table
from skinlesion.data.preprocessing import Preprocessing

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000_originals"
PATHS = ("originals", "cache")
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ------------------------------------------------------------------------------------------- CPU time
def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of process ``pid`` (all its threads); None where it cannot be read. Nanoseconds from
    /proc/<pid>/task/*/schedstat where the kernel keeps them, else clock ticks (10 ms) from /proc/<pid>/stat,
    else psutil."""
    try:
        total = 0
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"{task.path}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15 of stat)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        return None


def worker_pids(dl: DataLoader) -> list[int]:
    """Pids of a persistent DataLoader's worker processes (after its first epoch). DataLoader has no public
    accessor; ``_iterator._workers`` has been its layout for years."""
    iterator = getattr(dl, "_iterator", None)
    return [w.pid for w in getattr(iterator, "_workers", [])]


def workers_cpu_seconds(pids: list[int]) -> float | None:
    times = [process_cpu_seconds(p) for p in pids]
    return None if any(t is None for t in times) else sum(times)


# ------------------------------------------------------------------------------------------- loaders
def loader(dataset: LesionDataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )  # fmt: skip


def build_loaders(
    table, cache: ImageCache, preprocessing: Preprocessing, batch_size: int, workers: int, paths: tuple[str, ...],
    pin_memory: bool = False,
) -> dict[str, DataLoader]:  # fmt: skip
    """The training loader of each path: the reference preset over the preprocessing's pixels (cached or decoded)."""
    preset = preprocessing.train_transform("reference")
    sources = {"originals": None, "cache": cache}
    return {p: loader(LesionDataset(table, preprocessing, preset, sources[p]), batch_size, workers, pin_memory)
            for p in paths}  # fmt: skip


def run_epoch(dl: DataLoader, step: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> dict[str, Any]:
    """One pass over ``dl``; wall, worker, main-process and step times (see the module doc)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pids = worker_pids(dl)  # persistent workers: known after the warm-up epoch
    w0 = workers_cpu_seconds(pids) if pids else None
    m0 = time.process_time()
    step_cpu = 0.0
    images = 0
    start = time.perf_counter()
    for x, _ in dl:
        s0 = time.process_time()
        step(x)
        sync()
        step_cpu += time.process_time() - s0
        images += len(x)
    wall = time.perf_counter() - start
    main_cpu = time.process_time() - m0
    if dl.num_workers == 0:
        worker_cpu = main_cpu - step_cpu  # loading ran here
    else:
        w1 = workers_cpu_seconds(pids) if pids else None
        worker_cpu = None if w0 is None or w1 is None else w1 - w0
    return {"images": images, "wall_s": wall, "worker_cpu_s": worker_cpu, "main_cpu_s": main_cpu,
            "step_cpu_s": step_cpu}  # fmt: skip


def summarise(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure from the path's best epoch for it (fastest wall, fewest worker CPU seconds, ...)."""
    n = epochs[0]["images"]

    def best(key: str) -> float | None:
        values = [e[key] for e in epochs if e[key] is not None]
        return min(values) if values else None

    wall, worker, step, main = best("wall_s"), best("worker_cpu_s"), best("step_cpu_s"), best("main_cpu_s")
    incl = [e["worker_cpu_s"] + e["step_cpu_s"] for e in epochs if e["worker_cpu_s"] is not None]
    return {
        "images": n,
        "best_wall_s": wall,
        "images_per_s": n / wall,
        "best_worker_cpu_s": worker,
        "images_per_worker_cpu_s": n / worker if worker else None,
        "best_step_cpu_s": step,
        "best_main_cpu_s": main,
        "images_per_cpu_s_incl_step": n / min(incl) if incl and min(incl) > 0 else None,
        "epochs": epochs,
    }


def compare(
    loaders: dict[str, DataLoader], steps: dict[str, Callable], device: torch.device, rounds: int
) -> dict[str, dict[str, Any]]:
    """Warm-up epoch each, then the paths alternate epoch by epoch for ``rounds`` rounds."""
    for name, dl in loaders.items():
        run_epoch(dl, steps[name], device)
    epochs: dict[str, list[dict[str, Any]]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, dl in loaders.items():
            epochs[name].append(run_epoch(dl, steps[name], device))
    return {name: summarise(e) for name, e in epochs.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def measure(
    data_dir: str | Path,
    img_size: int = 224,
    batch_size: int = 32,
    workers: int = 1,
    rounds: int = 5,
    paths: tuple[str, ...] = PATHS,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    max_images: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build (or open) the cache, run the paths side by side; a JSON-able result (``report`` prints it)."""
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown path(s) {sorted(unknown)}; choose from {PATHS}")
    torch.manual_seed(seed)
    dev = torch.device(device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    table = load_table(str(data_dir))
    if max_images and max_images < len(table):
        table = table.sample(n=max_images, random_state=seed).reset_index(drop=True)
    preprocessing = Preprocessing.for_training(img_size)
    with tempfile.TemporaryDirectory() if cache_dir is None else nullcontext(str(cache_dir)) as where:
        start = time.perf_counter()
        cache = ImageCache.open_or_build(table, preprocessing, cache_dir=where, progress=False)
        build_s = time.perf_counter() - start
        loaders = build_loaders(table, cache, preprocessing, batch_size, workers, paths, dev.type == "cuda")
        normalize = preprocessing.normalizer(dev, torch.channels_last)
        steps = dict.fromkeys(paths, normalize)
        results = compare(loaders, steps, dev, rounds)
        del loaders  # persistent workers end before the temporary cache goes
    with Image.open(table["path"].iloc[0]) as first:
        size = f"{first.width}x{first.height}"
    get = lambda p, k: results.get(p, {}).get(k)  # noqa: E731
    return {
        "data_dir": str(data_dir),
        "images": len(table),
        "first_image_size": size,
        "img_size": img_size,
        "batch_size": batch_size,
        "workers": workers,
        "rounds": rounds,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "cache_build_s": build_s,
        "cache_mib": cache.nbytes / 2**20,
        "cache_short_side": preprocessing.resize_size,
        "paths": results,
        "ratios": {"cache_vs_originals_images_per_s": ratio(get("cache", "images_per_s"),
                                                            get("originals", "images_per_s"))},
    }


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        f"data: {r['data_dir']} ({r['images']} images, first one {r['first_image_size']})",
        f"loader: train transform at {r['img_size']}, batch {r['batch_size']}, {r['workers']} workers, "
        f"{r['torch_threads']} torch threads in this process, main-process step on {r['device']}, "
        f"best of {r['rounds']} epochs each; load average before {_f(r['load_average_before'], '.1f')}",
        f"cache build (once): {r['cache_build_s']:.1f} s, {r['cache_mib']:.0f} MiB at short side "
        f"{r['cache_short_side']}",
        f"{'path':<11}{'images/s':>10}{'worker CPU s':>14}{'img/worker-CPU-s':>18}{'step CPU s':>12}"
        f"{'img/CPU-s incl step':>21}",
    ]
    for name, p in r["paths"].items():
        lines.append(
            f"{name:<11}{p['images_per_s']:>10.1f}{_f(p['best_worker_cpu_s'], '.2f'):>14}"
            f"{_f(p['images_per_worker_cpu_s'], '.1f'):>18}{p['best_step_cpu_s']:>12.3f}"
            f"{_f(p['images_per_cpu_s_incl_step'], '.1f'):>21}"
        )
    ratio_ = r["ratios"]["cache_vs_originals_images_per_s"]
    if ratio_ is not None:
        lines.append(f"cache vs originals: {ratio_:.2f}x (images/s; target >= 5x on full-size JPEGs)")
    return lines


def parse_paths(text: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PATHS)}, got {text!r}")
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--torch-threads", type=int, help="torch intra-op threads of this process (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5, help="timed epochs per path (best one reported)")
    ap.add_argument("--paths", type=parse_paths, default=PATHS, help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--max-images", type=int, help="use this many images of the folder (seeded sample)")
    ap.add_argument("--device", default="cpu", help="where the main-process step sends batches (cpu, cuda)")
    ap.add_argument("--cache-dir", help="image cache root (default: a temporary folder, removed afterwards)")
    ap.add_argument("--json", metavar="FILE", help="also write the results (every epoch) as JSON")
    args = ap.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    result = measure(
        args.data_dir, args.img_size, args.batch_size, args.workers, args.rounds, args.paths, args.device,
        args.cache_dir, args.max_images,
    )  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(report(result)))
    return result


if __name__ == "__main__":
    main()
