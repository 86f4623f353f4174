"""The evidence a clinical reviewer asks of an evaluation, beside the headline metrics: per-class sensitivity /
specificity / PPV / NPV / AUC / ISIC auc_80 / average precision and melanoma's operating points
(clinical_metrics.py), the headline metrics per subgroup (subgroups.py -> subgroups.csv), the risk-coverage table of
referring the least confident first (decision/referral.py -> risk_coverage.csv), and what the run's safeguards do
on these images (conformal coverage and set size, referral rate, out-of-distribution refusals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.data.taxonomy import melanoma_code
from skinlesion.decision import conformal, referral
from skinlesion.decision.chain import Decisions
from skinlesion.decision.safeguards import Guarded, Safeguards
from skinlesion.evaluation import clinical_metrics, subgroups

CLINICAL = ("sensitivity", "specificity", "ppv", "npv", "auc_80", "average_precision")


@dataclass
class Evidence:
    metrics: dict[str, Any]  # merged into metrics.json
    subgroups: pd.DataFrame  # subgroups.csv
    risk_coverage: pd.DataFrame  # risk_coverage.csv


def evidence(y: np.ndarray, decisions: Decisions, table: pd.DataFrame, predictions: pd.DataFrame,
             guarded: Guarded | None, guards: Safeguards, bootstrap: int, seed: int) -> Evidence:  # fmt: skip
    """Everything above for the images of ``table`` (labels ``y``) and their decisions (single view)."""
    classes = list(decisions.classes)
    positive = melanoma_code(classes)
    groups = table["lesion_id"].astype(str).to_numpy()
    report = clinical_metrics.evaluate(y, decisions.labels, decisions.probabilities, groups, classes, positive,
                                       bootstrap, seed)  # fmt: skip
    out: dict[str, Any] = {"clinical": {"per_class": report["per_class"], "melanoma": report["positive_class"],
                                        "bootstrap": report["bootstrap"]}}  # fmt: skip
    frame = subgroups.with_attributes(predictions, table)
    sub = subgroups.subgroup_table(frame, classes, positive_class=positive, n_boot=bootstrap, seed=seed)
    risk = referral.risk_coverage(y, decisions.probabilities, decisions.labels, classes, positive)
    if guarded is not None and guards.any:
        out["safeguards"] = safeguard_scores(y, decisions, guarded, guards)
    return Evidence(out, sub, risk)


def safeguard_scores(y: np.ndarray, decisions: Decisions, guarded: Guarded, guards: Safeguards) -> dict[str, Any]:
    """What the run's safeguards did on these labelled images."""
    out: dict[str, Any] = {"settings": guards.summary()}
    if guarded.sets is not None:
        out["conformal"] = conformal.coverage_report(y, guarded.sets, list(decisions.classes))
    if guards.referral is not None:
        out["referral"] = referral.summary(dict(guards.referral), y, decisions.probabilities, decisions.labels)
    if guards.ood is not None:
        refused = guarded.out_of_distribution
        out["ood"] = {"refused": int(refused.sum()), "rate": float(refused.mean()) if len(refused) else None,
                      "target_rate": guards.ood.get("refusal_rate")}  # fmt: skip
    kept = ~guarded.refer
    out["referred"] = {"images": int(guarded.refer.sum()), "rate": float(guarded.refer.mean()) if len(y) else None,
                       "accuracy_of_the_rest": float((decisions.labels[kept] == y[kept]).mean()) if kept.any()
                       else None}  # fmt: skip
    return out


def per_class_lines(clinical: dict[str, Any], classes: list[str]) -> list[str]:
    """A plain-text table of the clinical per-class metrics (evaluate's print-out)."""
    head = f"{'class':<8}" + "".join(f"{m:>19}" for m in ("sensitivity", "specificity", "ppv", "auc_80"))
    rows = [head]
    for c in classes:
        entry = clinical["per_class"][c]
        rows.append(f"{c:<8}" + "".join(f"{_fmt(entry[m]):>19}" for m in ("sensitivity", "specificity", "ppv",
                                                                          "auc_80")))  # fmt: skip
    mel = clinical.get("melanoma")
    if mel:
        at = mel["sensitivity_at_specificity"]
        rows.append(f"{mel['class']} sensitivity at specificity " + ", ".join(f"{k}: {_fmt(v)}" for k, v in
                                                                               at.items()))  # fmt: skip
    return rows


def _fmt(entry: dict[str, Any]) -> str:
    if entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else "")
