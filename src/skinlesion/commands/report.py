"""``skinlesion report``: figures/*.png and one self-contained report.html (every image base64-embedded).

Reads only files of the run folder (config.json, splits.csv, history.csv, predictions.csv,
metrics.json, calibration.json, best.pt for the Grad-CAM gallery), so it reruns alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from skinlesion import fileio
from skinlesion.data.run_folder import read_config, run_table
from skinlesion.decision import operating_point
from skinlesion.decision.chain import DecisionChain
from skinlesion.device import resolve_device
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation.scoring import SUMMARY_ROWS
from skinlesion.model import checkpoint
from skinlesion.reporting import plots
from skinlesion.reporting.grid import make_grid
from skinlesion.reporting.report import (
    embed,
    fmt,
    headline_rows,
    make_figures,
    make_gallery,
    per_class_rows,
    read_json,
    render,
    split_rows,
    warnings_for,
)


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    config = read_config(run_dir)
    if not (run_dir / "predictions.csv").is_file() or not (run_dir / "metrics.json").is_file():
        raise SkinLesionError(f"no predictions in {run_dir}; run `skinlesion evaluate --run-dir {run_dir}` first")
    preds = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str, "lesion_id": str})
    m = read_json(run_dir / "metrics.json")
    calibration = read_json(run_dir / "calibration.json")
    meta = checkpoint.read(run_dir)
    classes = list(meta["classes"])
    table = run_table(run_dir)

    chain = DecisionChain.from_meta(meta)
    warnings = warnings_for(chain, m, preds, calibration)

    steps = tqdm(total=4, desc="report", unit="step", file=sys.stderr)
    steps.set_postfix_str("figures")
    figs = make_figures(run_dir, preds, m, classes, calibration)
    counts = table.pivot_table(index="dx", columns="split", values="image_id", aggfunc="count", fill_value=0)
    counts = counts.reindex(classes, fill_value=0)
    figs.append((plots.class_counts(counts, run_dir / "figures" / "class_counts.png"), "Images per class and split"))

    steps.update()
    steps.set_postfix_str("Grad-CAM gallery" if args.gallery else "lesion grid")
    gallery = []
    if args.gallery:
        used_prior = bool((m.get("metadata_prior") or {}).get("applied"))
        device = str(resolve_device(args.device))
        used_point = bool(m.get("operating_point"))
        pooled = bool((m.get("lesion_pooling") or {}).get("applied"))
        gallery = make_gallery(run_dir, preds, table, device, args.cam_method, used_prior, used_point, pooled)
    steps.update()
    steps.set_postfix_str("lesion grid")
    grid_image, _ = make_grid(table, n_per_class=args.grid_per_class, size=args.grid_size, seed=0)
    grid_path = fileio.atomic_write(run_dir / "figures" / "lesion_grid.png", lambda p: grid_image.save(p, "PNG"))

    # Any other PNG already in figures/ (e.g. from `skinlesion gradcam`) is embedded too.
    made = {p.resolve() for p, _ in [*figs, *gallery, (grid_path, "")]}
    others = [(p, f"{p.name}") for p in sorted((run_dir / "figures").glob("*.png")) if p.resolve() not in made]
    context = {
        "run_name": run_dir.name,
        "backbone": meta["backbone"],
        "img_size": meta["img_size"],
        "temperature": chain.temperature,
        "evaluated_on": m.get("split") or m.get("external") or "?",
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "warnings": warnings,
        "operating_point": operating_point.describe(m["operating_point"]) if m.get("operating_point") else None,
        "metrics": m,
        "classes": classes,
        "per_class": per_class_rows(m, classes),
        "split_table": split_rows(table, classes),
        "calibration": calibration,
        "figures": [embed(p, c) for p, c in [*figs, *others]],
        "gallery": [embed(p, c) for p, c in gallery],
        "cam_method": args.cam_method,
        "grid": embed(grid_path, f"Example lesions per class ({args.grid_per_class} per class)"),
        "config_json": json.dumps(config, indent=2, default=str),
    }
    context["headline_columns"], context["headline"] = headline_rows(m)
    steps.update()
    steps.set_postfix_str("report.html")
    out = fileio.write_text(run_dir / "report.html", render(context))
    steps.update()
    steps.close()
    n_img = len(context["figures"]) + len(context["gallery"]) + 1
    print(f"wrote {out} ({n_img} embedded images, {out.stat().st_size / 1e6:.1f} MB) and {run_dir / 'figures'}/")
    print("  " + "  ".join(f"{k} {fmt(m.get(k))}" for k in SUMMARY_ROWS[:3]))
