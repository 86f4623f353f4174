"""``skinlesion report``'s work: figures/*.png and one self-contained report.html (every image base64-embedded) from
a run folder's files alone (config.json, splits.csv, history.csv, predictions.csv, metrics.json,
calibration.json, best.pt for the Grad-CAM gallery), so it reruns alone."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from skinlesion import fileio
from skinlesion.data.run_folder import read_config, run_table
from skinlesion.decision import operating_point
from skinlesion.decision.chain import DecisionChain
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation.evidence import CLINICAL
from skinlesion.model import checkpoint
from skinlesion.reporting import clinical_plots, model_card, plots
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


@dataclass(frozen=True)
class ReportOptions:
    device: str = "cpu"
    cam_method: str = "gradcam"
    gallery: bool = True  # the Grad-CAM gallery
    grid_per_class: int = 2  # lesion-grid images per class
    grid_size: int = 160  # lesion-grid tile size in pixels


@dataclass
class RunFiles:
    """What the report reads of a run folder."""

    run_dir: Path
    config: dict[str, Any]
    preds: pd.DataFrame
    metrics: dict[str, Any]
    calibration: dict[str, Any] | None
    meta: dict[str, Any]
    table: pd.DataFrame

    @classmethod
    def read(cls, run_dir: Path) -> RunFiles:
        config = read_config(run_dir)
        if not (run_dir / "predictions.csv").is_file() or not (run_dir / "metrics.json").is_file():
            raise SkinLesionError(f"no predictions in {run_dir}; run `skinlesion evaluate --run-dir {run_dir}` first")
        preds = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str, "lesion_id": str})
        return cls(run_dir, config, preds, read_json(run_dir / "metrics.json"), read_json(run_dir / "calibration.json"),
                   checkpoint.read(run_dir), run_table(run_dir))  # fmt: skip


def write_report(run_dir: str | Path, options: ReportOptions | None = None) -> tuple[Path, int, dict[str, Any]]:
    """Write figures/ and report.html; the page, how many images it embeds, and the metrics it shows."""
    options = options or ReportOptions()
    f = RunFiles.read(Path(run_dir))
    classes = list(f.meta["classes"])
    steps = tqdm(total=4, desc="report", unit="step", file=sys.stderr)
    steps.set_postfix_str("figures")
    figs = make_figures(f.run_dir, f.preds, f.metrics, classes, f.calibration, meta=f.meta)
    counts = f.table.pivot_table(index="dx", columns="split", values="image_id", aggfunc="count", fill_value=0)
    counts = counts.reindex(classes, fill_value=0)
    figs.append((plots.class_counts(counts, f.run_dir / "figures" / "class_counts.png"), "Images per class and split"))
    figs += evidence_figures(f)
    steps.update()
    steps.set_postfix_str("Grad-CAM gallery" if options.gallery else "lesion grid")
    gallery = gallery_of(f, options)
    steps.update()
    steps.set_postfix_str("lesion grid")
    grid_image, _ = make_grid(f.table, options.grid_per_class, options.grid_size, 0, f.meta.get("class_names"))
    grid_path = fileio.atomic_write(f.run_dir / "figures" / "lesion_grid.png", lambda p: grid_image.save(p, "PNG"))
    # Any other PNG already in figures/ (e.g. from `skinlesion gradcam`) is embedded too.
    made = {p.resolve() for p, _ in [*figs, *gallery, (grid_path, "")]}
    others = [(p, p.name) for p in sorted((f.run_dir / "figures").glob("*.png")) if p.resolve() not in made]
    context = page_context(f, classes, options)
    context.update(figures=[embed(p, c) for p, c in [*figs, *others]], gallery=[embed(p, c) for p, c in gallery],
                   grid=embed(grid_path, f"Example lesions per class ({options.grid_per_class} per class)"))
    steps.update()
    steps.set_postfix_str("report.html")
    out = fileio.write_text(f.run_dir / "report.html", render(context))
    model_card.write(f.run_dir)
    steps.update()
    steps.close()
    return out, len(context["figures"]) + len(context["gallery"]) + 1, f.metrics


def evidence_figures(f: RunFiles) -> list[tuple[Path, str]]:
    """The subgroup forest plot and the risk-coverage curve, from evaluate's subgroups.csv / risk_coverage.csv."""
    figs = []
    sub, risk = f.run_dir / "subgroups.csv", f.run_dir / "risk_coverage.csv"
    if sub.is_file():
        path = clinical_plots.forest_plot(pd.read_csv(sub), "balanced_accuracy", f.run_dir / "figures" /
                                          "subgroups.png", "Balanced accuracy per subgroup (95 % intervals)")
        figs.append((path, "Subgroups: balanced accuracy per sex, age band, body site, source ... with the whole set's "
                     "value as the line; groups marked small have too few lesions to read"))  # fmt: skip
    if risk.is_file():
        path = clinical_plots.risk_coverage_plot(pd.read_csv(risk), f.run_dir / "figures" / "risk_coverage.png",
                                                 f.meta.get("referral"))  # fmt: skip
        figs.append((path, "Risk-coverage: referring the least confident images first, the rest's scores"))
    return figs


