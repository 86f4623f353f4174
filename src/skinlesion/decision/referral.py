"""Referral (selective prediction): which images to hand to a clinician instead of answering.

``risk_coverage`` ranks images by the model's top probability and scores the images kept when the least
confident are referred first: one row per distinct confidence (images with equal confidence are kept or referred
together). The top probability is the model's certainty about any class; with an operating point the decided
class may not be the top one, and the decision metrics still score the decided labels.

A referral rule (``fit`` -> a JSON-able dict, like the operating point's; ``apply`` -> refer + reason) refers an
image when

- its top probability is below ``min_confidence``, chosen on held-out images (val, or out of fold) as the lowest
  threshold whose kept images reach ``target_accuracy`` (the most images kept), or the threshold that keeps at
  least ``target_coverage`` of them; and / or
- the positive class's probability (melanoma's) lies in ``positive_band`` [low, high]: given, or with
  ``positive_sensitivity`` the highest ``low`` (``high`` 1) for which the melanomas either referred or decided
  melanoma reach that fraction -- a melanoma the decision misses is then still seen by a clinician.

"Referred" means a clinician looks at the image; the kept images are the ones the system answers alone. The
thresholds are chosen on the fitting images, so what the rule reaches there is in-sample; score it on others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.errors import SkinLesionError


def confidence(probabilities: np.ndarray) -> np.ndarray:
    """The top probability of each row."""
    return np.asarray(probabilities, dtype=np.float64).max(1)


def _positive(classes: Sequence[str], code: str | None) -> int | None:
    if code is None:
        return None
    if code not in classes:
        raise SkinLesionError(f"positive class {code!r} is not one of the classes ({', '.join(classes)})")
    return list(classes).index(code)


def risk_coverage(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    decided: np.ndarray,
    classes: Sequence[str],
    positive_class: str | None = None,
) -> pd.DataFrame:
    """Coverage vs the kept images' metrics, least confident referred first; one row per distinct confidence,
    coverage increasing. Columns: threshold (kept: top probability >= it), n_kept, coverage, accuracy,
    balanced_accuracy (mean recall over the classes among the kept) and, with ``positive_class``,
    ``<class>_sensitivity`` (of the kept decisions) and ``<class>_sensitivity_with_referral`` (positives
    decided positive or referred, over all positives)."""
    y, p, d = _checked(y_true, probabilities, decided, classes)
    k = len(classes)
    conf = confidence(p)
    order = np.argsort(-conf, kind="mergesort")
    s = conf[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last kept image of each tie group
    n_kept = ends + 1
    correct = (y == d)[order]
    truth = np.eye(k)[y[order]]
    support = np.cumsum(truth, axis=0)[ends]
    hits = np.cumsum(truth * correct[:, None], axis=0)[ends]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
        table = pd.DataFrame({
            "threshold": s[ends], "n_kept": n_kept, "coverage": n_kept / len(y),
            "accuracy": np.cumsum(correct)[ends] / n_kept, "balanced_accuracy": np.nanmean(recall, axis=1),
        })  # fmt: skip
    positive = _positive(classes, positive_class)
    if positive is not None:
        n_pos = int((y == positive).sum())
        caught = np.cumsum((y[order] == positive) & (d[order] == positive))[ends]
        table[f"{positive_class}_sensitivity"] = recall[:, positive]
        referred = n_pos - support[:, positive]
        table[f"{positive_class}_sensitivity_with_referral"] = (caught + referred) / n_pos if n_pos else np.nan
    return table


def _checked(y_true: np.ndarray, probabilities: np.ndarray, decided: np.ndarray,
             classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    p = np.asarray(probabilities, dtype=np.float64)
    y, d = np.asarray(y_true, dtype=int), np.asarray(decided, dtype=int)
    if p.ndim != 2 or p.shape[1] != len(classes) or not len(y) == len(d) == len(p) or len(p) == 0:
        raise SkinLesionError(f"need labels, decisions (N,) and probabilities (N, {len(classes)}), N > 0")
    return y, p, d


def fit(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    decided: np.ndarray,
    classes: Sequence[str],
    target_accuracy: float | None = None,
    target_coverage: float | None = None,
    positive_class: str | None = None,
    positive_band: Sequence[float] | None = None,
    positive_sensitivity: float | None = None,
    **about: Any,
) -> dict[str, Any]:
    """The rule, JSON-able: ``classes``, ``min_confidence`` (0: none referred for confidence), ``positive_class``,
    ``positive_band`` ([low, high] or None), the targets, and what it reaches on the fitting images (``on_fit``).
    ``about``: extra keys to record (``fitted_on="val"``...)."""
    y, p, d = _checked(y_true, probabilities, decided, classes)
    if target_accuracy is not None and target_coverage is not None:
        raise SkinLesionError("give a target accuracy or a target coverage, not both")
    if target_accuracy is None and target_coverage is None and positive_band is None and not positive_sensitivity:
        raise SkinLesionError("give a referral target: an accuracy or a coverage to reach, and/or a melanoma band")
    for name, value in (("target accuracy", target_accuracy), ("target coverage", target_coverage),
                        ("positive sensitivity", positive_sensitivity)):  # fmt: skip
        if value is not None and not 0.0 < value <= 1.0:
            raise SkinLesionError(f"the {name} must be a fraction in (0, 1], got {value}")
    min_confidence = _min_confidence(risk_coverage(y, p, d, classes), target_accuracy, target_coverage)
    rule: dict[str, Any] = {
        "classes": list(classes), "min_confidence": min_confidence,
        "target": {"accuracy": target_accuracy, "coverage": target_coverage,
                   "positive_sensitivity": positive_sensitivity},
        "positive_class": positive_class, "positive_band": None, "n_images": int(len(y)),
    }  # fmt: skip
    if positive_band is not None or positive_sensitivity:
        if positive_class is None:
            raise SkinLesionError("a melanoma band needs the positive class (e.g. positive_class='mel')")
        pos = _positive(classes, positive_class)
        band = _band(positive_band) if positive_band is not None else None
        if positive_sensitivity:
            band = _fit_band(y, p, d, pos, min_confidence, positive_sensitivity, band)
        rule["positive_band"] = band
    rule["on_fit"] = summary(rule, y, p, d)
    return {**rule, **about}


def _min_confidence(table: pd.DataFrame, target_accuracy: float | None, target_coverage: float | None) -> float:
    if target_accuracy is not None:
        reached = table[table["accuracy"] >= target_accuracy - 1e-12]
        if reached.empty:
            best = table["accuracy"].max()
            raise SkinLesionError(f"no confidence threshold reaches accuracy {target_accuracy:g} on these images "
                                  f"(at most {best:.3f}); ask for a lower one")  # fmt: skip
        last = reached.iloc[-1]
        return 0.0 if last["coverage"] >= 1.0 else float(last["threshold"])
    if target_coverage is not None:
        row = table[table["coverage"] >= target_coverage - 1e-12].iloc[0]
        return 0.0 if row["coverage"] >= 1.0 else float(row["threshold"])
    return 0.0


def _band(band: Sequence[float]) -> list[float]:
    low, high = (float(v) for v in band)
    if not 0.0 <= low <= high <= 1.0:
        raise SkinLesionError(f"the melanoma band must be [low, high] with 0 <= low <= high <= 1, got {list(band)}")
    return [low, high]


def _fit_band(y: np.ndarray, p: np.ndarray, d: np.ndarray, pos: int, min_confidence: float, target: float,
              given: list[float] | None) -> list[float] | None:  # fmt: skip
    """The highest ``low`` (``high`` 1, or the given band's high) with which the positives referred or decided
    positive reach ``target`` of all positives; None when the confidence rule and the decisions already do."""
    is_pos = y == pos
    if not is_pos.any():
        raise SkinLesionError("no image of the positive class among the images to fit the referral band on")
    high = given[1] if given else 1.0
    caught = is_pos & ((confidence(p) < min_confidence) | (d == pos))
    need = int(np.ceil(target * is_pos.sum() - 1e-9)) - int(caught.sum())
    if need <= 0:
        return given
    candidates = np.sort(p[is_pos & ~caught & (p[:, pos] <= high), pos])[::-1]
    if need > len(candidates):
        raise SkinLesionError(f"a melanoma band up to {high:g} cannot reach sensitivity {target:g}; raise its top")
    return [float(candidates[need - 1]), high]


def apply(rule: dict[str, Any], probabilities: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """(refer (N,) bool, the reason per image or None): top probability below ``min_confidence``, and / or the
    positive class's probability inside ``positive_band``."""
    p = np.asarray(probabilities, dtype=np.float64)
    classes = rule["classes"]
    if p.ndim != 2 or p.shape[1] != len(classes):
        raise SkinLesionError(f"the referral rule was fitted on {len(classes)} classes; got probabilities {p.shape}")
    conf = confidence(p)
    low_conf = conf < rule["min_confidence"]
    in_band = np.zeros(len(p), dtype=bool)
    band, code = rule.get("positive_band"), rule.get("positive_class")
    if band is not None:
        q = p[:, classes.index(code)]
        in_band = (q >= band[0]) & (q <= band[1])
    reasons: list[str | None] = []
    for i in range(len(p)):
        why = []
        if low_conf[i]:
            why.append(f"top probability {conf[i]:.2f} < {rule['min_confidence']:.2f}")
        if in_band[i]:
            why.append(f"p_{code} {p[i, classes.index(code)]:.2f} in [{band[0]:.2f}, {band[1]:.2f}]")
        reasons.append("; ".join(why) or None)
    return low_conf | in_band, reasons


def summary(rule: dict[str, Any], y_true: np.ndarray, probabilities: np.ndarray, decided: np.ndarray) -> dict[str, Any]:
    """What the rule does on labelled images: coverage, the kept images' accuracy and balanced accuracy and, with
    a positive class, its sensitivity counting referred positives as caught."""
    y, p, d = _checked(y_true, probabilities, decided, rule["classes"])
    refer, _ = apply(rule, p)
    kept = ~refer
    out: dict[str, Any] = {"coverage": float(kept.mean()), "n_referred": int(refer.sum())}
    out["accuracy"] = float((y[kept] == d[kept]).mean()) if kept.any() else None
    recalls = [float((d[kept & (y == c)] == c).mean()) for c in range(len(rule["classes"])) if (kept & (y == c)).any()]
    out["balanced_accuracy"] = float(np.mean(recalls)) if recalls else None
    code = rule.get("positive_class")
    if code is not None:
        is_pos = y == rule["classes"].index(code)
        caught = is_pos & (refer | (d == rule["classes"].index(code)))
        out[f"{code}_sensitivity_with_referral"] = float(caught.sum() / is_pos.sum()) if is_pos.any() else None
    return out


def describe(rule: dict[str, Any]) -> str:
    """'refer when top probability < 0.62 or p_mel in [0.08, 1.00]', for logs and the report."""
    parts = [f"top probability < {rule['min_confidence']:.2f}"] if rule["min_confidence"] > 0 else []
    if rule.get("positive_band"):
        low, high = rule["positive_band"]
        parts.append(f"p_{rule['positive_class']} in [{low:.2f}, {high:.2f}]")
    return "refer when " + " or ".join(parts) if parts else "refer none"
