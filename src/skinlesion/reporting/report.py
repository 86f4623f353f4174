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
from skinlesion.classes import FULL_NAMES
from skinlesion.decision.chain import DecisionChain
from skinlesion.inference.classifier import Classifier
from skinlesion.model import checkpoint
from skinlesion.reporting import plots
from skinlesion.reporting.explain import explain
from skinlesion.reporting.explain import figure as cam_figure
from skinlesion.training.tracking import SELECT

HEADLINE_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy (mean recall)",
    "macro_f1": "macro F1",
    "weighted_f1": "weighted F1",
    "macro_auc": "macro AUC (one-vs-rest)",
    "log_loss": "log-loss",
    "brier": "Brier score",
    "ece": f"ECE ({metrics.ECE_BINS} equal-width bins)",
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


def per_class_rows(m: dict[str, Any], classes: list[str], names: dict[str, str] | None = None
                   ) -> list[dict[str, Any]]:  # fmt: skip
    names = names or {}
    return [{"code": c, "name": names.get(c) or FULL_NAMES.get(c, c), "support": m["per_class"][c]["support"],
             **{k: fmt(m["per_class"][c][k]) for k in metrics.PER_CLASS}} for c in classes]  # fmt: skip


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


# Reliability bins of the report's figure: equal-mass, about MIN_PER_BIN images each (a bin of 20 has an accuracy
# interval of about ±0.2; fewer is noise), between MIN_BINS and MAX_BINS bins. metrics.json's ECE keeps its
# metrics.ECE_BINS equal-width bins, the usual definition that compares across runs and papers.
MIN_PER_BIN = 20
MIN_BINS, MAX_BINS = 3, metrics.ECE_BINS


