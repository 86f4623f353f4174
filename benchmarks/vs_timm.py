"""`bench_train.py --vs-timm`: `skinlesion train` against timm's own train.py on the same images, same CPU.

timm's train.py is not in the timm wheel or sdist; it is fetched from GitHub at ``TIMM_COMMIT`` (checked against
``TIMM_TRAIN_SHA256``) into the user cache folder when first needed, or taken from ``--timm-train-py``; it runs with
the installed timm. Nothing fetched is kept in the repository.

The images: ``--images`` of a HAM10000 folder, lesion-grouped 80/20 (skinlesion's own split, seed 42), written
twice into a work folder: a HAM10000 layout (metadata CSV + images) with its splits.csv for `skinlesion train
--splits`, and an ImageFolder copy (train/<dx>/, validation/<dx>/) for timm. Both train efficientnet_b0 from scratch
at the same size, batch and epochs; every output line is time-stamped as it arrives and split into:

- start-up: launch to the end of the first training step (imports, data, cache, model, loaders, first batch);
- epoch 1: the rest of the first epoch, with its validation and checkpoint writes;
- steady epoch: each later epoch (the mean over them);
- end: after the last epoch (post-hoc steps, shutdown).

Markers: timm prints ``Train: 0 [   0/N`` after its first step (``--log-interval`` is forced to a large value, so
only the first and last steps of an epoch log) and ``Current checkpoints:`` after each epoch's save; skinlesion's
progress bar shows ``epoch 1: ... 1/N`` after its first step and a line ``epoch E/EPOCHS  train loss`` after each
epoch's checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

TIMM_COMMIT = "aa4b5850c1543fa488abf260f18390eda46cf85d"  # huggingface/pytorch-image-models, Aug 2026 main
TIMM_TRAIN_SHA256 = "f0bb70b9e1c8c576eb1f7beba9cb46953d01ec1308d68c59ec055a6266f76388"
TIMM_URL = f"https://raw.githubusercontent.com/huggingface/pytorch-image-models/{TIMM_COMMIT}/train.py"
TIMM_BEST_CPU_FLAGS = ("--amp", "--amp-dtype", "bfloat16", "--channels-last")  # where the CPU does bf16 natively
TIMM_FP32_CPU_FLAGS = ("--channels-last",)  # elsewhere: bf16 is emulated there (~10x slower), skinlesion trains fp32


def best_timm_flags() -> tuple[str, ...]:
    """timm's fastest flags on this CPU: bf16 autocast where skinlesion itself would use it, else fp32."""
    import torch

    from skinlesion.device import amp_dtype

    return TIMM_BEST_CPU_FLAGS if amp_dtype(torch.device("cpu")) is not None else TIMM_FP32_CPU_FLAGS

TIMM_FIRST_STEP = re.compile(r"Train: 0 \[\s*0/")
TIMM_EPOCH_END = re.compile(r"Current checkpoints:")
SKINLESION_FIRST_STEP = re.compile(r"epoch 1:.*\b1/\d+")
SKINLESION_EPOCH_END = re.compile(r"epoch (\d+)/\d+\s+train loss")


def timm_train_py(given: str | None, cache_dir: Path) -> Path:
    """A local train.py: ``given``, or the pinned one (downloaded once into ``cache_dir``, hash checked)."""
    if given:
        return Path(given)
    target = cache_dir / f"timm-{TIMM_COMMIT[:12]}" / "train.py"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = urllib.request.urlopen(TIMM_URL, timeout=60).read()  # noqa: S310 - a fixed https URL
        except OSError as e:
            sys.exit(f"could not fetch timm's train.py ({e}); download {TIMM_URL} and pass --timm-train-py PATH")
        digest = hashlib.sha256(data).hexdigest()
        if digest != TIMM_TRAIN_SHA256:
            sys.exit(f"timm's train.py at {TIMM_COMMIT} has sha256 {digest}, expected {TIMM_TRAIN_SHA256}")
        target.write_bytes(data)
    return target


def same_images(data_dir: str | None, n_images: int, work: Path) -> tuple[Path, Path, Path]:
    """``n_images`` of ``data_dir`` (lesion-grouped split, seed 42) as (HAM folder, its splits.csv, ImageFolder)."""
    from skinlesion.data.ham10000 import load_table
    from skinlesion.data.split import make_split

    table = load_table(data_dir=data_dir)
    lesions = table["lesion_id"].drop_duplicates().sample(frac=1.0, random_state=0)
    chosen = table[table["lesion_id"].isin(set(lesions))]
    counts = chosen.groupby("lesion_id", sort=False).size().loc[lesions.to_numpy()].cumsum()
    keep = set(counts[counts <= n_images].index) or {lesions.iloc[0]}
    table = table[table["lesion_id"].isin(keep)].reset_index(drop=True)
    splits = make_split(table, val_frac=0.2, seed=42)
    return write_copies(table, splits, work)


