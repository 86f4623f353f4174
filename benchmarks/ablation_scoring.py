"""Scoring a variant through skinlesion's decision chain: what ``skinlesion evaluate`` would produce for a run
with the variant's steps stored, with the fitted steps (temperature, operating point) fitted out of fold.

A variant ``<views>[+la][+meta][+op][+pool]`` (ablation_rows.parse_variant) is scored from a row's cached
logits (ablation_logits.py) as follows; every probability and decision comes from ``DecisionChain``:

1. the network's view logits: the first 1, 4 or 8 cached raw views (V, N, C), plus, for "+la", the logit
   adjustment's offset -tau log(train prior) (what ``train --logit-adjust-tau`` puts in best.pt's classifier
   bias, so the network's logits carry it);
2. the chain (``variant_chain``): the metadata prior ``metadata_prior_of`` fits on the run's train rows for
   "+meta", ``pool_lesions`` with the val lesion ids for "+pool", the operating point for "+op"
   (targets OPERATING_POINT); the variant's views are averaged by the chain;
3. out of fold: the val lesions are split in 2 folds (``lesion_folds(y, lesions, 2, seed=0)``); for each fold,
   the temperature is fitted as ``skinlesion calibrate`` stores it (single-view logits, without offsets) on the
   other fold, the operating point is set on the other fold as ``set_operating_point`` sets it (through the
   chain with that temperature, no pooling: single-view bias on the first view, TTA bias on the variant's
   views), and the held fold is scored by that fold's full chain.

Every headline metric comes from these chain outputs; ``ece_before`` alone is the same chain at T = 1 (the
probabilities before temperature scaling, pooled and with the prior where the variant has them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ablation_rows import DELTAS, N_VIEWS, OPERATING_POINT, parse_variant

from skinlesion.classes import CLASS_INDEX, CLASSES
from skinlesion.decision import operating_point
from skinlesion.decision.chain import DecisionChain

SCORING = "chain"  # the CSV's ``scoring`` for lines scored here
N_FOLDS = 2
FOLD_SEED = 0
TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


# ------------------------------------------------------------------------------------------ the chain
def variant_chain(variant: str, meta: Mapping[str, Any], **settings: Any) -> DecisionChain:
    """The chain ``variant`` is scored with: ``DecisionChain.from_meta(meta)`` (best.pt's entries, as
    ``checkpoint.read`` gives them) with ``settings`` (temperature, metadata_prior, operating_point) replacing
    the stored ones; the metadata prior and the operating point are kept only where the variant names them,
    lesion pooling is on exactly for "+pool", and the TTA views are the variant's."""
    chain = DecisionChain.from_meta(meta).replace(**settings)
    v = parse_variant(variant)
    n = N_VIEWS[v.views]
    return chain.replace(
        metadata_prior=chain.metadata_prior if v.meta else None,
        operating_point=chain.operating_point if v.op else None,
        pool_lesions=v.pool,
        tta_views=n if n > 1 else chain.tta_views,
    )


def stored_chain(run_dir: Path, variant: str) -> DecisionChain:
    """``variant_chain`` with the settings the run's best.pt stores (its temperature, prior, operating point):
    for the check that the ablation's chain is the one ``skinlesion evaluate`` runs."""
    from skinlesion.model import checkpoint

    return variant_chain(variant, checkpoint.read(run_dir))


def network_views(data: Mapping[str, Any], variant: str) -> np.ndarray:
    """The variant's view logits (V, N, C): the first V raw views plus the logit adjustment for "+la"."""
    from skinlesion.model.logit_adjustment import offset

    v = parse_variant(variant)
    n = N_VIEWS[v.views]
    views = np.asarray(data["views"])
    if views.shape[0] < n:
        raise ValueError(f"{variant} needs {n} views; the logits have {views.shape[0]}")
    raw = views[:n].astype(np.float64) - np.asarray(data.get("stored_offset", 0.0), dtype=np.float64)
    return raw + offset(data["counts"], v.tau) if v.tau else raw


def fit_operating_point(chain: DecisionChain, views: np.ndarray, offsets: np.ndarray | None, y: np.ndarray,
                        targets: Mapping[str, float], **about: Any) -> dict[str, Any]:  # fmt: skip
    """An operating point set on these images exactly as ``evaluation.fitting.set_operating_point`` sets it:
    per image (no pooling, no operating point), on the chain's fused logits of the first view (the single-view
    bias) and of all ``views`` (the TTA bias, when there are several)."""
    chain = chain.replace(operating_point=None, pool_lesions=False)
    tta = views.shape[0] > 1
    return operating_point.build(
        chain.logits(views[:1], offsets), y, chain.classes, targets,
        chain.logits(views, offsets) if tta else None,
        tta_views=views.shape[0] if tta else None, temperature=chain.temperature,
        metadata_prior=chain.metadata_prior is not None, **about,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ out of fold
@dataclass(frozen=True)
class Outputs:
    """A variant's chain outputs on the val images, each fold scored with settings fitted on the other."""

    probabilities: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,) the chain's decisions
    uncalibrated: np.ndarray  # (N, C) the same chain at T = 1 (ece_before)
    temperatures: tuple[float, ...]  # per fold, fitted on the other fold
    points: tuple[dict[str, Any] | None, ...]  # per fold, set on the other fold ("+op")
    y: np.ndarray
    lesions: np.ndarray


