"""Evaluate a run: score one part of its splits.csv, its out-of-fold predictions, or an external labelled folder
through the run's decision chain, with lesion-bootstrap intervals; the library behind ``skinlesion evaluate`` and
``skinlesion.evaluate``. Every number of metrics.json comes from ``scoring.score`` (metrics.evaluate) on the
decisions of ``DecisionChain.__call__`` here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from skinlesion import fileio, rules
from skinlesion.data.ham10000 import load_table
from skinlesion.data.run_folder import default_split, labels_of, overlap_with_training, split_part
from skinlesion.decision import lesion_pooling
from skinlesion.decision.chain import DecisionChain, Decisions
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import cross_validation, isic
from skinlesion.evaluation.fitting import run_options
from skinlesion.evaluation.scoring import lesion_level, predictions_frame, score
from skinlesion.inference import selection
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions
from skinlesion.inference.views import describe as describe_views

OOF = "oof"  # the --split of a --folds run's out-of-fold predictions


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # what metrics.json holds
    predictions: pd.DataFrame  # predictions.csv: one row per image (single view)
    predictions_tta: pd.DataFrame | None = None  # predictions_tta.csv (with tta)
    report: str = ""  # classification_report.txt
    out_dir: Path = Path(".")
    chain: DecisionChain | None = None
    notes: list[str] = field(default_factory=list)  # what the command prints to stderr (overlap, ...)


@dataclass(frozen=True)
class ExternalSet:
    """An external labelled folder to score instead of the run's own split."""

    data_dir: str | None = None
    metadata: str | None = None
    images: str | None = None
    allow_missing: bool = False
    name: str | None = None  # results in <run>/eval_<name>/
    keep_overlap: bool = False  # score images the run trained on too (optimistic)


def evaluate(
    run_dir: str | Path,
    data_dir: str | None = None,
    split: str | None = None,
    tta: bool = False,
    *,
    external: ExternalSet | None = None,
    lesion_level_scores: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    switches: tuple = (None, True, True, None),
    options: ScoringOptions | None = None,
    isic_csv: str | None = None,
    write: bool = True,
    backend: str = selection.AUTO,
) -> EvalResult:
    """Score the run (``split``: val by default, test for a run without one, ``oof`` for a --folds run's out-of-fold
    predictions; or ``data_dir`` / ``external``: another labelled folder) and, with ``write``, write
    predictions.csv (+ predictions_tta.csv), metrics.json and classification_report.txt. ``switches``: the chain's
    command-line switches (tta_views, metadata_prior, operating_point, pool_lesions; DecisionChain.switched).
    ``backend``: torch, onnx, onnx-int8 or auto (the fastest up-to-date one: inference/selection.py)."""
    run_dir = Path(run_dir)
    rules.BOOTSTRAP.check("--bootstrap", bootstrap)
    rules.SEED.check("--seed", seed)
    external = external or (ExternalSet(data_dir=data_dir) if data_dir else None)
    options = (options or ScoringOptions()).replace(tta=tta)
    loaded, choice = selection.load(run_dir, backend, options.device)
    classifier = loaded.switched(*switches)
    result = EvalResult({}, pd.DataFrame(), chain=classifier.chain, notes=list(choice.notes))
    table, views, offsets, source = scored_views(classifier, run_dir, split, external, options, result)
    source = {**source, "backend": choice.backend}
    result.out_dir = run_dir / f"eval_{source['external']}" if external else run_dir
    score_all(classifier.chain, table, views, offsets, source, result, lesion_level_scores, bootstrap, seed, tta)
    if isic_csv:  # the TTA decisions with --tta, as the headline
        final = result.predictions_tta if tta else result.predictions
        probs = final[[f"p_{c}" for c in classifier.classes]].to_numpy()
        decided = classifier.chain.decision_probabilities(probs, tta)
        path = isic.write_submission(isic_csv, table["image_id"].astype(str).tolist(), decided, classifier.classes)
        result.notes.append(f"wrote {path} (ISIC 2018 Task 3 submission, {len(table)} images)")
    if write:
        write_outputs(result)
    return result


def scored_views(
    classifier: Classifier, run_dir: Path, split: str | None, external: ExternalSet | None,
    options: ScoringOptions, result: EvalResult,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None, dict[str, Any]]:  # fmt: skip
    """The table to score, its raw view logits (V, N, C), its metadata-prior offsets and where it came from."""
    n_views = classifier.n_views(options.tta)
    if external is not None:
        table, source = external_table(run_dir, external, result)
        views = classifier.view_logits_of_table(table, n_views, options, desc=f"evaluate {len(table)}")
        return table, views, classifier.chain.offsets(table), source
    split = split or default_split(run_dir)
    if split == OOF:
        return out_of_fold(classifier, run_dir, options.tta)
    table = split_part(run_dir, split)
    views = classifier.view_logits_of_table(table, n_views, run_options(run_dir, options),
                                            desc=f"evaluate {len(table)}")  # fmt: skip
    return table, views, classifier.chain.offsets(table), {"split": split}


