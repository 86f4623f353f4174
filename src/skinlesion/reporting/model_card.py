"""The model card of a run (Mitchell et al. 2019; what CLEAR Derm asks a dermatology-AI paper to state): intended and
not-intended use, training data (sources, counts, classes, split and grouping), preprocessing, metrics with
intervals (overall, per class, subgroups), calibration, the decision chain and safeguards, known limitations and the
data licences. Built from the run folder's files alone; ``report`` writes model_card.md + model_card.json, and
``serve`` answers it at ``/api/model-card``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from skinlesion import fileio
from skinlesion.data.run_folder import read_config
from skinlesion.data.sources.registry import SOURCES
from skinlesion.data.split import read_splits
from skinlesion.decision.chain import DecisionChain
from skinlesion.decision.safeguards import Safeguards
from skinlesion.model import checkpoint

INTENDED = ("Research on dermoscopic images of single skin lesions: comparing models, studying errors and "
            "calibration, teaching. Output is a second opinion for a qualified reader, never a diagnosis.")  # fmt: skip
NOT_INTENDED = ("Diagnosis or triage of patients; clinical (non-dermoscopic) photographs, whole-body or smartphone "
                "images; lesions or skin types unlike the training data (see limitations); any use without a "
                "clinician reading the image.")  # fmt: skip
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")


def build(run_dir: str | Path) -> dict[str, Any]:
    """The card as JSON-able data."""
    run_dir = Path(run_dir)
    meta, config = checkpoint.read(run_dir), read_config(run_dir)
    metrics = _json(run_dir / "metrics.json")
    splits = read_splits(run_dir / "splits.csv")
    return {
        "model": {"run": run_dir.name, "backbone": meta["backbone"], "epoch": meta.get("epoch"),
                  "classes": list(meta["classes"]), "class_names": meta.get("class_names"),
                  "recipe": config.get("recipe"), "versions": meta.get("versions")},  # fmt: skip
        "intended_use": INTENDED,
        "not_intended_use": NOT_INTENDED,
        "training_data": training_data(splits, config),
        "preprocessing": meta.get("preprocessing"),
        "decision_chain": DecisionChain.from_meta(meta).summary(),
        "safeguards": Safeguards.from_meta(meta).summary(),
        "calibration": {k: v for k, v in (_json(run_dir / "calibration.json") or {}).items() if k != "reliability"},
        "metrics": headline(metrics),
        "subgroups": subgroup_rows(run_dir / "subgroups.csv"),
        "limitations": limitations(splits, config, metrics),
        "licences": licences(splits),
    }


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def training_data(splits: pd.DataFrame, config: dict[str, Any]) -> dict[str, Any]:
    sources = splits["source"] if "source" in splits else pd.Series("ham10000", index=splits.index)
    counts = pd.crosstab(splits["dx"], splits["split"])
    grouped = "group_id" in splits and (splits["group_id"].str.startswith("patient:")).any()
    return {
        "folders": config.get("data_dir"), "label_set": config.get("classes") if isinstance(config.get("classes"), str)
        else "ham7", "sources": {str(k): int(v) for k, v in sources.value_counts().items()},
        "images_per_class_and_part": {str(c): {str(p): int(n) for p, n in row.items()} for c, row in counts.iterrows()},
        "grouping": "patients where a source knows them, else lesions" if grouped else "lesions",
        "n_images": len(splits), "n_lesions": int(splits["lesion_id"].nunique()),
    }  # fmt: skip


def headline(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    per_class = (metrics.get("clinical") or {}).get("per_class") or metrics.get("per_class")
    return {"scored_on": metrics.get("split") or metrics.get("external"), "n_images": metrics.get("n_images"),
            **{k: metrics.get(k) for k in HEADLINE}, "per_class": per_class,
            "melanoma_operating_points": (metrics.get("clinical") or {}).get("melanoma"),
            "safeguards": metrics.get("safeguards")}  # fmt: skip


def subgroup_rows(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    keep = [c for c in ("attribute", "value", "n_images", "n_lesions", "balanced_accuracy", "balanced_accuracy_lo",
                        "balanced_accuracy_hi", "balanced_accuracy_gap", "small", "reason") if c in table]
    return json.loads(table[keep].to_json(orient="records"))


def limitations(splits: pd.DataFrame, config: dict[str, Any], metrics: dict[str, Any] | None) -> list[str]:
    sources = set(splits["source"]) if "source" in splits else {"ham10000"}
    out = ["Trained on dermoscopic images only; photographs taken without a dermatoscope are out of its scope.",
           "Skin types: " + ("Fitzpatrick types were recorded for part of the data (see subgroups)."
                             if "pad-ufes-20" in sources else "not recorded in the training data; HAM10000 and the "
                             "ISIC sets come mostly from fair-skinned patients in Austria, Australia, Spain and the "
                             "USA, so performance on darker skin is unknown (the DDI study saw HAM10000-trained "
                             "models fall from AUC 0.72 to 0.57)."),
           "Scores come from one split of the data it was developed on; other sources score lower (a HAM10000 model "
           "ranked ISIC 2020's melanomas at AUC 0.56 in this project's own check)."]  # fmt: skip
    if metrics and metrics.get("split") == "val":
        out.append("The val part also picked the best epoch and fitted the post-hoc steps: its metrics are optimistic;"
                   " quote a held-out test part (train --test-frac) or an external set.")  # fmt: skip
    return out


def licences(splits: pd.DataFrame) -> dict[str, str]:
    sources = set(splits["source"]) if "source" in splits else {"ham10000"}
    return {s: f"{SOURCES[s].licence}; {SOURCES[s].citation}" for s in sorted(sources) if s in SOURCES}


def markdown(card: dict[str, Any]) -> str:
    """The card as a page."""
    m, data = card["model"], card["training_data"]
    lines = [f"# Model card: {m['run']}", "", "> Research tool, not a diagnosis. Nothing here is clinically validated.",
             "", f"**Model**: {m['backbone']}, recipe {m['recipe']}, epoch {m['epoch']}; classes "
             + ", ".join(f"{c} ({(m['class_names'] or {}).get(c, c)})" for c in m["classes"]) + ".", "",
             f"**Intended use**: {card['intended_use']}", "", f"**Not intended**: {card['not_intended_use']}", "",
             f"**Training data**: {data['n_images']:,} images of {data['n_lesions']:,} lesions from "
             + ", ".join(f"{k} ({v:,})" for k, v in data["sources"].items())
             + f", labels in `{data['label_set']}`; split grouped by {data['grouping']}.", "",
             f"**Preprocessing**: `{json.dumps(card['preprocessing'])}`", "",
             f"**Decision chain**: `{json.dumps(card['decision_chain'])}`", "",
             f"**Safeguards**: `{json.dumps(card['safeguards'])}`", ""]  # fmt: skip
    lines += metric_lines(card["metrics"]) + ["", "**Known limitations**:", *(f"- {x}" for x in card["limitations"]),
                                               "", "**Data licences**:"]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in card["licences"].items()]
    return "\n".join(lines) + "\n"


def metric_lines(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return ["**Metrics**: not evaluated yet (`skinlesion evaluate`)."]
    lines = [f"**Metrics** on {metrics['scored_on']} ({metrics['n_images']} images; 95 % lesion-bootstrap intervals):"]
    for k in HEADLINE:
        entry = metrics.get(k) or {}
        ci = entry.get("ci95")
        if entry.get("value") is not None:
            lines.append(f"- {k}: {entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    for c, entry in (metrics.get("per_class") or {}).items():
        sens, spec = entry.get("sensitivity", entry.get("recall")), entry.get("specificity")
        if sens and sens.get("value") is not None:
            lines.append(f"- {c}: sensitivity {sens['value']:.3f}"
                         + (f", specificity {spec['value']:.3f}" if spec and spec.get("value") is not None else ""))
    return lines


def write(run_dir: str | Path) -> tuple[Path, Path]:
    card = build(run_dir)
    run_dir = Path(run_dir)
    return (fileio.write_text(run_dir / "model_card.md", markdown(card)),
            fileio.write_json(run_dir / "model_card.json", card))  # fmt: skip
