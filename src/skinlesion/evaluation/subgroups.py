"""Subgroup analysis: the headline metrics per value of each patient / image attribute, with lesion-bootstrap
intervals and the gap to the whole set.

The input is predictions.csv's frame (``y_true``, ``y_pred`` as class codes, ``p_<class>``, ``lesion_id``)
joined with the attribute columns of the images (``with_attributes``). Each attribute found under one of its
usual column names (``ATTRIBUTES``) is analysed; age becomes bands; a missing value is its own group,
``unknown``. Every group is kept: one with fewer than ``min_lesions`` lesions (or, for the positive class's
sensitivity, fewer than ``min_positive_lesions`` positive lesions) is marked ``small`` with the reason.

All groups and the whole set are scored on the *same* lesion resamples (``metrics.lesion_weights`` over the whole
set, restricted to the group), so the gap to the whole set has a paired interval: its percentile interval over
the resamples where the group has images. A resample without an image of a group leaves it undefined there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from skinlesion import metrics
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation.clinical_metrics import class_index

# Canonical attribute -> the column names it goes by (HAM10000, ISIC 2019/2020, Fitzpatrick17k, PAD-UFES-20).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "sex": ("sex",),
    "age": ("age", "age_approx"),
    "body_site": ("localization", "anatom_site_general_challenge", "anatom_site_general", "region"),
    "source": ("source", "dataset", "attribution"),
    "dx_type": ("dx_type", "diagnosis_confirm_type"),
    "fitzpatrick": ("fitzpatrick", "fitzpatrick_scale", "fitzpatrick_skin_type", "fitspatrick"),
}
AGE_BANDS = (30, 45, 60, 75)  # edges: <30, 30-44, 45-59, 60-74, 75+
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
UNKNOWN = "unknown"


def with_attributes(predictions: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """predictions.csv's rows with the attribute columns of ``table`` (the data table, or a metadata CSV) joined
    on ``image_id``; images the table does not name get unknown attributes."""
    columns = [c for names in ATTRIBUTES.values() for c in names if c in table and c not in predictions]
    extra = table[["image_id", *columns]].drop_duplicates("image_id").astype({"image_id": str})
    return predictions.astype({"image_id": str}).merge(extra, on="image_id", how="left")


def attribute_values(frame: pd.DataFrame, attribute: str, age_bands: Sequence[float] = AGE_BANDS) -> pd.Series | None:
    """The group label of each row for a canonical ``attribute`` (None when no column of it is present)."""
    column = next((c for c in ATTRIBUTES.get(attribute, (attribute,)) if c in frame), None)
    if column is None:
        return None
    values = frame[column]
    if attribute == "age":
        return _age_bands(pd.to_numeric(values, errors="coerce"), age_bands)
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().sum() == values.notna().sum() and (numeric.dropna() % 1 == 0).all():
        values = numeric.astype("Int64")  # Fitzpatrick 2.0 -> "2"
    text = values.astype(str).str.strip()
    return text.mask(values.isna() | text.isin(["", "nan", "<NA>", "None"]), UNKNOWN)


def _age_bands(age: pd.Series, edges: Sequence[float]) -> pd.Series:
    edges = sorted(edges)
    labels = [f"<{edges[0]:g}", *(f"{a:g}-{b - 1:g}" for a, b in zip(edges, edges[1:], strict=False)),
              f"{edges[-1]:g}+"]  # fmt: skip
    band = np.searchsorted(np.asarray(edges, dtype=float), age.to_numpy(dtype=float), side="right")
    return pd.Series(np.where(age.notna(), np.asarray(labels, dtype=object)[band], UNKNOWN), index=age.index)


def _arrays(frame: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, ...]:
    missing = [c for c in ("y_true", "y_pred", "lesion_id", *(f"p_{k}" for k in classes)) if c not in frame]
    if missing:
        raise SkinLesionError(f"the predictions frame lacks {', '.join(missing)} (predictions.csv's columns)")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(frame["y_true"].astype(str)) - set(index) | set(frame["y_pred"].astype(str)) - set(index))
    if unknown:
        raise SkinLesionError(f"labels {', '.join(unknown)} are not among the classes ({', '.join(classes)})")
    y = frame["y_true"].astype(str).map(index).to_numpy(dtype=int)
    pred = frame["y_pred"].astype(str).map(index).to_numpy(dtype=int)
    probs = frame[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    return y, pred, probs, frame["lesion_id"].astype(str).to_numpy()


def _scores(y: np.ndarray, pred: np.ndarray, probs: np.ndarray, w: np.ndarray,
            positive: int | None) -> dict[str, np.ndarray]:  # fmt: skip
    """Headline metrics (+ the positive class's sensitivity / specificity) for each weight row, (B,) each.
    ``metrics.weighted_metrics`` equals scikit-learn's metrics with ``sample_weight`` (tested there), so a row of
    ones gives the point estimates."""
    rows = metrics.weighted_metrics(y, probs, w, pred)
    out = {m: rows[m] for m in HEADLINE}
    if positive is not None:
        pos, called = y == positive, pred == positive
        with np.errstate(invalid="ignore", divide="ignore"):
            w_pos, w_neg = w @ pos, w @ ~pos
            out["sensitivity"] = np.where(w_pos > 0, (w @ (pos & called)) / w_pos, np.nan)
            out["specificity"] = np.where(w_neg > 0, (w @ (~pos & ~called)) / w_neg, np.nan)
    return out


def subgroup_table(
    frame: pd.DataFrame,
    classes: Sequence[str],
    attributes: Sequence[str] | None = None,
    positive_class: str | None = None,
    min_lesions: int = 30,
    min_positive_lesions: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    age_bands: Sequence[float] = AGE_BANDS,
) -> pd.DataFrame:
    """One row for the whole set (``attribute`` "overall") and one per (attribute, value): n_images, n_lesions,
    n_positive_lesions, each metric with ``_lo`` / ``_hi`` (95 %) and ``_gap`` / ``_gap_lo`` / ``_gap_hi`` (group
    minus whole set), ``small`` and ``reason``. Metrics: accuracy, balanced_accuracy, macro_f1, macro_auc and, with
    ``positive_class`` (e.g. "mel"), ``<class>_sensitivity`` / ``<class>_specificity`` of the decisions."""
    y, pred, probs, lesions = _arrays(frame, classes)
    positive = class_index(classes, positive_class)
    names = list(attributes) if attributes is not None else [a for a in ATTRIBUTES if attribute_values(frame, a)
                                                            is not None]  # fmt: skip
    weights = metrics.lesion_weights(lesions, n_boot, seed) if n_boot else None
    everything = np.ones(len(y), dtype=bool)
    whole = _group(y, pred, probs, lesions, everything, weights, positive)
    rows = [_row("overall", "all", whole, whole, min_lesions, min_positive_lesions, positive_class)]
    for name in names:
        values = attribute_values(frame, name, age_bands)
        if values is None:
            looked = ", ".join(ATTRIBUTES.get(name, (name,)))
            raise SkinLesionError(f"no column for attribute {name!r} (looked for {looked})")
        for value in sorted(values.unique(), key=lambda v: (v == UNKNOWN, _natural(v))):
            mask = (values == value).to_numpy()
            group = _group(y, pred, probs, lesions, mask, weights, positive)
            rows.append(_row(name, value, group, whole, min_lesions, min_positive_lesions, positive_class))
    table = pd.DataFrame(rows)
    table["reason"] = pd.Series([r["reason"] for r in rows], dtype=object)  # None, not NaN, where not small
    return table


def _natural(value: str) -> tuple[float, str]:
    """Sort key: numbers and age bands by their number, then text."""
    head = value.lstrip("<").split("-")[0].rstrip("+")
    try:
        return float(head) - (0.5 if value.startswith("<") else 0.0), value
    except ValueError:
        return float("inf"), value


def _group(y: np.ndarray, pred: np.ndarray, probs: np.ndarray, lesions: np.ndarray, mask: np.ndarray,
           weights: np.ndarray | None, positive: int | None) -> dict[str, Any]:  # fmt: skip
    ones = np.ones((1, int(mask.sum())))
    w = ones if weights is None else np.concatenate([ones, weights[:, mask]])  # row 0: the point estimate
    scored = _scores(y[mask], pred[mask], probs[mask], w, positive)
    point = {m: float(v[0]) for m, v in scored.items()}
    boot = {m: v[1:] for m, v in scored.items()} if weights is not None else None
    positive_lesions = 0 if positive is None else len(np.unique(lesions[mask & (y == positive)]))
    return {"n_images": int(mask.sum()), "n_lesions": len(np.unique(lesions[mask])),
            "n_positive_lesions": positive_lesions, "point": point, "boot": boot}  # fmt: skip


def _row(attribute: str, value: str, group: Mapping[str, Any], whole: Mapping[str, Any], min_lesions: int,
         min_positive_lesions: int, positive_class: str | None) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = {"attribute": attribute, "value": value,
                           **{k: group[k] for k in ("n_images", "n_lesions", "n_positive_lesions")}}  # fmt: skip
    for metric, value_ in group["point"].items():
        name = f"{positive_class}_{metric}" if metric in ("sensitivity", "specificity") else metric
        row[name] = _float(value_)
        row[f"{name}_lo"], row[f"{name}_hi"] = _bounds(group["boot"][metric] if group["boot"] else None)
        row[f"{name}_gap"] = _float(value_ - whole["point"][metric])
        gap = group["boot"][metric] - whole["boot"][metric] if group["boot"] else None
        row[f"{name}_gap_lo"], row[f"{name}_gap_hi"] = _bounds(gap)
    reasons = []
    if group["n_lesions"] < min_lesions:
        reasons.append(f"{group['n_lesions']} lesions < {min_lesions}")
    if positive_class is not None and group["n_positive_lesions"] < min_positive_lesions:
        reasons.append(f"{group['n_positive_lesions']} {positive_class} lesions < {min_positive_lesions}")
    row["small"], row["reason"] = bool(reasons), "; ".join(reasons) or None
    return row


def _float(value: Any) -> float:
    return float(value) if np.isfinite(value) else float("nan")


def _bounds(samples: np.ndarray | None) -> tuple[float, float]:
    interval = metrics._interval(np.asarray(samples, dtype=float)) if samples is not None else None
    return (interval[0], interval[1]) if interval else (float("nan"), float("nan"))
