"""Evaluate a run: score one part of its splits.csv, its out-of-fold predictions, or an external labelled folder
through the run's decision chain, with lesion-bootstrap intervals; the library behind ``skinlesion evaluate`` and
``skinlesion.evaluate``. Every number of metrics.json comes from ``scoring.score`` (metrics.evaluate) on the
decisions of ``DecisionChain.__call__`` here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from skinlesion import fileio, rules
from skinlesion.data.datasets import DataSpec, load_dataset, read_sources
from skinlesion.data.run_folder import (
    data_spec,
    default_split,
    labels_of,
    overlap_with_training,
    read_config,
    split_part,
)
from skinlesion.data.taxonomy import melanoma_code
from skinlesion.decision import lesion_pooling
from skinlesion.decision.chain import DecisionChain, Decisions
from skinlesion.device import retain_freed_memory
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import clinical_metrics, cross_validation, isic
from skinlesion.evaluation.evidence import evidence
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
    subgroups: pd.DataFrame | None = None  # subgroups.csv: the headline metrics per sex, age band, site, source ...
    risk_coverage: pd.DataFrame | None = None  # risk_coverage.csv: referring the least confident first


@dataclass(frozen=True)
class ExternalSet:
    """An external labelled set to score instead of the run's own split: its folders and how to read them
    (data/datasets.DataSpec; its labels are mapped into the run's classes), where results go, and the task."""

    data: DataSpec = field(default_factory=DataSpec)
    name: str | None = None  # results in <run>/eval_<name>/
    keep_overlap: bool = False  # score images the run trained on too (optimistic)
    task: str = "auto"  # multiclass, melanoma (melanoma vs the rest), or auto (TASKS)


TASKS = ("auto", "multiclass", "melanoma")
# auto scores melanoma vs the rest when the run's classes would keep less than this share of the images (ISIC 2020:
# 96 % of its images are "unknown" benign lesions, which no class of HAM10000 names).
MIN_KEPT_FOR_MULTICLASS = 0.5


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
    external = external or (ExternalSet(DataSpec((data_dir,))) if data_dir else None)
    options = (options or ScoringOptions()).replace(tta=tta)
    if (options.device or "cpu") == "cpu":
        retain_freed_memory()  # a batch job: PyTorch eager re-faulted its activations every batch (2x slower)
    loaded, choice = selection.load(run_dir, backend, options.device)
    classifier = loaded.switched(*switches)
    result = EvalResult({}, pd.DataFrame(), chain=classifier.chain, notes=list(choice.notes))
    table, views, offsets, source = scored_views(classifier, run_dir, split, external, options, result)
    source = {**source, "backend": choice.backend}
    result.out_dir = run_dir / f"eval_{source['external']}" if external else run_dir
    decisions = score_all(classifier.chain, table, views, offsets, source, result, lesion_level_scores, bootstrap,
                          seed, tta)  # fmt: skip
    if decisions is not None:  # the clinical evidence of a multiclass evaluation
        add_evidence(classifier, table, views, decisions, run_options(run_dir, options), result, bootstrap, seed)
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
        table, source = external_table(run_dir, external, classifier.classes, result)
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
    offsets, _ = cross_validation.oof_offsets(folds, table, chain.metadata_prior is not None, chain.classes)
    return table, views, offsets, {"split": OOF, "folds": len(folds)}


def external_table(run_dir: Path, ext: ExternalSet, classes: Sequence[str], result: EvalResult
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:  # fmt: skip
    """An external labelled set with its labels in the run's classes (or melanoma / other: ``task``), without the
    images the run trained on (same image or lesion id) unless asked."""
    run_spec = data_spec(read_config(run_dir))
    spec = ext.data.replace(classes=run_spec.classes, keep_unmapped=run_spec.keep_unmapped)
    sources = read_sources(spec)
    task, table = external_task(ext.task, spec, sources, classes)
    if task == "melanoma":
        n_mel = int((table["dx"] == "mel").sum())
        result.notes.append(f"scored melanoma ({melanoma_code(classes)}) vs the rest: {n_mel} melanoma(s) among "
                            f"{len(table)} images")  # fmt: skip
    overlap, by_image, by_lesion = overlap_with_training(run_dir, table)
    leak = {"images": int(overlap.sum()), "by_image_id": by_image, "by_lesion_id": by_lesion,
            "kept": bool(ext.keep_overlap)}  # fmt: skip
    if overlap.any():
        table = without_overlap(table, overlap, by_image, by_lesion, ext.keep_overlap, leak, result)
    folders = list(spec.data_dirs)
    name = safe_name(ext.name or Path(folders[0] if folders else spec.images or spec.metadata or "external").name)
    return table, {"external": name, "data_dir": folders, "metadata": spec.metadata, "images": spec.images,
                   "task": task, "sources": sorted(set(table["source"])), "label_set": table.attrs.get("label_set"),
                   "unmapped": table.attrs.get("unmapped"), "overlap_with_training": leak}  # fmt: skip


def external_task(task: str, spec: DataSpec, sources: list[pd.DataFrame], classes: Sequence[str]
                  ) -> tuple[str, pd.DataFrame]:  # fmt: skip
    """The task an external set is scored on and its table: its labels mapped into the run's classes, or (melanoma)
    melanoma / other. ``auto``: multiclass unless the set's labels are melanoma yes / no only, or the run's classes
    would keep less than MIN_KEPT_FOR_MULTICLASS of its images."""
    if task not in TASKS:
        raise SkinLesionError(f"unknown --task {task!r}; choose {', '.join(TASKS)}")
    n = sum(len(t) for t in sources)
    if task != "melanoma" and not all(t.attrs.get("label_set") == "melanoma-binary" for t in sources):
        try:
            table = load_dataset(spec, sources=sources)
        except SkinLesionError:
            table = None
        if table is not None and (task == "multiclass" or len(table) >= MIN_KEPT_FOR_MULTICLASS * n):
            return "multiclass", table
        if task == "multiclass":
            raise SkinLesionError(f"no image of {', '.join(spec.data_dirs)} has a label of this run's classes")
    if melanoma_code(list(classes)) is None:
        raise SkinLesionError(f"this run has no melanoma class ({', '.join(classes)}); score it with --task "
                              "multiclass on a set labelled in its classes")  # fmt: skip
    table = load_dataset(spec.replace(classes="melanoma-binary", keep_unmapped=None), sources=sources)
    if "target" in table and table["target"].notna().all():  # ISIC 2020: the ground truth's own melanoma flag
        table["dx"] = np.where(pd.to_numeric(table["target"]) == 1, "mel", "other")
    return "melanoma", table


def without_overlap(table: pd.DataFrame, overlap: np.ndarray, by_image: int, by_lesion: int, keep: bool,
                    leak: dict[str, Any], result: EvalResult) -> pd.DataFrame:  # fmt: skip
    what = (f"{leak['images']} of {len(table)} images were trained on by this run ({by_image} by image id, "
            f"{by_lesion} more by lesion id)")  # fmt: skip
    if keep:
        leak["warning"] = f"{what}; kept (--keep-overlap): these metrics are optimistic"
        result.notes.append(f"warning: {leak['warning']}")
        return table
    if overlap.all():
        raise SkinLesionError(f"all {len(table)} images were trained on by this run ({by_image} by image id, "
                              f"{by_lesion} by lesion id); nothing unseen is left to score (--keep-overlap "
                              "scores them anyway, optimistically)")  # fmt: skip
    result.notes.append(f"{what}; scored without them ({int((~overlap).sum())} left; --keep-overlap keeps them)")
    return table[~overlap].reset_index(drop=True)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "external"


def score_melanoma(chain: DecisionChain, table: pd.DataFrame, views: np.ndarray, offsets: np.ndarray | None,
                   source: dict[str, Any], result: EvalResult, bootstrap: int, seed: int,
                   tta: bool) -> None:  # fmt: skip
    """Melanoma vs the rest on a set that knows only that: AUC, partial AUC above 80 % sensitivity, average
    precision of p(melanoma), and the sensitivity / specificity of the run's decision (melanoma decided or not),
    with intervals over the set's groups (patients where it knows them)."""
    code = melanoma_code(list(chain.classes))
    k = list(chain.classes).index(code)
    y = (table["dx"] == "mel").to_numpy(dtype=int)
    groups = table["group_id"].astype(str).to_numpy() if "group_id" in table else table["lesion_id"].to_numpy()

    def scored(decisions: Decisions) -> dict[str, Any]:
        p = decisions.probabilities[:, k]
        report = clinical_metrics.evaluate(y, (decisions.labels == k).astype(int), np.stack([1 - p, p], axis=1),
                                           groups, ["other", "mel"], "mel", bootstrap, seed)  # fmt: skip
        return {"melanoma": report["per_class"]["mel"], "operating_points": report["positive_class"],
                "n_groups": report["n_lesions"]}  # fmt: skip

    decisions = chain(views[:1], offsets)
    result.metrics = {**source, "task": "melanoma", "positive_class": code, "temperature": chain.temperature,
                      "n_images": len(y), "n_melanomas": int(y.sum()), "tta": False, **scored(decisions)}  # fmt: skip
    result.predictions = predictions_frame(table, decisions)
    if tta:
        with_tta = chain(views, offsets)
        result.predictions_tta = predictions_frame(table, with_tta)
        result.metrics["with_tta"] = scored(with_tta)
        result.metrics["tta_views"] = views.shape[0]


def score_all(chain: DecisionChain, table: pd.DataFrame, views: np.ndarray, offsets: np.ndarray | None,
              source: dict[str, Any], result: EvalResult, lesion_level_scores: bool, bootstrap: int, seed: int,
              tta: bool) -> Decisions | None:  # fmt: skip
    """Decisions through the chain (single view; with ``tta`` the run's views too), their metrics and report; the
    single-view decisions (None for the melanoma-vs-rest task)."""
    if source.get("task") == "melanoma":
        score_melanoma(chain, table, views, offsets, source, result, bootstrap, seed, tta)
        return None
    y = labels_of(table, chain.classes)
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
    if "source" in table and table["source"].nunique() > 1:  # several sources: each one's own rows too
        result.metrics["per_source"] = {
            str(name): score(y[rows], Decisions(decisions.probabilities[rows], decisions.labels[rows], chain.classes),
                             lesions[rows], bootstrap, seed)
            for name in sorted(table["source"].unique()) for rows in [(table["source"] == name).to_numpy()]
        }  # fmt: skip
    if lesion_level_scores:
        ly, lp, lid = lesion_level(result.predictions, list(chain.classes))
        per_lesion = Decisions(lp, chain.decide(lp), chain.classes)
        result.metrics["lesion_level"] = score(ly, per_lesion, lid, bootstrap, seed)
    return decisions


def add_evidence(classifier: Classifier, table: pd.DataFrame, views: np.ndarray, decisions: Decisions,
                 options: ScoringOptions, result: EvalResult, bootstrap: int, seed: int) -> None:  # fmt: skip
    """Clinical metrics, subgroups, risk-coverage and the safeguards' scores (evaluation/evidence.py)."""
    guards = classifier.safeguards
    features = classifier.features_of_table(table, options, desc="features") if guards.needs_features else None
    guarded = guards(decisions, views[0], features) if guards.any else None
    found = evidence(labels_of(table, classifier.classes), decisions, table, result.predictions, guarded, guards,
                     bootstrap, seed)  # fmt: skip
    result.metrics.update(found.metrics)
    result.subgroups, result.risk_coverage = found.subgroups, found.risk_coverage


def text_report(y: np.ndarray, decisions: Decisions, classes: tuple[str, ...]) -> str:
    return classification_report(y, decisions.labels, labels=list(range(len(classes))), target_names=list(classes),
                                 digits=3, zero_division=0)  # fmt: skip


def write_outputs(result: EvalResult) -> None:
    out = result.out_dir
    fileio.write_csv(out / "predictions.csv", result.predictions)
    if result.predictions_tta is not None:
        fileio.write_csv(out / "predictions_tta.csv", result.predictions_tta)
    fileio.write_json(out / "metrics.json", result.metrics)
    for name, frame in (("subgroups.csv", result.subgroups), ("risk_coverage.csv", result.risk_coverage)):
        if frame is not None:
            fileio.write_csv(out / name, frame)
    fileio.write_text(out / "classification_report.txt", result.report)