def out_of_fold(classifier: Classifier, run_dir: Path, tta: bool
                ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None, dict[str, Any]]:  # fmt: skip
    """A --folds run's out-of-fold predictions (what cv.json reports): every non-test image scored by the fold that
    did not train on it, from the logits each fold stored, with that fold's own metadata prior."""
    folds = sorted(run_dir.glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))
    if not folds or not all((f / cross_validation.OOF_LOGITS).is_file() for f in folds):
        raise SkinLesionError(f"{run_dir} is not a finished `train --folds` run (no fold_*/"
                              f"{cross_validation.OOF_LOGITS}); pick another --split")  # fmt: skip
    table, views = cross_validation.read_oof(folds)
    chain = classifier.chain
    if tta and views.shape[0] < chain.tta_views:
        raise SkinLesionError(f"the folds stored {views.shape[0]} views, not the {chain.tta_views} --tta-views asks "
                              "for; leave --tta-views out")  # fmt: skip
    views = views[: chain.tta_views] if tta else views[:1]
    offsets, _ = cross_validation.oof_offsets(folds, table, chain.metadata_prior is not None)
    return table, views, offsets, {"split": OOF, "folds": len(folds)}


def external_table(run_dir: Path, ext: ExternalSet, result: EvalResult) -> tuple[pd.DataFrame, dict[str, Any]]:
    """An external labelled folder, without the images the run trained on (same image or lesion id) unless asked."""
    table = load_table(data_dir=ext.data_dir, metadata=ext.metadata, images=ext.images,
                       allow_missing=ext.allow_missing)  # fmt: skip
    if "lesion_id" not in table or table["lesion_id"].isna().any():
        # No lesion ids (e.g. ISIC 2018 test): each image is its own lesion for the bootstrap.
        table = table.assign(lesion_id=table.get("lesion_id", table["image_id"]).fillna(table["image_id"]))
    overlap, by_image, by_lesion = overlap_with_training(run_dir, table)
    leak = {"images": int(overlap.sum()), "by_image_id": by_image, "by_lesion_id": by_lesion,
            "kept": bool(ext.keep_overlap)}  # fmt: skip
    if overlap.any():
        what = (f"{leak['images']} of {len(table)} images were trained on by this run ({by_image} by image id, "
                f"{by_lesion} more by lesion id)")  # fmt: skip
        if ext.keep_overlap:
            leak["warning"] = f"{what}; kept (--keep-overlap): these metrics are optimistic"
            result.notes.append(f"warning: {leak['warning']}")
        elif overlap.all():
            raise SkinLesionError(f"all {len(table)} images were trained on by this run ({by_image} by image id, "
                                  f"{by_lesion} by lesion id); nothing unseen is left to score (--keep-overlap "
                                  "scores them anyway, optimistically)")  # fmt: skip
        else:
            table = table[~overlap].reset_index(drop=True)
            result.notes.append(f"{what}; scored without them ({len(table)} left; --keep-overlap keeps them)")
    name = safe_name(ext.name or Path(ext.data_dir or ext.images or ext.metadata).name)
    return table, {"external": name, "data_dir": ext.data_dir, "metadata": ext.metadata, "images": ext.images,
                   "overlap_with_training": leak}  # fmt: skip


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "external"


def score_all(chain: DecisionChain, table: pd.DataFrame, views: np.ndarray, offsets: np.ndarray | None,
              source: dict[str, Any], result: EvalResult, lesion_level_scores: bool, bootstrap: int, seed: int,
              tta: bool) -> None:  # fmt: skip
    """Decisions through the chain (single view; with ``tta`` the run's views too), their metrics and report."""
    y = labels_of(table)
    lesions = table["lesion_id"].astype(str).to_numpy()
    pooled = lesion_pooling.shared(lesions) if chain.pool_lesions else 0
    pool_ids = lesions if pooled else None
    decisions = chain(views[:1], offsets, pool_ids)
    with_metadata = chain.images_with_metadata(table) if offsets is not None else 0
    result.metrics = {
        **source,
        "temperature": chain.temperature,
        "metadata_prior": {"applied": with_metadata > 0, "images_with_metadata": with_metadata},
        "lesion_pooling": {"applied": pooled > 0, "images_pooled": pooled},  # each image scored with its lesion's
        "operating_point": chain.summary()["operating_point"],  # in-sample when scored on the split it was set on
        "tta": False,
        **score(y, decisions, lesions, bootstrap, seed),
    }
    result.predictions = predictions_frame(table, decisions)
    result.report = text_report(y, decisions, chain.classes)
    if tta:
        with_tta = chain(views, offsets, pool_ids)
        result.predictions_tta = predictions_frame(table, with_tta)
        result.metrics["with_tta"] = score(y, with_tta, lesions, bootstrap, seed)
        result.metrics["tta_views"] = views.shape[0]
        result.report += (f"\nWith TTA ({views.shape[0]} views: {describe_views(views.shape[0])}):\n"
                          + text_report(y, with_tta, chain.classes))  # fmt: skip
    if lesion_level_scores:
        ly, lp, lid = lesion_level(result.predictions, list(chain.classes))
        per_lesion = Decisions(lp, chain.decide(lp), chain.classes)
        result.metrics["lesion_level"] = score(ly, per_lesion, lid, bootstrap, seed)


def text_report(y: np.ndarray, decisions: Decisions, classes: tuple[str, ...]) -> str:
    return classification_report(y, decisions.labels, labels=list(range(len(classes))), target_names=list(classes),
                                 digits=3, zero_division=0)  # fmt: skip


def write_outputs(result: EvalResult) -> None:
    out = result.out_dir
    fileio.write_csv(out / "predictions.csv", result.predictions)
    if result.predictions_tta is not None:
        fileio.write_csv(out / "predictions_tta.csv", result.predictions_tta)
    fileio.write_json(out / "metrics.json", result.metrics)
    fileio.write_text(out / "classification_report.txt", result.report)
