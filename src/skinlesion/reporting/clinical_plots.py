"""Figures of the clinical evidence: a subgroup forest plot and the risk-coverage curve of referral. One pure
function each (a table in, one PNG out), matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from skinlesion import fileio  # noqa: E402
from skinlesion.errors import SkinLesionError  # noqa: E402


def _save(fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    fileio.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


def forest_plot(table: pd.DataFrame, metric: str, path: str | Path, title: str | None = None) -> Path:
    """Per subgroup of ``subgroups.subgroup_table``'s rows: ``metric`` with its 95 % interval, a dashed line at the
    whole set's value; groups marked small are drawn hollow and grey, labelled with their reason's first part;
    groups where the metric is undefined are listed with "n/a"."""
    if metric not in table or "attribute" not in table:
        raise SkinLesionError(f"no column {metric!r} in the subgroup table")
    overall = table[table["attribute"] == "overall"]
    groups = table[table["attribute"] != "overall"].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * max(len(groups), 1)))
    y = np.arange(len(groups))[::-1]
    labels = []
    for yi, (_, row) in zip(y, groups.iterrows(), strict=True):
        value, lo, hi = row[metric], row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
        small = bool(row.get("small", False))
        label = f"{row['attribute']} = {row['value']} ({row['n_lesions']} lesions)"
        if not np.isfinite(value):
            label += "  n/a"
        elif small:
            label += "  *"
        labels.append(label)
        if not np.isfinite(value):
            continue
        color = "0.6" if small else "tab:blue"
        if lo is not None and np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [yi, yi], color=color, lw=1.6)
        ax.plot([value], [yi], "o", color=color, mfc="white" if small else color, ms=6)
    if not overall.empty and np.isfinite(overall[metric].iloc[0]):
        whole = overall[metric].iloc[0]
        ax.axvline(whole, color="tab:red", ls="--", lw=1, label=f"all images {whole:.3f}")
        ax.legend(loc="best", fontsize=9)
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.8, len(groups) - 0.2)
    ax.set_xlabel(f"{metric} (95 % lesion-bootstrap interval)")
    note = " — * few lesions, hollow" if groups.get("small", pd.Series(dtype=bool)).any() else ""
    ax.set_title((title or f"{metric} by subgroup") + note)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def risk_coverage_plot(
    table: pd.DataFrame,
    path: str | Path,
    rule: Mapping[str, Any] | None = None,
    metrics: Sequence[str] | None = None,
) -> Path:
    """``referral.risk_coverage``'s curves (accuracy, balanced accuracy, and the positive class's sensitivity when
    present) against coverage; ``rule``: a fitted referral rule, marked at its coverage on the fitting images."""
    columns = list(metrics) if metrics is not None else [c for c in table.columns if c not in
                                                          ("threshold", "n_kept", "coverage")]  # fmt: skip
    if "coverage" not in table or any(c not in table for c in columns):
        raise SkinLesionError("the risk-coverage table needs coverage and the metric columns")
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for column in columns:
        ax.plot(table["coverage"], table[column], lw=1.6, label=column.replace("_", " "))
    if rule is not None and rule.get("on_fit"):
        coverage = rule["on_fit"]["coverage"]
        ax.axvline(coverage, color="0.3", ls=":", lw=1.2, label=f"referral rule: keeps {coverage:.0%}")
    ax.set(xlabel="coverage (fraction of images answered, least confident referred first)",
           ylabel="score of the kept images", xlim=(0, 1.01), title="Risk-coverage (referral)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    return _save(fig, path)
