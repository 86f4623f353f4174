"""Per-class one-vs-rest metrics a clinical reader asks for, with lesion-bootstrap 95 % intervals.

For each class c (one vs the rest), from the true labels, the *decided* labels (the chain's decision, which an
operating point may move away from the argmax) and the probabilities:

- sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP), NPV TN/(TN+FN) of the decisions;
- AUC, ``auc_80`` and average precision of the probability p_c alone (they do not depend on the decision).

``auc_80`` is the ISIC challenge's "AUC above 80 % sensitivity" exactly as isic-challenge-scoring 5.6.0
(``isic_challenge_scoring.metrics.auc_above_sensitivity``, Apache-2.0) computes it: the raw, un-normalised area
under the ROC curve over the part of the curve where TPR >= 0.8 (from the FPR at which the curve reaches
TPR 0.8, linearly interpolated between the two ROC points around it, to FPR 1). A perfect ranking scores 1.0, a
random one 0.18. Unlike that scorer, an undefined ratio (e.g. PPV with no image decided c) is NaN (null in JSON,
left out of the interval), not a "freebie" 1.0, and sensitivity etc. score the decided labels, not p_c > 0.5.

For one positive class (melanoma), the operating points a screening study compares against: sensitivity at
specificity >= 0.80/0.90/0.95 and specificity at sensitivity >= 0.80/0.90/0.95, read off the ROC curve of p_c (call
positive when p_c >= t). Only attainable points count: no interpolation between ROC points, and images with
equal p_c fall on one side of a threshold together (one tie group is one ROC point). The reported ``threshold``
is that t on the point estimate's curve. These are properties of p_c, not of the stored decision.

Intervals resample lesions with ``metrics.lesion_weights`` (the same resamples as ``metrics.evaluate`` for the same
seed); every bootstrap quantity is the weighted metric with the resample's image weights, which equals
scikit-learn's metric with ``sample_weight`` (tested).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from skinlesion import metrics
from skinlesion.errors import SkinLesionError

PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "auc", "auc_80", "average_precision")
LEVELS = (0.80, 0.90, 0.95)
ISIC_MIN_SENSITIVITY = 0.80
_TOL = 1e-12  # "specificity >= 0.9" must hold for 9/10 although 1 - 0.9 is 0.09999999999999998
_CELLS = 2_000_000  # bootstrap rows x images handled at once (memory bound)


def class_index(classes: Sequence[str], code: str | None) -> int | None:
    """Column of class ``code`` in ``classes`` (None for None); a clear error for a code not among them."""
    if code is None:
        return None
    if code not in classes:
        raise SkinLesionError(f"positive class {code!r} is not one of the classes ({', '.join(classes)})")
    return list(classes).index(code)


# ------------------------------------------------------------------------------------------- point estimates
def partial_auc_above_sensitivity(
    positive: np.ndarray, score: np.ndarray, min_sensitivity: float = ISIC_MIN_SENSITIVITY,
    sample_weight: np.ndarray | None = None,
) -> float:  # fmt: skip
    """ISIC's ``auc_sens_80`` for ``min_sensitivity`` 0.8 (see the module docstring); NaN without both classes."""
    positive = np.asarray(positive, dtype=bool)
    if not 0.0 < min_sensitivity <= 1.0:
        raise SkinLesionError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    if positive.all() or not positive.any():
        return float("nan")
    fpr, tpr, _ = skm.roc_curve(positive, score, sample_weight=sample_weight, drop_intermediate=False)
    j = int(np.searchsorted(tpr, min_sensitivity, side="left"))
    fpr_at = np.interp(min_sensitivity, tpr[j - 1 : j + 1], fpr[j - 1 : j + 1])
    return float(skm.auc(np.r_[fpr_at, fpr[j:]], np.r_[min_sensitivity, tpr[j:]]))


def sensitivity_at_specificity(positive: np.ndarray, score: np.ndarray, specificity: float) -> tuple[float, float]:
    """(best sensitivity of a threshold ``score >= t`` whose specificity is >= ``specificity``, that t);
    t is inf when only "nobody positive" qualifies; NaN without both classes."""
    fpr, tpr, thresholds = _roc(positive, score)
    if fpr is None:
        return float("nan"), float("nan")
    i = int((fpr <= 1.0 - specificity + _TOL).sum()) - 1
    return float(tpr[i]), float(thresholds[i])


def specificity_at_sensitivity(positive: np.ndarray, score: np.ndarray, sensitivity: float) -> tuple[float, float]:
    """(best specificity of a threshold ``score >= t`` whose sensitivity is >= ``sensitivity``, that t)."""
    fpr, tpr, thresholds = _roc(positive, score)
    if fpr is None:
        return float("nan"), float("nan")
    i = int((tpr < sensitivity - _TOL).sum())
    return float(1.0 - fpr[i]), float(thresholds[i])


