"""Paired lesion-bootstrap comparison of models scored on the same labelled images (used by cv_ensemble.py and
paired_runs.py): every bootstrap resample draws the lesions once and every model is scored on that same draw."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from skinlesion import metrics
from skinlesion.classes import CLASS_INDEX

ROWS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss", "ece", "mel_recall")
Outputs = tuple[np.ndarray, np.ndarray]  # (probabilities, decided labels) from a model's decision chain


def host() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return f"{platform.node()}: {model}, avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}"


def per_resample(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The ROWS metrics for every bootstrap resample (rows of ``weights``), decisions ``pred``."""
    m = metrics.weighted_metrics(y, probs, weights, pred)
    return {**{k: m[k] for k in ROWS if k in m}, "mel_recall": m["recall"][:, CLASS_INDEX["mel"]]}


def compare(y: np.ndarray, lesions: np.ndarray, candidate: Outputs, references: list[Outputs],
            n_boot: int) -> dict[str, dict]:  # fmt: skip
    """Per ROWS metric: the candidate's point value, the references' mean and sd, candidate minus that mean, and
    the 95 % interval of that difference over paired lesion resamples."""
    weights = metrics.lesion_weights(lesions, n_boot, 0)
    full = np.ones((1, len(y)))
    cand_point = {k: float(v[0]) for k, v in per_resample(y, *candidate, full).items()}
    ref_points = [{k: float(v[0]) for k, v in per_resample(y, *r, full).items()} for r in references]
    cand_boot = per_resample(y, *candidate, weights)
    ref_boot = [per_resample(y, *r, weights) for r in references]
    rows = {}
    for k in ROWS:
        values = [p[k] for p in ref_points]
        diff = cand_boot[k] - np.nanmean([b[k] for b in ref_boot], axis=0)
        lo, hi = np.nanpercentile(diff, [2.5, 97.5])
        mean = float(np.mean(values))
        rows[k] = {"candidate": cand_point[k], "reference_mean": mean,
                   "reference_sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "references": values,
                   "diff": cand_point[k] - mean, "diff_ci95": [float(lo), float(hi)]}  # fmt: skip
    return rows


def print_rows(rows: dict[str, dict], candidate: str, reference: str) -> None:
    print(f"{'metric':<18} {candidate:>10} {reference:>10} {'sd':>6} {'diff':>7}  paired 95% interval")
    for k, r in rows.items():
        lo, hi = r["diff_ci95"]
        print(f"{k:<18} {r['candidate']:10.3f} {r['reference_mean']:10.3f} {r['reference_sd']:6.3f} "
              f"{r['diff']:+7.3f}  [{lo:+.3f}, {hi:+.3f}]")  # fmt: skip
