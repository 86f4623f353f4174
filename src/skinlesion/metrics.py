"""Classification metrics from labels + probabilities, with 95 % intervals from a lesion bootstrap.

Point estimates come straight from scikit-learn. The bootstrap resamples *lesions* (all images
of a drawn lesion come along), which is the same as weighting each image by how often its lesion
was drawn; every metric is then computed for all resamples at once from a (B, N) weight matrix.
``weighted_metrics`` equals scikit-learn's metrics with ``sample_weight`` (tested), so intervals
and point estimates are the same quantities.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn import metrics as skm

ECE_BINS = 15
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "log_loss", "brier", "ece")
PER_CLASS = ("precision", "recall", "f1", "auc")


def ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins over (0, 1]."""
    bins = reliability_bins(y_true, probs, n_bins)
    n = bins["count"].sum()
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["count"][filled] / n * gap).sum())


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per-bin count, mean confidence and accuracy (NaN for empty bins) — the reliability diagram."""
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y_true)
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct.astype(float), minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"edges": edges, "count": count, "confidence": confidence, "accuracy": accuracy}


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # Bins are (lo, hi]; a confidence of exactly 1.0 falls in the last one.
    return np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)


def point_metrics(y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray | None = None) -> dict[str, Any]:
    """Every metric once, with scikit-learn. AUCs are NaN for a class absent from (or all of) y_true.
    ``y_pred``: the decisions when they are not the argmax (an operating point); the probability scores
    (AUC, log loss, Brier, ECE of the top-1 probability) do not depend on it."""
    y_true = np.asarray(y_true, dtype=int)
    k = probs.shape[1]
    labels = list(range(k))
    y_pred = probs.argmax(1) if y_pred is None else np.asarray(y_pred, dtype=int)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    auc = np.array([_binary_auc(y_true == c, probs[:, c]) for c in labels])
    present = [c for c in labels if s[c] > 0]
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected on small or external sets.
        warnings.simplefilter("ignore", UserWarning)
        balanced = skm.balanced_accuracy_score(y_true, y_pred)
    out = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        # Mean recall over the classes present in y_true — the ISIC 2018 Task 3 metric.
        "balanced_accuracy": balanced,
        # Macro over the classes present in y_true, so a class absent from a set does not count as F1 = 0.
        "macro_f1": skm.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0),
        "weighted_f1": skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0),
        "macro_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
        "log_loss": skm.log_loss(y_true, probs, labels=labels),
        "brier": skm.brier_score_loss(y_true, probs, labels=labels),
        "ece": ece(y_true, probs),
    }
    per_class = {"precision": p, "recall": r, "f1": f, "auc": auc, "support": s}
    return {"overall": {m: float(v) for m, v in out.items()}, "per_class": per_class}


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    if positive.all() or not positive.any():
        return float("nan")
    return float(skm.roc_auc_score(positive, score))


def weighted_metrics(
    y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray, y_pred: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """All metrics for each row of ``weights`` (B, N) at once; row b equals scikit-learn with
    ``sample_weight=weights[b]``. Per-class entries have shape (B, K), headline ones (B,)."""
    y_true = np.asarray(y_true, dtype=int)
    w = np.asarray(weights, dtype=float)
    n, k = probs.shape
    y_pred = probs.argmax(1) if y_pred is None else np.asarray(y_pred, dtype=int)
    total = w.sum(1)
    onehot = np.eye(k)[y_true]

    # Weighted confusion matrices (B, K, K) via one matmul over the K*K (true, pred) cells.
    cell = np.zeros((n, k * k))
    cell[np.arange(n), y_true * k + y_pred] = 1.0
    cm = (w @ cell).reshape(-1, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(2)
    predicted = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    n_present = present.sum(1)

    eps = np.finfo(probs.dtype).eps
    nll = -np.log(np.clip(probs[np.arange(n), y_true], eps, 1.0))
    sq = ((probs - onehot) ** 2).sum(1)

    conf = probs.max(1)
    correct = (probs.argmax(1) == y_true).astype(float)  # calibration of the probabilities, as ece() scores it
    bin_onehot = np.eye(ECE_BINS)[_bin_index(conf, ECE_BINS)]
    bin_w = w @ bin_onehot
    bin_gap = np.abs(w @ (bin_onehot * (correct - conf)[:, None]))
    auc = np.stack([_weighted_auc(y_true == c, probs[:, c], w) for c in range(k)], axis=1)

    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": tp.sum(1) / total,
            "balanced_accuracy": (recall * present).sum(1) / n_present,
            "macro_f1": (f1 * present).sum(1) / n_present,
            "weighted_f1": (f1 * support).sum(1) / total,
            "macro_auc": _nanmean_rows(auc),
            "log_loss": (w @ nll) / total,
            "brier": (w @ sq) / total,
            # sum_b |sum_i w_i (correct_i - conf_i)| / N equals sum_b (n_b / N) |acc_b - conf_b|.
            "ece": bin_gap.sum(1) / bin_w.sum(1),
            # Per class: undefined (NaN, left out of the interval) in resamples without that class.
            "precision": np.where(predicted > 0, precision, np.nan),
            "recall": np.where(present, recall, np.nan),
            "f1": np.where(present, f1, np.nan),
            "auc": auc,
        }


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    finite = np.isfinite(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, a, 0.0).sum(1) / finite.sum(1)


def _weighted_auc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC (ties count half) for every weight row — what scikit-learn's
    trapezoidal ROC area gives with ``sample_weight``. NaN where a row has no positives or negatives."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    pos = positive[order].astype(float)
    ws = w[:, order]
    pos_w = ws * pos
    neg_w = ws * (1.0 - pos)
    neg_cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(neg_w, axis=1)], axis=1)
    # Each position's tie group [start, end) in the sorted scores.
    new_group = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(s)]
    group = np.cumsum(new_group) - 1
    below = neg_cum[:, starts[group]]
    tied = neg_cum[:, ends[group]] - below
    p_tot = pos_w.sum(1)
    n_tot = neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_w * (below + 0.5 * tied)).sum(1) / (p_tot * n_tot)
    return np.where((p_tot > 0) & (n_tot > 0), auc, np.nan)


def lesion_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) image weights: each lesion is drawn with replacement as many times as there are
    lesions, and every image of it gets weight = times its lesion was drawn."""
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = inverse.max() + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.stack([np.bincount(row, minlength=n_groups) for row in draws]).astype(float)
    return counts[:, inverse]