def reliability_bin_count(n: int) -> int:
    """n // MIN_PER_BIN bins, at least MIN_BINS and at most MAX_BINS (140 images: 7 bins of 20)."""
    return int(np.clip(n // MIN_PER_BIN, MIN_BINS, MAX_BINS))


def equal_mass_bins(y: np.ndarray, probs: np.ndarray, n_bins: int | None = None) -> dict[str, np.ndarray]:
    """Reliability bins holding (nearly) the same number of images, cut by rank of the top-1 confidence; per bin
    count, mean confidence, accuracy of the argmax (as metrics.ece scores the probabilities), lowest / highest
    confidence."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == np.asarray(y)).astype(float)
    n_bins = min(n_bins or reliability_bin_count(len(conf)), max(1, len(conf)))
    groups = [g for g in np.array_split(np.argsort(conf, kind="stable"), n_bins) if len(g)]
    return {
        "count": np.array([len(g) for g in groups], dtype=float),
        "confidence": np.array([conf[g].mean() for g in groups]),
        "accuracy": np.array([correct[g].mean() for g in groups]),
        "lo": np.array([conf[g].min() for g in groups]),
        "hi": np.array([conf[g].max() for g in groups]),
    }


def merge_sparse_bins(bins: dict[str, Any], min_count: int = MIN_PER_BIN) -> dict[str, np.ndarray]:
    """Stored equal-width bins (calibration.json: count, confidence, accuracy; empty bins None) with neighbours
    merged left to right until each holds ``min_count`` images (a short tail joins the last group); merged means
    are count-weighted, so they equal the bin statistics of the merged images exactly."""
    count = np.asarray(bins["count"], dtype=float)
    conf = np.nan_to_num(np.asarray(bins["confidence"], dtype=float))
    acc = np.nan_to_num(np.asarray(bins["accuracy"], dtype=float))
    groups: list[list[int]] = [[]]
    for i in np.flatnonzero(count > 0):
        if count[groups[-1]].sum() >= min_count:
            groups.append([])
        groups[-1].append(int(i))
    if len(groups) > 1 and count[groups[-1]].sum() < min_count:
        groups[-2] += groups.pop()
    groups = [g for g in groups if g]
    n = np.array([count[g].sum() for g in groups])
    return {
        "count": n,
        "confidence": np.array([(count[g] * conf[g]).sum() for g in groups]) / np.maximum(n, 1),
        "accuracy": np.array([(count[g] * acc[g]).sum() for g in groups]) / np.maximum(n, 1),
    }


def binned_ece(bins: dict[str, np.ndarray]) -> float:
    """ECE on given bins: sum over bins of (count / N) |accuracy - confidence|."""
    n = np.asarray(bins["count"], dtype=float)
    gap = np.abs(np.asarray(bins["accuracy"], dtype=float) - np.asarray(bins["confidence"], dtype=float))
    return float((n * np.nan_to_num(gap)).sum() / n.sum()) if n.sum() else float("nan")


def reliability_figures(
    out: Path, y: np.ndarray, probs: np.ndarray, m: dict[str, Any], calibration: dict[str, Any] | None
) -> list[tuple[Path, str]]:
    """The headline's probabilities on equal-mass bins; with calibration.json, calibrate's before / after too."""
    bins = equal_mass_bins(y, probs)
    n, k, ece_here = len(y), len(bins["count"]), binned_ece(bins)
    where = m.get("split") or m.get("external") or "?"
    curve = plots.ReliabilityCurve(f"predictions.csv (ECE {ece_here:.3f} on these bins)", **bins)
    path = plots.reliability_diagram([curve], out / "reliability.png", f"Reliability: {where}, {n} images")
    ece_json = (m.get("ece") or {}).get("value")
    caption = (f"Reliability of the headline's probabilities (predictions.csv, {n} images of {where}): {k} equal-mass "
               f"bins of about {n // k} images (rule: one bin per {MIN_PER_BIN} images, {MIN_BINS} to {MAX_BINS}), "
               f"the bar through each point spans its confidences. ECE on these bins {ece_here:.3f}; metrics.json's "
               f"ECE{f' ({ece_json:.3f})' if ece_json is not None else ''} uses {metrics.ECE_BINS} equal-width bins "
               "over (0, 1], the usual definition, comparable across runs.")  # fmt: skip
    figs = [(path, caption)]
    if calibration:
        curves = []
        for key, name in (("before", "before, T = 1"), ("after", f"after, T = {calibration['temperature']:.3f}")):
            merged = merge_sparse_bins(calibration["reliability"][key])
            curves.append(plots.ReliabilityCurve(f"{name} (ECE {calibration[key]['ece']:.3f})", **merged))
        path = plots.reliability_diagram(curves, out / "calibration_reliability.png", "Temperature scaling")
        figs.append((path, f"calibrate's check before and after temperature scaling, scored on "
                           f"{calibration['scored_on']} ({calibration['n_scored']} images): calibration.json's "
                           f"{metrics.ECE_BINS} equal-width bins, neighbours merged until each holds at least "
                           f"{MIN_PER_BIN} images; the ECE in the legend is calibration.json's, on the "
                           f"{metrics.ECE_BINS} bins."))  # fmt: skip
    return figs


def best_epoch_of(meta: dict[str, Any]) -> tuple[int | None, str]:
    """The epoch best.pt holds and the history column that chose it (the run's ``select``, default macro_f1)."""
    select = meta.get("select") or (meta.get("config") or {}).get("select") or "macro_f1"
    column = SELECT.get(select, SELECT["macro_f1"])[0]
    epoch = meta.get("epoch")
    return (int(epoch) if epoch is not None else None), column


def history_note(history: pd.DataFrame, best_epoch: int | None, column: str, m: dict[str, Any],
                 meta: dict[str, Any]) -> str:  # fmt: skip
    """Why history.csv's numbers at the best epoch need not equal the headline's, naming both."""
    if best_epoch is None or not (history["epoch"] == best_epoch).any():
        return ""
    row = history.loc[history["epoch"] == best_epoch].iloc[0]
    where = m.get("split") or m.get("external") or "?"
    best = "lowest" if column == "val_loss" else "highest"
    text = f"Best epoch {best_epoch} ({best} {column}, the epoch best.pt holds) is marked. "
    pairs = [(c, k) for c, k in (("val_acc", "accuracy"), ("val_macro_f1", "macro_f1")) if c in row]
    text += "history.csv there: " + ", ".join(f"{c} {row[c]:.3f}" for c, _ in pairs)
    text += f"; the headline on {where}: " + ", ".join(f"{k} {fmt(m.get(k)).split(' ')[0]}" for _, k in pairs) + ". "
    if where != "val":
        return text + f"Different images: history.csv scores the val split, the headline {where}."
    steps = []
    if meta.get("logit_adjustment"):
        steps.append("a prior correction added to best.pt's classifier bias after training")
    if (m.get("metadata_prior") or {}).get("applied"):
        steps.append("the metadata prior (age, sex, site)")
    if m.get("operating_point"):
        steps.append("the operating point")
    if (m.get("lesion_pooling") or {}).get("applied"):
        steps.append("lesion pooling")
    amp = (meta.get("config") or {}).get("amp_dtype")
    text += ("history.csv is the training loop's own validation pass: the argmax of the network's logits, one "
             f"centre view, image by image{f', in {amp} mixed precision' if amp else ''}. The headline scores "
             "evaluate's predictions.csv, decided by the run's decision chain")  # fmt: skip
    if steps:
        text += f": {', '.join(steps)} move decisions (the temperature alone does not), so the two can differ."
    else:
        text += (": here only the temperature applies, which keeps the argmax, so the two differ at most by "
                 "numerical precision.")  # fmt: skip
    if "with_tta" in m:
        text += f" The TTA column averages {m.get('tta_views', 4)} views, which history.csv does not."
    return text


def make_figures(
    run_dir: Path,
    preds: pd.DataFrame,
    m: dict[str, Any],
    classes: list[str],
    calibration: dict[str, Any] | None,
    meta: dict[str, Any] | None = None,
) -> list[tuple[Path, str]]:
    """Every metric figure, as (file, caption). ``meta``: best.pt's entries (read here when not given) for the
    learning curves' best epoch."""
    out = run_dir / "figures"
    index = {c: i for i, c in enumerate(classes)}
    y = preds["y_true"].map(index).to_numpy()
    probs = preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    pred = preds["y_pred"].map(index).to_numpy()  # evaluate's decisions (an operating point's, if any)
    figs = [
        (
            plots.confusion_matrix(
                confusion_matrix(y, pred, labels=range(len(classes))), classes, out / "confusion_matrix.png"
            ),
            "Confusion matrix: counts and row-normalised",
        ),
        (plots.roc_curves(y, probs, classes, out / "roc.png"), "ROC curves, one-vs-rest, with macro average"),
        (plots.pr_curves(y, probs, classes, out / "precision_recall.png"), "Precision–recall curves"),
        *reliability_figures(out, y, probs, m, calibration),
    ]
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
        if meta is None:
            meta = checkpoint.read(run_dir) if (run_dir / "best.pt").is_file() else {}
        best_epoch, column = best_epoch_of(meta)
        path = plots.learning_curves(history, out / "learning_curves.png", best_epoch, column)
        caption = "Learning curves (history.csv). " + history_note(history, best_epoch, column, m, meta)
        figs.append((path, caption.strip()))
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
        caption += f" — {row['image_id']}"
        if peak_on_border(exp.cam):
            caption += f". Border peak: the map's maximum lies in the outer {BORDER_BAND:.1%} of the image (see above)"
        figs.append((out, caption))
    return figs


# Width of the border ring, as a fraction of the image's side, where a map's peak points at the frame (rulers,
# vignetting, the dark corners of a dermatoscope) rather than the lesion, which the crop usually centres.
BORDER_BAND = 0.125


def peak_on_border(cam: np.ndarray, band: float = BORDER_BAND) -> bool:
    """Whether the map's maximum lies within ``band`` of the image's height or width from an edge."""
    h, w = cam.shape
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return bool(min(r, h - 1 - r) < band * h or min(c, w - 1 - c) < band * w)


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
