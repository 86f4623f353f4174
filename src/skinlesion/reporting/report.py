"""The report's parts: figures from a run folder's files, the Grad-CAM gallery, warnings, the HTML page."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from sklearn.metrics import confusion_matrix

from skinlesion import metrics
from skinlesion.classes import CLASS_INDEX, FULL_NAMES
from skinlesion.decision.chain import DecisionChain
from skinlesion.inference.classifier import Classifier
from skinlesion.reporting import plots
from skinlesion.reporting.explain import explain
from skinlesion.reporting.explain import figure as cam_figure

HEADLINE_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy (mean recall)",
    "macro_f1": "macro F1",
    "weighted_f1": "weighted F1",
    "macro_auc": "macro AUC (one-vs-rest)",
    "log_loss": "log-loss",
    "brier": "Brier score",
    "ece": f"ECE ({metrics.ECE_BINS} bins)",
}


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def fmt(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def headline_rows(m: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    columns = {"images": m}
    if "with_tta" in m:
        columns[f"images + TTA ({m.get('tta_views', 4)} views)"] = m["with_tta"]
    if "lesion_level" in m:
        columns["lesions (mean probability)"] = m["lesion_level"]
    rows = [{"name": HEADLINE_NAMES[k], "cells": [fmt(c.get(k)) for c in columns.values()]} for k in HEADLINE_NAMES]
    return list(columns), rows


def per_class_rows(m: dict[str, Any], classes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for c in classes:
        pc = m["per_class"][c]
        rows.append(
            {"code": c, "name": FULL_NAMES[c], "support": pc["support"], **{k: fmt(pc[k]) for k in metrics.PER_CLASS}}
        )
    return rows


def split_rows(splits: pd.DataFrame, classes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for split, part in splits.groupby("split", sort=False):
        counts = part["dx"].value_counts()
        rows.append(
            {
                "split": split,
                "counts": [int(counts.get(c, 0)) for c in classes],
                "images": len(part),
                "lesions": part["lesion_id"].nunique(),
            }
        )
    return rows


def make_figures(
    run_dir: Path, preds: pd.DataFrame, m: dict[str, Any], classes: list[str], calibration: dict[str, Any] | None
) -> list[tuple[Path, str]]:
    """Every metric figure, as (file, caption)."""
    out = run_dir / "figures"
    y = preds["y_true"].map(CLASS_INDEX).to_numpy()
    probs = preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    pred = preds["y_pred"].map(CLASS_INDEX).to_numpy()  # evaluate's decisions (an operating point's, if any)
    figs = [
        (
            plots.confusion_matrix(
                confusion_matrix(y, pred, labels=range(len(classes))), classes, out / "confusion_matrix.png"
            ),
            "Confusion matrix: counts and row-normalised",
        ),
        (plots.roc_curves(y, probs, classes, out / "roc.png"), "ROC curves, one-vs-rest, with macro average"),
        (plots.pr_curves(y, probs, classes, out / "precision_recall.png"), "Precision–recall curves"),
    ]
    if calibration:
        rb, ra = calibration["reliability"]["before"], calibration["reliability"]["after"]
        arrays = [tuple(np.array(r[k], dtype=float) for k in ("confidence", "accuracy", "count")) for r in (rb, ra)]
        ece = (calibration["before"]["ece"], calibration["after"]["ece"])
        path = plots.reliability_diagram(*arrays[0], out / "reliability.png", after=arrays[1], ece=ece)
        caption = (
            f"Reliability before and after temperature scaling (T={calibration['temperature']:.3f}), "
            f"scored on {calibration['scored_on']}"
        )
    else:
        bins = metrics.reliability_bins(y, probs)
        path = plots.reliability_diagram(
            bins["confidence"],
            bins["accuracy"],
            bins["count"],
            out / "reliability.png",
            ece=(metrics.ece(y, probs), None),
        )
        caption = "Reliability diagram (not calibrated yet: run skinlesion calibrate for before/after)"
    figs.append((path, caption))
    figs.append(
        (
            # Of the probabilities, as the reliability diagram: is the top class right at this confidence?
            plots.confidence_histogram(probs.max(1), probs.argmax(1) == y, out / "confidence.png"),
            "Top-1 confidence of right and wrong predictions",
        )
    )
    f1 = [m["per_class"][c]["f1"] for c in classes]
    lo = [(e["ci95"] or [np.nan, np.nan])[0] for e in f1]
    hi = [(e["ci95"] or [np.nan, np.nan])[1] for e in f1]
    figs.append(
        (
            plots.per_class_f1(
                np.array([e["value"] or 0.0 for e in f1]), np.array(lo), np.array(hi), classes, out / "per_class_f1.png"
            ),
            "Per-class F1 with 95 % lesion-bootstrap intervals",
        )
    )
    if (run_dir / "history.csv").is_file():
        history = pd.read_csv(run_dir / "history.csv")
        figs.append((plots.learning_curves(history, out / "learning_curves.png"), "Learning curves (history.csv)"))
    return figs


def gallery_cases(preds: pd.DataFrame, classes: list[str]) -> list[tuple[pd.Series, str]]:
    """Per true class: the most confident right and the most confident wrong prediction."""
    probs = preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    frame = preds.assign(confidence=probs.max(1))
    cases = []
    for c in classes:
        rows = frame[frame["y_true"] == c]
        for kind, sel in (("right", rows["y_pred"] == c), ("wrong", rows["y_pred"] != c)):
            if sel.any():
                cases.append((rows[sel].sort_values("confidence", ascending=False).iloc[0], kind))
    return cases


def make_gallery(
    run_dir: Path,
    preds: pd.DataFrame,
    table: pd.DataFrame,
    device: str,
    method: str,
    with_prior: bool = False,
    with_operating_point: bool = False,
    pooled: bool = False,
):
    """Grad-CAM figures of the gallery cases, titled as predictions.csv was made: ``with_prior``, with the
    metadata-fused probabilities; ``with_operating_point``, with the operating point's decisions; ``pooled``
    (lesion pooling), with the map drawn for the lesion's decision, which the image alone may not reach."""
    classifier = Classifier.load(run_dir, "torch", device)
    changes = {"metadata_prior": None} if not with_prior else {}
    if not with_operating_point:
        changes["operating_point"] = None
    classifier = classifier.with_chain(**changes)
    rows_of = table.assign(image_id=table["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id")
    figs = []
    for row, kind in gallery_cases(preds, classifier.classes):
        image_id = str(row["image_id"])
        if image_id not in rows_of.index:
            continue
        clinical = rows_of.loc[[image_id]]
        image = classifier.decode(rows_of.loc[image_id, "path"])
        exp = explain(classifier, image, str(row["y_pred"]) if pooled else None, method=method, clinical=clinical)
        out = cam_figure(exp, run_dir / "figures" / f"cam_{row['y_true']}_{kind}.png", method)
        how = ", with its lesion" if pooled else ""
        if pooled and exp.predicted != row["y_pred"]:
            how += f"; this image alone: {exp.predicted}"
        caption = f"true {row['y_true']}, predicted {row['y_pred']} ({kind}, confidence {row['confidence']:.2f}{how})"
        figs.append((out, f"{caption} — {row['image_id']}"))
    return figs


# Figures with many columns or panels, shown across the report's full width.
WIDE_FIGURES = ("confusion_matrix.png", "learning_curves.png", "class_counts.png")


def embed(path: Path, caption: str) -> dict[str, Any]:
    return {"data": base64.b64encode(path.read_bytes()).decode("ascii"), "caption": caption,
            "wide": path.name in WIDE_FIGURES}  # fmt: skip


def render(context: dict[str, Any]) -> str:
    loader = PackageLoader("skinlesion.reporting", "templates")
    env = Environment(loader=loader, autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(**context)


def warnings_for(
    chain: DecisionChain, m: dict[str, Any], preds: pd.DataFrame, calibration: dict[str, Any] | None = None
) -> list[str]:
    """Where predictions.csv / metrics.json were not made with the chain best.pt holds now, or are optimistic."""
    warnings = []
    fits = (("the temperature", (calibration or {}).get("fit_on", "")),
            ("the operating point", (chain.operating_point or {}).get("fitted_on", "")))
    on_val = [what for what, on in fits if "val" in str(on)]
    if m.get("split") == "val":
        also = f", and {' and '.join(on_val)} {'were' if len(on_val) > 1 else 'was'} fitted on it" if on_val else ""
        warnings.append(f"These numbers are on the val split, which picked best.pt's epoch{also}: they are "
                        "optimistic. Score a held-out test part (train --test-frac) or an external set for unbiased "
                        "numbers.")  # fmt: skip
    if abs(float(m.get("temperature", 1.0)) - chain.temperature) > 1e-9:
        warnings.append(
            f"predictions.csv was made with temperature {m.get('temperature', 1.0):.3f} but best.pt now "
            f"has {chain.temperature:.3f}; re-run skinlesion evaluate for calibrated numbers."
        )
    if chain.metadata_prior is not None and not (m.get("metadata_prior") or {}).get("applied"):
        warnings.append(
            "best.pt holds a metadata prior that these predictions do not use (evaluated with --no-metadata-prior, "
            "before it was fitted, or on images without age/sex/site); re-run skinlesion evaluate to include it."
        )
    point = chain.operating_point
    if point is not None and not m.get("operating_point"):
        warnings.append(
            "best.pt holds an operating point that these predictions do not use (evaluated with --no-operating-point "
            "or before it was set); re-run skinlesion evaluate to decide with it."
        )
    elif m.get("operating_point") and (point is None or m["operating_point"]["bias"] != point["bias"]):
        warnings.append(
            "predictions.csv was decided with an operating point best.pt no longer holds; re-run skinlesion evaluate."
        )
    leak = m.get("overlap_with_training") or {}
    if leak.get("kept") and leak.get("images"):
        warnings.append(f"{leak['images']} of the scored images were trained on by this run (same image or lesion id) "
                        "and were kept with --keep-overlap: these metrics are optimistic.")  # fmt: skip
    pooled_here = bool((m.get("lesion_pooling") or {}).get("applied"))
    if chain.pool_lesions and not pooled_here and preds["lesion_id"].duplicated().any():
        warnings.append(
            "the run scores a lesion's images together, but these predictions were made image by image (evaluated "
            "with --no-pool-lesions or by an older skinlesion); re-run skinlesion evaluate to pool them."
        )
    return warnings
