"""How far an INT8 model's decisions are from its fp32 original's on labelled images of the run (val by default).

Both backends' logits go through the run's one ``DecisionChain`` (temperature, metadata prior, lesion pooling,
operating point): decision agreement, max |dp|, and balanced accuracy / macro AUC / melanoma recall of each with the
difference's paired lesion-bootstrap interval (both scored on the same lesion resamples, ``metrics.lesion_weights``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion import metrics
from skinlesion.classes import CLASS_INDEX
from skinlesion.data.run_folder import default_split, labels_of, lesion_ids, read_config, split_part
from skinlesion.decision import lesion_pooling
from skinlesion.decision.chain import DecisionChain
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions

MAX_BALANCED_ACCURACY_DROP = 0.01  # above it export warns and `--backend auto` keeps to fp32
NAMES = {"balanced_accuracy": "balanced accuracy", "macro_auc": "macro AUC", "mel_recall": "melanoma recall"}


def split_to_measure(run_dir: Path) -> str | None:
    """val, else test; None for a run that has neither (a --folds parent scored out of fold)."""
    split = default_split(run_dir)
    return split if split in ("val", "test") else None


def measure(
    run_dir: str | Path,
    fp32: Classifier,
    int8: Classifier,
    split: str = "val",
    options: ScoringOptions | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The drift of ``int8`` from ``fp32`` on the run's ``split`` (single view, the run's chain), JSON-able."""
    run_dir = Path(run_dir)
    options = options or ScoringOptions()
    if not options.cache_dir:  # the cache the run trained with
        options = options.replace(cache_dir=read_config(run_dir).get("cache_dir"))
    table = split_part(run_dir, split)
    reference = fp32.view_logits_of_table(table, 1, options, desc=f"fp32 {split}")
    quantized = int8.view_logits_of_table(table, 1, options, desc=f"int8 {split}")
    return {"split": split, **compare(fp32.chain, table, reference, quantized, bootstrap, seed)}


def compare(chain: DecisionChain, table: pd.DataFrame, reference: np.ndarray, quantized: np.ndarray,
            bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Agreement, max |dp| and the headline metrics' differences (int8 - fp32) of two sets of view logits."""
    y, lesions = labels_of(table), lesion_ids(table)
    offsets = chain.offsets(table)
    pool = lesions if chain.pool_lesions and lesion_pooling.shared(lesions) else None
    a, b = chain(reference, offsets, pool), chain(quantized, offsets, pool)
    # Row 0 weighs every image once (the point value); the others are the lesion resamples, shared by both sides.
    weights = np.vstack([np.ones((1, len(y))), metrics.lesion_weights(lesions, bootstrap, seed)])
    scored = [headline(metrics.weighted_metrics(y, d.probabilities, weights, d.labels)) for d in (a, b)]
    out: dict[str, dict[str, Any]] = {}
    for name in NAMES:
        fp, q = scored[0][name], scored[1][name]
        diff = (q - fp)[1:]
        diff = diff[np.isfinite(diff)]
        interval = [float(v) for v in np.percentile(diff, [2.5, 97.5])] if diff.size else None
        out[name] = {"fp32": finite(fp[0]), "int8": finite(q[0]), "delta": finite(q[0] - fp[0]), "ci95": interval}
    return {
        "images": int(len(y)),
        "lesions": int(len(np.unique(lesions))),
        "agreement": float(np.mean(a.labels == b.labels)),
        "disagreements": int(np.sum(a.labels != b.labels)),
        "max_abs_dp": float(np.abs(a.probabilities - b.probabilities).max()),
        "metrics": out,
        "bootstrap": {"resamples": int(bootstrap), "unit": "lesion", "seed": int(seed), "paired": True},
    }


def headline(scored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"balanced_accuracy": scored["balanced_accuracy"], "macro_auc": scored["macro_auc"],
            "mel_recall": scored["recall"][:, CLASS_INDEX["mel"]]}  # fmt: skip


def finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def balanced_accuracy_drop(drift: dict[str, Any] | None) -> float | None:
    """How much balanced accuracy the int8 model loses (positive = worse); None when it was not measured."""
    delta = ((drift or {}).get("metrics") or {}).get("balanced_accuracy", {}).get("delta")
    return None if delta is None else -float(delta)


def acceptable(drift: dict[str, Any] | None) -> bool:
    """Measured, and losing at most MAX_BALANCED_ACCURACY_DROP balanced accuracy."""
    drop = balanced_accuracy_drop(drift)
    return drop is not None and drop <= MAX_BALANCED_ACCURACY_DROP


def warning(drift: dict[str, Any] | None) -> str | None:
    """The one-line warning for a drop above MAX_BALANCED_ACCURACY_DROP, naming the flag that keeps fp32."""
    drop = balanced_accuracy_drop(drift)
    if drop is None or drop <= MAX_BALANCED_ACCURACY_DROP:
        return None
    where = drift.get("split", "the labelled images")
    return (f"warning: INT8 loses {drop:.3f} balanced accuracy on {where} (more than "
            f"{MAX_BALANCED_ACCURACY_DROP}); `--backend auto` keeps to fp32 for this run: pass `--backend onnx` "
            "(fp32) explicitly, or export without --int8")  # fmt: skip


def describe(drift: dict[str, Any]) -> list[str]:
    """Printable lines: agreement and max |dp|, then each metric fp32 -> int8 with the paired interval."""
    where = drift.get("split", "labelled images")
    lines = [f"INT8 vs fp32 on {where} ({drift['images']} images, {drift['lesions']} lesions): decisions "
             f"agree on {drift['agreement']:.2%} ({drift['disagreements']} differ), max |dp| = "
             f"{drift['max_abs_dp']:.3g}"]  # fmt: skip
    for name, label in NAMES.items():
        m = drift["metrics"][name]
        if m["delta"] is None:
            lines.append(f"  {label}: not defined on these images")
            continue
        ci = m["ci95"]
        interval = f" (paired 95% CI {ci[0]:+.4f} to {ci[1]:+.4f})" if ci else ""
        lines.append(f"  {label}: {m['fp32']:.4f} -> {m['int8']:.4f}, {m['delta']:+.4f}{interval}")
    return lines
