"""Scoring a labelled table's decisions: the predictions.csv frame, metrics with lesion-bootstrap intervals,
one row per lesion, and the plain-text summary evaluate prints."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from skinlesion import metrics
from skinlesion.decision.chain import Decisions

SUMMARY_ROWS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss", "ece")


def predictions_frame(table: pd.DataFrame, decisions: Decisions) -> pd.DataFrame:
    """One row per image: ids, truth, the decision (``y_pred``) and every class probability."""
    frame = pd.DataFrame(
        {
            "image_id": table["image_id"].astype(str).to_numpy(),
            "lesion_id": table["lesion_id"].astype(str).to_numpy(),
            "y_true": table["dx"].astype(str).to_numpy(),
            "y_pred": np.asarray(decisions.classes)[decisions.labels],
        }
    )
    if "source" in table:  # several sources: every row says which it came from
        frame.insert(2, "source", table["source"].astype(str).to_numpy())
    if "group_id" in table and (table["group_id"].astype(str) != frame["lesion_id"]).any():
        frame.insert(2, "group_id", table["group_id"].astype(str).to_numpy())  # patients: the bootstrap's units
    for i, c in enumerate(decisions.classes):
        frame[f"p_{c}"] = decisions.probabilities[:, i]
    return frame


def lesion_level(frame: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, mean probabilities, lesion ids) with one row per lesion: a summary of the per-image rows for
    reporting (the arithmetic mean; with lesion pooling on, a lesion's rows are already equal)."""
    cols = [f"p_{c}" for c in classes]
    grouped = frame.groupby("lesion_id", sort=True)
    probs = grouped[cols].mean().to_numpy()
    truth = grouped["y_true"].agg(lambda s: s.mode().iloc[0])
    index = {c: i for i, c in enumerate(classes)}
    return truth.map(index).to_numpy(dtype=int), probs, truth.index.to_numpy()


def score(
    labels: np.ndarray, decisions: Decisions, groups: np.ndarray, n_boot: int, seed: int, decided: bool = True
) -> dict[str, Any]:
    """Metrics with lesion-bootstrap intervals; decision metrics follow the chain's decisions (``decided``) or
    the argmax of the probabilities."""
    y_pred = decisions.labels if decided else None
    return metrics.evaluate(labels, decisions.probabilities, groups, list(decisions.classes), n_boot=n_boot,
                            seed=seed, y_pred=y_pred)  # fmt: skip


def _fmt(entry: dict[str, Any]) -> str:
    if entry["value"] is None:
        return "n/a"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def summary_table(columns: dict[str, dict[str, Any]]) -> str:
    """Plain-text table: one row per headline metric, one column per scoring (images, TTA, lesions)."""
    header = ["metric", *columns]
    rows = [header, *[[m, *(_fmt(c[m]) for c in columns.values())] for m in SUMMARY_ROWS]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
