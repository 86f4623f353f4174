"""``skinlesion report``: figures/*.png and one self-contained report.html (every image base64-embedded).

Reads only files of the run folder (config.json, splits.csv, history.csv, predictions.csv,
metrics.json, calibration.json, best.pt for the Grad-CAM gallery), so it reruns alone.
"""

from __future__ import annotations

import argparse
import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from sklearn.metrics import confusion_matrix

from skinlesion import checkpoint, fileio, grid, metadata_prior, metrics, operating_point, plots
from skinlesion.classes import CLASS_INDEX, FULL_NAMES
from skinlesion.data.images import open_rgb
from skinlesion.device import resolve_device
from skinlesion.errors import SkinLesionError
from skinlesion.evaluate import SUMMARY_ROWS, read_config, run_table

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


def _read_json(path: Path) -> dict[str, Any] | None:
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
    from skinlesion.explain import explain, figure
    from skinlesion.inference import Predictor

    predictor = Predictor(run_dir, device=device)
    if not with_operating_point:
        predictor.operating_point = None
    rows_of = table.assign(image_id=table["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id")
    prior = predictor.metadata_prior if with_prior else None
    figs = []
    for row, kind in gallery_cases(preds, predictor.classes):
        image_id = str(row["image_id"])
        if image_id not in rows_of.index:
            continue
        offset = metadata_prior.offsets(prior, rows_of.loc[[image_id]]) if prior else None
        image = open_rgb(rows_of.loc[image_id, "path"])
        exp = explain(predictor, image, str(row["y_pred"]) if pooled else None, method=method, offset=offset)
        out = figure(exp, run_dir / "figures" / f"cam_{row['y_true']}_{kind}.png", method)
        how = ", with its lesion" if pooled else ""
        if pooled and exp.predicted != row["y_pred"]:
            how += f"; this image alone: {exp.predicted}"
        caption = f"true {row['y_true']}, predicted {row['y_pred']} ({kind}, confidence {row['confidence']:.2f}{how})"
        figs.append((out, f"{caption} — {row['image_id']}"))
    return figs


def _embed(path: Path, caption: str) -> dict[str, str]:
    return {"data": base64.b64encode(path.read_bytes()).decode("ascii"), "caption": caption}


def render(context: dict[str, Any]) -> str:
    env = Environment(loader=PackageLoader("skinlesion", "templates"), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(**context)


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    config = read_config(run_dir)
    if not (run_dir / "predictions.csv").is_file() or not (run_dir / "metrics.json").is_file():
        raise SkinLesionError(f"no predictions in {run_dir}; run `skinlesion evaluate --run-dir {run_dir}` first")
    preds = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str, "lesion_id": str})
    m = _read_json(run_dir / "metrics.json")
    calibration = _read_json(run_dir / "calibration.json")
    meta = checkpoint.read(run_dir)
    classes = list(meta["classes"])
    table = run_table(run_dir)

    warnings = []
    if abs(float(m.get("temperature", 1.0)) - float(meta.get("temperature", 1.0))) > 1e-9:
        warnings.append(
            f"predictions.csv was made with temperature {m.get('temperature', 1.0):.3f} but best.pt now "
            f"has {meta['temperature']:.3f}; re-run skinlesion evaluate for calibrated numbers."
        )

    if "metadata_prior" in meta and not (m.get("metadata_prior") or {}).get("applied"):
        warnings.append(
            "best.pt holds a metadata prior that these predictions do not use (evaluated with --no-metadata-prior, "
            "before it was fitted, or on images without age/sex/site); re-run skinlesion evaluate to include it."
        )

    point = meta.get("operating_point")
    if point is not None and not m.get("operating_point"):
        warnings.append(
            "best.pt holds an operating point that these predictions do not use (evaluated with --no-operating-point "
            "or before it was set); re-run skinlesion evaluate to decide with it."
        )
    elif m.get("operating_point") and (point is None or m["operating_point"]["bias"] != point["bias"]):
        warnings.append(
            "predictions.csv was decided with an operating point best.pt no longer holds; re-run skinlesion evaluate."
        )

    pooled_run = bool((meta.get("config") or {}).get("pool_lesions"))
    pooled_here = bool((m.get("lesion_pooling") or {}).get("applied"))
    if pooled_run and not pooled_here and preds["lesion_id"].duplicated().any():
        warnings.append(
            "the run scores a lesion's images together, but these predictions were made image by image (evaluated "
            "with --no-pool-lesions or by an older skinlesion); re-run skinlesion evaluate to pool them."
        )

    figs = make_figures(run_dir, preds, m, classes, calibration)
    counts = table.pivot_table(index="dx", columns="split", values="image_id", aggfunc="count", fill_value=0)
    counts = counts.reindex(classes, fill_value=0)
    figs.append((plots.class_counts(counts, run_dir / "figures" / "class_counts.png"), "Images per class and split"))

    gallery = []
    if args.gallery:
        used_prior = bool((m.get("metadata_prior") or {}).get("applied"))
        device = str(resolve_device(args.device))
        used_point = bool(m.get("operating_point"))
        pooled = bool((m.get("lesion_pooling") or {}).get("applied"))
        gallery = make_gallery(run_dir, preds, table, device, args.cam_method, used_prior, used_point, pooled)
    grid_image, _ = grid.make_grid(table, n_per_class=args.grid_per_class, size=args.grid_size, seed=0)
    grid_path = fileio.atomic_write(run_dir / "figures" / "lesion_grid.png", lambda p: grid_image.save(p, "PNG"))

    # Any other PNG already in figures/ (e.g. from `skinlesion gradcam`) is embedded too.
    made = {p.resolve() for p, _ in [*figs, *gallery, (grid_path, "")]}
    others = [(p, f"{p.name}") for p in sorted((run_dir / "figures").glob("*.png")) if p.resolve() not in made]
    context = {
        "run_name": run_dir.name,
        "backbone": meta["backbone"],
        "img_size": meta["img_size"],
        "temperature": float(meta.get("temperature", 1.0)),
        "evaluated_on": m.get("split") or m.get("external") or "?",
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "warnings": warnings,
        "operating_point": operating_point.describe(m["operating_point"]) if m.get("operating_point") else None,
        "metrics": m,
        "classes": classes,
        "per_class": per_class_rows(m, classes),
        "split_table": split_rows(table, classes),
        "calibration": calibration,
        "figures": [_embed(p, c) for p, c in [*figs, *others]],
        "gallery": [_embed(p, c) for p, c in gallery],
        "cam_method": args.cam_method,
        "grid": _embed(grid_path, f"Example lesions per class ({args.grid_per_class} per class)"),
        "config_json": json.dumps(config, indent=2, default=str),
    }
    context["headline_columns"], context["headline"] = headline_rows(m)
    out = fileio.write_text(run_dir / "report.html", render(context))
    n_img = len(context["figures"]) + len(context["gallery"]) + 1
    print(f"wrote {out} ({n_img} embedded images, {out.stat().st_size / 1e6:.1f} MB) and {run_dir / 'figures'}/")
    print("  " + "  ".join(f"{k} {fmt(m.get(k))}" for k in SUMMARY_ROWS[:3]))