def _roc(positive: np.ndarray, score: np.ndarray) -> tuple[Any, Any, Any]:
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None, None, None
    return skm.roc_curve(positive, score, drop_intermediate=False)


def one_vs_rest(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Every PER_CLASS metric once per class, (K,) arrays, with scikit-learn (NaN where undefined)."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    k = probs.shape[1]
    cm = skm.multilabel_confusion_matrix(y_true, y_pred, labels=list(range(k)))  # (K, 2, 2): [[TN, FP], [FN, TP]]
    tn, fp, fn, tp = (cm[:, i, j].astype(float) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    out = _ratios(tp, fp, fn, tn)
    out["auc"] = np.array([metrics._binary_auc(y_true == c, probs[:, c]) for c in range(k)])
    out["auc_80"] = np.array([partial_auc_above_sensitivity(y_true == c, probs[:, c]) for c in range(k)])
    out["average_precision"] = np.array([_average_precision(y_true == c, probs[:, c]) for c in range(k)])
    return out


def _average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    if not positive.any():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(skm.average_precision_score(positive, score))


def _ratios(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(a + b > 0, a / (a + b), np.nan)

    return {"sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp), "ppv": ratio(tp, fp), "npv": ratio(tn, fn)}


# ---------------------------------------------------------------------------------- weighted (bootstrap) rows
def weighted_roc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """(fpr, tpr, thresholds) of every weight row of ``w`` (B, N): (B, G+1) curves over the G distinct scores,
    descending, with a leading (0, 0) at threshold inf -- scikit-learn's ``roc_curve(drop_intermediate=False)``
    with ``sample_weight``. NaN rows where a row has no positive or no negative weight."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s = np.asarray(score, dtype=np.float64)[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last image of each tie group: one ROC point per distinct score
    ws = np.asarray(w, dtype=np.float64)[:, order]
    zero = np.zeros((ws.shape[0], 1))
    tps = np.concatenate([zero, np.cumsum(ws * positive[order], axis=1)[:, last]], axis=1)
    fps = np.concatenate([zero, np.cumsum(ws * ~positive[order], axis=1)[:, last]], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p, n = tps[:, -1:], fps[:, -1:]
        tpr = np.where((p > 0) & (n > 0), tps / p, np.nan)
        fpr = np.where((p > 0) & (n > 0), fps / n, np.nan)
    return fpr, tpr, np.r_[np.inf, s[last]], tps, fps


def _rows_partial_auc(fpr: np.ndarray, tpr: np.ndarray, min_tpr: float) -> np.ndarray:
    """``partial_auc_above_sensitivity`` of every curve row at once (NaN rows stay NaN)."""
    rows = np.arange(len(fpr))
    j = np.clip((tpr < min_tpr).sum(1), 1, fpr.shape[1] - 1)  # first point with TPR >= min_tpr (searchsorted left)
    x0, y0, x1, y1 = fpr[rows, j - 1], tpr[rows, j - 1], fpr[rows, j], tpr[rows, j]
    with np.errstate(invalid="ignore", divide="ignore"):
        x_at = x0 + (min_tpr - y0) * (x1 - x0) / (y1 - y0)
    seg = (fpr[:, 1:] - fpr[:, :-1]) * (tpr[:, 1:] + tpr[:, :-1]) / 2  # trapezoid i spans points i and i + 1
    tail = np.concatenate([np.cumsum(seg[:, ::-1], axis=1)[:, ::-1], np.zeros((len(fpr), 1))], axis=1)
    return (x1 - x_at) * (y1 + min_tpr) / 2 + tail[rows, j]


def _rows_average_precision(tps: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """Sum over thresholds (descending) of (recall_n - recall_{n-1}) * precision_n, as scikit-learn's AP."""
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 1.0)
        recall = tps / tps[:, -1:]
        return (np.diff(recall, axis=1) * precision[:, 1:]).sum(1)


def _rows_at(fpr: np.ndarray, tpr: np.ndarray, level: float, at: str) -> np.ndarray:
    rows = np.arange(len(fpr))
    if at == "specificity":  # sensitivity of the last point with FPR <= 1 - level
        return tpr[rows, np.maximum((fpr <= 1.0 - level + _TOL).sum(1) - 1, 0)]
    i = np.minimum((tpr < level - _TOL).sum(1), fpr.shape[1] - 1)  # the first point with TPR >= level
    return 1.0 - fpr[rows, i]


def weighted_one_vs_rest(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """PER_CLASS metrics for every weight row (B, N): (B, K) arrays; row b equals ``one_vs_rest`` with
    ``sample_weight=weights[b]``."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    w = np.asarray(weights, dtype=np.float64)
    k = probs.shape[1]
    truth, decided = np.eye(k)[y_true], np.eye(k)[y_pred]
    out = _ratios(w @ (truth * decided), w @ ((1 - truth) * decided), w @ (truth * (1 - decided)),
                  w @ ((1 - truth) * (1 - decided)))  # fmt: skip
    for name in ("auc", "auc_80", "average_precision"):
        out[name] = np.empty((len(w), k))
    for c in range(k):
        out["auc"][:, c] = metrics._weighted_auc(y_true == c, probs[:, c], w)
        fpr, tpr, _, tps, fps = weighted_roc(y_true == c, probs[:, c], w)
        out["auc_80"][:, c] = _rows_partial_auc(fpr, tpr, ISIC_MIN_SENSITIVITY)
        out["average_precision"][:, c] = _rows_average_precision(tps, fps)
    return out


def _chunks(n_rows: int, n_images: int) -> list[slice]:
    step = max(1, _CELLS // max(n_images, 1))
    return [slice(i, i + step) for i in range(0, n_rows, step)]


def _bootstrap(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, weights: np.ndarray, positive: int | None,
    levels: Sequence[float],
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every bootstrap quantity, rows of ``weights`` taken in chunks so (rows x images) stays bounded."""
    parts: list[dict[str, np.ndarray]] = []
    for rows in _chunks(len(weights), len(y_true)):
        w = weights[rows]
        part = weighted_one_vs_rest(y_true, y_pred, probs, w)
        if positive is not None:
            fpr, tpr, *_ = weighted_roc(y_true == positive, probs[:, positive], w)
            for level in levels:
                part[f"sens@spec{level}"] = _rows_at(fpr, tpr, level, "specificity")
                part[f"spec@sens{level}"] = _rows_at(fpr, tpr, level, "sensitivity")
        parts.append(part)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def evaluate(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    classes: Sequence[str],
    positive_class: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    levels: Sequence[float] = LEVELS,
) -> dict[str, Any]:
    """The clinical metrics as JSON: per class every PER_CLASS metric as ``{"value", "ci95"}`` (+ positives,
    negatives), and for ``positive_class`` the sensitivity at specificity ``levels`` and vice versa (each with
    its threshold on p). ``y_true`` / ``y_pred``: class indices (N,); ``probs`` (N, K); ``groups``: lesion ids."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or not len(y_true) == len(y_pred) == len(probs):
        raise SkinLesionError(f"need y_true, y_pred (N,) and probabilities (N, {len(classes)}) for the same images")
    positive = class_index(classes, positive_class)
    point = one_vs_rest(y_true, y_pred, probs)
    weights = metrics.lesion_weights(groups, n_boot, seed) if n_boot else None
    boot = _bootstrap(y_true, y_pred, probs, weights, positive, levels) if n_boot else {}

    def entry(value: float, samples: np.ndarray | None) -> dict[str, Any]:
        return {"value": metrics._finite(value), "ci95": metrics._interval(samples) if samples is not None else None}

    per_class = {
        c: {
            **{m: entry(point[m][i], boot[m][:, i] if boot else None) for m in PER_CLASS},
            "positives": int((y_true == i).sum()),
            "negatives": int((y_true != i).sum()),
        }
        for i, c in enumerate(classes)
    }
    out: dict[str, Any] = {
        "n_images": int(len(y_true)),
        "n_lesions": int(len(np.unique(np.asarray(groups).astype(str)))),
        "per_class": per_class,
        "positive_class": None,
        "bootstrap": {"resamples": int(n_boot), "unit": "lesion", "seed": int(seed), "interval": "percentile"},
    }
    if positive is not None:
        is_pos, score = y_true == positive, probs[:, positive]
        at: dict[str, dict[str, Any]] = {"sensitivity_at_specificity": {}, "specificity_at_sensitivity": {}}
        for level in levels:
            for key, fn, tag in (("sensitivity_at_specificity", sensitivity_at_specificity, "sens@spec"),
                                 ("specificity_at_sensitivity", specificity_at_sensitivity, "spec@sens")):  # fmt: skip
                value, threshold = fn(is_pos, score, level)
                e = entry(value, boot[f"{tag}{level}"] if boot else None)
                at[key][f"{level:g}"] = {**e, "threshold": metrics._finite(threshold)}
        out["positive_class"] = {"class": positive_class, "rule": f"positive when p_{positive_class} >= threshold",
                                 **at}  # fmt: skip
    return out


def per_class_table(report: dict[str, Any]) -> pd.DataFrame:
    """``evaluate``'s per-class part as a table: one row per class, columns metric, metric_lo, metric_hi."""
    rows = []
    for name, entries in report["per_class"].items():
        row: dict[str, Any] = {"class": name, "positives": entries["positives"]}
        for m in PER_CLASS:
            ci = entries[m]["ci95"] or [None, None]
            row.update({m: entries[m]["value"], f"{m}_lo": ci[0], f"{m}_hi": ci[1]})
        rows.append(row)
    return pd.DataFrame(rows)