def gallery_of(f: RunFiles, options: ReportOptions) -> list[tuple[Path, str]]:
    """The Grad-CAM gallery, titled as predictions.csv was made (metadata prior, operating point, pooling)."""
    if not options.gallery:
        return []
    m = f.metrics
    used_prior = bool((m.get("metadata_prior") or {}).get("applied"))
    used_point = bool(m.get("operating_point"))
    pooled = bool((m.get("lesion_pooling") or {}).get("applied"))
    return make_gallery(f.run_dir, f.preds, f.table, options.device, options.cam_method, used_prior, used_point,
                        pooled)  # fmt: skip


def page_context(f: RunFiles, classes: list[str], options: ReportOptions) -> dict[str, Any]:
    """Everything report.html shows but the images."""
    m, chain = f.metrics, DecisionChain.from_meta(f.meta)
    context = {
        "run_name": f.run_dir.name,
        "backbone": f.meta["backbone"],
        "img_size": f.meta["img_size"],
        "temperature": chain.temperature,
        "evaluated_on": m.get("split") or m.get("external") or "?",
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "warnings": warnings_for(chain, m, f.preds, f.calibration),
        "operating_point": operating_point.describe(m["operating_point"]) if m.get("operating_point") else None,
        "metrics": m,
        "classes": classes,
        "per_class": per_class_rows(m, classes, f.meta.get("class_names")),
        "split_table": split_rows(f.table, classes),
        "calibration": f.calibration,
        "cam_method": options.cam_method,
        "config_json": json.dumps(f.config, indent=2, default=str),
    }
    context["headline_columns"], context["headline"] = headline_rows(m)
    context.update(clinical_context(m, classes))
    return context


def clinical_context(m: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The clinical metrics table, melanoma's operating points and what the safeguards did, for report.html."""
    clinical = m.get("clinical") or {}
    rows = [{"code": c, **{k: fmt(clinical["per_class"][c].get(k)) for k in CLINICAL}}
            for c in classes if c in clinical.get("per_class", {})]  # fmt: skip
    mel = clinical.get("melanoma")
    points = None
    if mel:
        sens = ", ".join(f"{fmt(v)} at specificity {k}" for k, v in mel["sensitivity_at_specificity"].items())
        points = f"{mel['class']}: sensitivity {sens}."
    found, lines = m.get("safeguards") or {}, []
    for name, text in (found.get("settings") or {}).items():
        if text:
            lines.append(f"{name}: {text if isinstance(text, str) else text.get('kind')}")
    if "conformal" in found:
        lines.append(f"conformal sets here: coverage {found['conformal']['coverage']:.3f}, mean size "
                     f"{found['conformal']['mean_size']:.2f}")  # fmt: skip
    if "referred" in found:
        lines.append(f"referred here: {found['referred']['images']} images ({found['referred']['rate']:.1%})")
    return {"clinical": rows, "melanoma_points": points, "safeguards": lines}