def evaluate(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    classes: list[str] | tuple[str, ...],
    n_boot: int = 1000,
    seed: int = 0,
    y_pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """metrics.json content: every metric as ``{"value", "ci95"}`` (lesion bootstrap, percentile).
    ``y_pred``: decisions other than the argmax (an operating point's)."""
    y_true = np.asarray(y_true, dtype=int)
    point = point_metrics(y_true, probs, y_pred)
    boot = weighted_metrics(y_true, probs, lesion_weights(groups, n_boot, seed), y_pred) if n_boot else {}

    def entry(value: float, samples: np.ndarray | None) -> dict[str, Any]:
        return {"value": _finite(value), "ci95": _interval(samples) if samples is not None else None}

    out: dict[str, Any] = {
        "n_images": int(len(y_true)),
        "n_lesions": int(len(np.unique(np.asarray(groups).astype(str)))),
    }
    for name in HEADLINE:
        out[name] = entry(point["overall"][name], boot.get(name))
    out["per_class"] = {
        c: {
            **{m: entry(point["per_class"][m][i], boot[m][:, i] if boot else None) for m in PER_CLASS},
            "support": int(point["per_class"]["support"][i]),
        }
        for i, c in enumerate(classes)
    }
    out["bootstrap"] = {"resamples": int(n_boot), "unit": "lesion", "seed": int(seed), "interval": "percentile"}
    return out


def _interval(samples: np.ndarray) -> list[float | None] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