def _rows(a: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[rows]


def chain_outputs(data: Mapping[str, Any], variant: str, classes: tuple[str, ...] = CLASSES) -> Outputs:
    """Score ``variant`` on ``data`` (ablation_logits: views, labels, lesions, counts; prior and table for
    "+meta") through the chain, the temperature and the operating point fitted out of fold."""
    from skinlesion.data.split import lesion_folds
    from skinlesion.decision.temperature import fit_temperature

    v = parse_variant(variant)
    y, lesions = np.asarray(data["labels"]), np.asarray(data["lesions"])
    meta = {"classes": list(classes)}
    prior = data.get("prior") if v.meta else None
    if v.meta and (prior is None or data.get("table") is None):
        raise ValueError(f"{variant}: no metadata prior or val table for this row")
    views = network_views(data, variant)
    base = variant_chain(variant, meta, metadata_prior=prior)  # T = 1, no operating point
    offsets = base.offsets(data.get("table"))
    targets = operating_point.parse_targets(OPERATING_POINT, classes)

    fold = lesion_folds(y, lesions, N_FOLDS, FOLD_SEED)
    probs = np.empty(views.shape[1:], dtype=np.float64)
    labels = np.empty(len(y), dtype=int)
    temps, points = [], []
    for f in range(N_FOLDS):
        fit, held = fold != f, fold == f
        t = fit_temperature(views[0][fit], y[fit])  # what `skinlesion calibrate` stores: single view, no offsets
        point = None
        if v.op:
            point = fit_operating_point(base.replace(temperature=t), views[:, fit], _rows(offsets, fit), y[fit],
                                        targets, fitted_on=f"val fold {1 - f} of {N_FOLDS}")  # fmt: skip
        chain = variant_chain(variant, meta, temperature=t, metadata_prior=prior, operating_point=point)
        decisions = chain(views[:, held], _rows(offsets, held), lesions[held])  # pools only with "+pool"
        probs[held], labels[held] = decisions.probabilities, decisions.labels
        temps.append(t)
        points.append(point)
    uncalibrated = base(views, offsets, lesions).probabilities
    return Outputs(probs, labels, uncalibrated, tuple(temps), tuple(points), y, lesions)


# ------------------------------------------------------------------------------------------ metrics
def score_variant(data: Mapping[str, Any], variant: str, n_boot: int,
                  outputs: Outputs | None = None) -> dict[str, Any]:  # fmt: skip
    """The CSV columns of one (row, variant) line: every headline metric from ``chain_outputs``, with its
    lesion-bootstrap 95 % interval; ``ece_before`` is the same chain at T = 1."""
    from skinlesion import metrics

    out = outputs if outputs is not None else chain_outputs(data, variant)
    classes = list(CLASSES)
    m = metrics.evaluate(out.y, out.probabilities, out.lesions, classes, n_boot, seed=0, y_pred=out.labels)
    m_t1 = metrics.evaluate(out.y, out.uncalibrated, out.lesions, classes, n_boot, seed=0)
    entries = {
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": m["macro_f1"],
        "macro_auc": m["macro_auc"],
        "ece_before": m_t1["ece"],  # T = 1: before temperature scaling
        "ece_after": m["ece"],  # the chain's out-of-fold temperature
        "mel_recall": m["per_class"]["mel"]["recall"],
        "mel_auc": m["per_class"]["mel"]["auc"],
    }
    line: dict[str, Any] = {"scoring": SCORING, "temperature": float(np.mean(out.temperatures))}
    line.update({f"temperature_fold{f}": t for f, t in enumerate(out.temperatures)})
    for name, e in entries.items():
        lo, hi = e["ci95"] or (np.nan, np.nan)
        line.update({name: np.nan if e["value"] is None else e["value"], f"{name}_lo": lo, f"{name}_hi": hi})
    return line


def paired_deltas(out: Outputs, ref: Outputs, n_boot: int) -> dict[str, float]:
    """Difference to the reference row's plain line (``ref``, its chain outputs) with its 95 % interval from a
    *paired* lesion bootstrap: both are scored on the same resamples, so split noise common to both cancels. An
    interval that excludes 0 is a gain (or loss) outside the noise of this split."""
    from skinlesion import metrics

    if not np.array_equal(out.lesions, ref.lesions) or not np.array_equal(out.y, ref.y):
        raise ValueError("rows were scored on different val images; use one splits.csv")
    weights = metrics.lesion_weights(out.lesions, n_boot, seed=0)
    ones = np.ones((1, len(out.y)))
    mel = CLASS_INDEX["mel"]
    point, boot = (
        [metrics.weighted_metrics(o.y, o.probabilities, w, o.labels) for o in (out, ref)] for w in (ones, weights)
    )
    deltas = {}
    for name in DELTAS:
        key, pick = ("recall", lambda a: a[:, mel]) if name == "mel_recall" else (name, lambda a: a)
        d_point = pick(point[0][key]) - pick(point[1][key])
        d_boot = pick(boot[0][key]) - pick(boot[1][key])
        lo, hi = np.nanpercentile(d_boot, [2.5, 97.5])
        deltas.update({f"d_{name}": float(d_point[0]), f"d_{name}_lo": float(lo), f"d_{name}_hi": float(hi)})
    return deltas


def tau_sweep(data: Mapping[str, Any], views: str = "tta8") -> dict[float, tuple[float, float, float]]:
    """(balanced accuracy, macro F1, melanoma recall) of the chain's decisions with the prior correction at each
    tau in TAUS (the variant ``<views>+la<tau>``, scored as every line is).

    For reading the trade-off only: these are seen on val, so a tau picked from them is tuned on val."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    out = {}
    for tau in TAUS:
        o = chain_outputs(data, views if tau == 0 else f"{views}+la{tau:g}")
        mel = recall_score(o.y, o.labels, labels=[CLASS_INDEX["mel"]], average="macro", zero_division=0)
        out[tau] = (balanced_accuracy_score(o.y, o.labels), f1_score(o.y, o.labels, average="macro", zero_division=0),
                    mel)  # fmt: skip
    return out