def write_copies(table: pd.DataFrame, splits: pd.DataFrame, work: Path) -> tuple[Path, Path, Path]:
    """The HAM layout (metadata + images/) with splits.csv, and the ImageFolder copy of the same files."""
    ham, folder = work / "ham", work / "imagefolder"
    (ham / "images").mkdir(parents=True)
    parts = dict(zip(splits["image_id"], splits["split"], strict=True))
    for row in table.itertuples(index=False):
        src = Path(row.path)
        shutil.copyfile(src, ham / "images" / src.name)
        part = {"train": "train", "val": "validation"}[parts[row.image_id]]
        (folder / part / row.dx).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / part / row.dx / src.name)
    columns = [c for c in ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization") if c in table]
    table[columns].to_csv(ham / "HAM10000_metadata.csv", index=False)
    splits_csv = work / "splits.csv"
    splits[["image_id", "lesion_id", "dx", "split"]].to_csv(splits_csv, index=False)
    return ham, splits_csv, folder


@dataclass
class Timed:
    """A run's time-stamped output lines (seconds since launch) and its total wall time."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    total: float = 0.0
    returncode: int = 0


def run_timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> Timed:
    """Run ``cmd``, stamping every line of its merged stdout / stderr (progress bars' carriage returns too)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timed, pending, pending_t = Timed(), b"", 0.0
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(65536):
        now = time.perf_counter() - start
        *done, rest = re.split(rb"[\r\n]", pending + chunk)
        # A line is stamped when its last character arrived: a progress bar's text comes before its "\r".
        stamps = [pending_t if i == 0 and chunk[:1] in (b"\r", b"\n") else now for i in range(len(done))]
        timed.lines += [(t, line.decode(errors="replace")) for t, line in zip(stamps, done, strict=True)
                        if line.strip()]  # fmt: skip
        pending, pending_t = rest, now
    timed.returncode = proc.wait()
    timed.total = time.perf_counter() - start
    if pending.strip():
        timed.lines.append((timed.total, pending.decode(errors="replace")))
    return timed


def phases(timed: Timed, first_step: re.Pattern[str], epoch_end: re.Pattern[str]) -> dict[str, float]:
    """start-up (to the end of the first step), epoch 1, the mean later epoch, the end and the total, seconds."""
    first = next((t for t, line in timed.lines if first_step.search(line)), None)
    ends = [t for t, line in timed.lines if epoch_end.search(line)]
    if first is None or not ends:
        tail = "\n".join(line for _, line in timed.lines[-15:])
        raise RuntimeError(f"no first-step / epoch-end marker in the output (exit {timed.returncode}):\n{tail}")
    later = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {"startup": first, "epoch1": ends[0] - first, "steady": sum(later) / len(later) if later else float("nan"),
            "end": timed.total - ends[-1], "total": timed.total, "epochs": len(ends)}  # fmt: skip


def timm_command(train_py: Path, folder: Path, out: Path, args, flags: tuple[str, ...]) -> list[str]:
    return [sys.executable, str(train_py), "--data-dir", str(folder), "--train-split", "train", "--val-split",
            "validation", "--model", "efficientnet_b0", "--num-classes", "7", "--img-size", str(args.img_size),
            "-b", str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.workers), "--device",
            "cpu", "--output", str(out), "--log-interval", "100000", "--seed", "0", *flags]  # fmt: skip


def skinlesion_command(ham: Path, splits: Path, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "skinlesion", "train", "--data-dir", str(ham), "--splits", str(splits), "--out",
            str(out), "--run-name", "vs-timm", "--backbone", "efficientnet_b0", "--no-pretrained", "--img-size",
            str(args.img_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers",
            str(args.workers), "--device", "cpu"]  # fmt: skip


def compare(args) -> None:
    """Alternate the two trainings ``args.rounds`` times on the same images; print each phase and the best totals."""
    import tempfile

    import platformdirs

    with tempfile.TemporaryDirectory(prefix="vs-timm-") as tmp:
        work = Path(tmp)
        train_py = timm_train_py(args.timm_train_py, Path(platformdirs.user_cache_dir("skinlesion")) / "bench")
        ham, splits, folder = same_images(args.data_dir, args.images, work)
        n = {p: sum(1 for _ in (folder / p).rglob("*.jpg")) for p in ("train", "validation")}
        flags = tuple(args.timm_flags.split()) if args.timm_flags is not None else best_timm_flags()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SKINLESION_CACHE_DIR": str(work / "cache")}
        print(f"efficientnet_b0 from scratch, {args.img_size} px, batch {args.batch_size}, {args.epochs} epochs, "
              f"{args.workers} workers, CPU ({os.cpu_count()} cores); {n['train']} train / {n['validation']} val "
              f"images; timm train.py {TIMM_COMMIT[:12]} with timm {timm_version()} and {' '.join(flags)}")
        sides = {"timm train.py": lambda r: timm_command(train_py, folder, work / f"timm{r}", args, flags),
                 "skinlesion train": lambda r: skinlesion_command(ham, splits, work / f"sl{r}", args)}  # fmt: skip
        markers = {"timm train.py": (TIMM_FIRST_STEP, TIMM_EPOCH_END),
                   "skinlesion train": (SKINLESION_FIRST_STEP, SKINLESION_EPOCH_END)}  # fmt: skip
        print(f"{'round':>5}  {'side':18}{'start-up':>10}{'epoch 1':>9}{'steady':>8}{'end':>7}{'total':>8}  (s)")
        best: dict[str, dict[str, float]] = {}
        for r in range(args.rounds):
            for name, command in (sides.items() if r % 2 == 0 else reversed(sides.items())):
                p = phases(run_timed(command(r), work, env), *markers[name])
                print(f"{r:5d}  {name:18}{p['startup']:10.1f}{p['epoch1']:9.1f}{p['steady']:8.1f}{p['end']:7.1f}"
                      f"{p['total']:8.1f}", flush=True)  # fmt: skip
                if name not in best or p["total"] < best[name]["total"]:
                    best[name] = p
        a, b = best["timm train.py"]["total"], best["skinlesion train"]["total"]
        print(f"best totals: timm train.py {a:.1f} s, skinlesion train {b:.1f} s; skinlesion / timm: {b / a:.2f}x "
              "(target <= 1.00x)")  # fmt: skip


def timm_version() -> str:
    import timm

    return timm.__version__
