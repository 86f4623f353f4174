"""``train --folds K``: K lesion-grouped folds trained as ordinary run folders, one ensemble of them, and its
decision chain fitted out of fold.

Layout: ``<run>/fold_0 ... fold_{K-1}`` (each a run folder whose val part is its fold; resumable), and ``<run>``
itself, an ensemble run folder (model/ensemble_run.py) holding

* ``oof_predictions.csv``: every non-test image, scored by the fold that did not train on it, through the
  ensemble's decision chain (plus its ``fold``);
* ``cv.json``: per fold and mean +- sd of the headline metrics, and the pooled out-of-fold metrics with
  lesion-bootstrap intervals;
* ``calibration.json`` and in best.pt the temperature, the metadata prior (recipes that use it) and the
  operating point (recipes that set one), all fitted on the out-of-fold logits, never on a val that picked an
  epoch. With ``--test-frac`` a lesion-grouped test part is carved first and seen by no fold; `evaluate` scores
  the ensemble on it.

Each fold keeps its own out-of-fold view logits (``fold_i/oof_logits.npz``): a fold that has them is done, so
re-running with ``--resume`` trains only what is missing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion import fileio
from skinlesion.data.run_folder import labels_of, run_table, split_part
from skinlesion.decision import conformal, metadata_prior, ood, operating_point, referral, temperature
from skinlesion.decision.chain import DecisionChain
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation.fitting import table_logits
from skinlesion.evaluation.scoring import SUMMARY_ROWS, predictions_frame, score
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions
from skinlesion.model import checkpoint, ensemble_run, logit_adjustment
from skinlesion.training import distributed, loop
from skinlesion.training.config import TrainConfig

OOF_LOGITS = "oof_logits.npz"
CV_METRICS = (*SUMMARY_ROWS, "mel_recall")


def headline(scored: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The metrics cv.json summarises, as ``{"value", "ci95"}`` entries (melanoma recall from the per-class part,
    where the run has a melanoma class)."""
    mel = (scored["per_class"].get("mel") or {}).get("recall", {"value": None, "ci95": None})
    return {**{k: scored[k] for k in SUMMARY_ROWS}, "mel_recall": mel}


def fold_dir(parent: Path, fold: int) -> Path:
    return parent / f"fold_{fold}"


def run(
    config: TrainConfig,
    d: distributed.Dist,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    given: Iterable[str] | None = None,
) -> tuple[Path, TrainConfig]:
    """Train every fold (skipping finished ones), then build and fit the ensemble; the parent folder and config."""
    folds = int(config.folds)
    name = config.run_name or distributed.broadcast_object(d, config.resolved().run_name)
    config = config.replace(run_name=name).resolved()
    parent = config.run_dir

    def state() -> tuple[dict[str, Any] | None, list[str]]:
        """Rank 0's view (other nodes may keep no copy): the saved config to resume, and each fold's state."""
        if (parent / "cv.json").exists() and not resume:
            raise SkinLesionError(f"{parent} already holds a cross-validation run; pass another --run-name")
        started = fold_dir(parent, 0) / "last.pt"
        saved = checkpoint.read(started)["config"] if resume and started.is_file() else None
        folds_state = []
        for fold in range(folds):
            where = fold_dir(parent, fold)
            done, begun = (where / OOF_LOGITS).is_file(), (where / "last.pt").exists()
            if begun and not done and not resume:
                raise SkinLesionError(f"{where} holds a started fold; pass --resume to continue the cross-validation")
            folds_state.append("done" if done else "started" if begun else "new")
        return saved, folds_state

    saved, folds_state = distributed.from_main(d, state)
    if saved is not None:  # the recipe the folds were started with, not today's defaults
        config = loop.resume_config(config, saved, fold_dir(parent, 0), given).replace(
            out=config.out, run_name=config.run_name, fold=None)
    for fold in range(folds):
        where = fold_dir(parent, fold)
        if folds_state[fold] == "done":
            if d.is_main:
                print(f"fold {fold + 1}/{folds}: done ({where})")
            continue
        if d.is_main:
            print(f"fold {fold + 1}/{folds}: training {where}")
        fold_config = config.replace(out=str(parent), run_name=where.name, fold=fold)
        started = folds_state[fold] == "started"
        run_dir, fold_cfg = loop.run(fold_config, d, started, stop_after_epochs)
        fold_over = functools.partial(finished, run_dir, fold_cfg)
        if stop_after_epochs and not distributed.from_main(d, fold_over):
            return parent, config  # time-boxed: stop here, --resume continues this fold
        if d.is_main:
            out_of_fold_logits(run_dir, fold_cfg, ScoringOptions(2 * fold_cfg.batch_size, str(d.device),
                                                                 fold_cfg.workers, fold_cfg.cache, fold_cfg.cache_dir))
        distributed.barrier(d)
    if d.is_main:
        build(parent, [fold_dir(parent, f) for f in range(folds)], config)
    return parent, config


def finished(run_dir: Path, config: TrainConfig) -> bool:
    last = checkpoint.read(run_dir / "last.pt")
    state = last.get("train_state") or {}
    stopped_early = config.patience is not None and last["epoch"] - state.get("best_epoch", 0) >= config.patience
    return last["epoch"] >= config.epochs or stopped_early


def out_of_fold_logits(run_dir: Path, config: TrainConfig, options: ScoringOptions) -> Path:
    """The fold's own post-hoc step (the logit adjustment lives in its weights), then its val's raw view logits:
    single view first, then the run's TTA views (the chain's TTA mean)."""
    if config.logit_adjust_tau:
        logit_adjustment.set_logit_adjustment(run_dir / "best.pt", config.logit_adjust_tau)
    classifier = Classifier.load(run_dir, "torch", options.device)
    table = split_part(run_dir, "val")
    views = table_logits(classifier, run_dir, table, classifier.n_views(True), options,
                         desc=f"{run_dir.name}: val logits")  # fmt: skip
    path = run_dir / OOF_LOGITS

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a name, np.savez would append ".npz" to it
            ids = np.array(table["image_id"].astype(str).tolist(), dtype=str)  # not object: loads without pickle
            np.savez(f, image_id=ids, logits=views.astype(np.float32))

    return fileio.atomic_write(path, write)


def read_oof(fold_dirs: list[Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """Every fold's val rows (with age / sex / site and a ``fold`` column) and their view logits (V, N, C)."""
    tables, logits = [], []
    for fold, where in enumerate(fold_dirs):
        with np.load(where / OOF_LOGITS, allow_pickle=False) as z:
            ids, views = z["image_id"].astype(str), z["logits"]
        part = split_part(where, "val").set_index("image_id").loc[ids].reset_index()
        tables.append(part.assign(fold=fold))
        logits.append(views)
    n_views = min(v.shape[0] for v in logits)
    return pd.concat(tables, ignore_index=True), np.concatenate([v[:n_views] for v in logits], axis=1)


def oof_offsets(fold_dirs: list[Path], table: pd.DataFrame, prior_on: bool, classes: Sequence[str]
                ) -> tuple[np.ndarray | None, Any]:  # fmt: skip
    """Metadata-prior offsets of each out-of-fold row from the prior fitted on its fold's train rows, and the
    prior fitted on all non-test rows (what the ensemble keeps); (None, None) without one."""
    if not prior_on:
        return None, None
    everything = run_table(fold_dirs[0])
    if not metadata_prior.known(everything[everything["split"] != "test"]).any():
        print("metadata prior skipped: the training images have no age, sex or localization")
        return None, None
    offsets = np.zeros((len(table), len(classes)))
    for fold, where in enumerate(fold_dirs):
        rows = (table["fold"] == fold).to_numpy()
        part = run_table(where)
        prior = metadata_prior.fit(part[part["split"] == "train"], classes)
        offsets[rows] = metadata_prior.offsets(prior, table[rows])
    return offsets, metadata_prior.fit(everything[everything["split"] != "test"], classes)


def oof_safeguards(parent: Path, config: TrainConfig, chain: DecisionChain, views: np.ndarray,
                   offsets: np.ndarray | None, y: np.ndarray, lesions: np.ndarray) -> None:  # fmt: skip
    """The recipe's conformal sets, referral rule and logit OOD detector, fitted on the out-of-fold predictions
    (single view, per image) and stored in the ensemble's best.pt."""
    decided = chain.replace(pool_lesions=False)(views[:1], offsets)
    classes = list(chain.classes)
    if config.conformal:
        checkpoint.set_entry(parent, "conformal", conformal.fit(decided.probabilities, y, classes, 1 - config.conformal,
                                                                groups=lesions, fitted_on="out-of-fold"))
    if config.referral:
        checkpoint.set_entry(parent, "referral", referral.fit(y, decided.probabilities, decided.labels, classes,
                                                              target_accuracy=config.referral, fitted_on="out-of-fold"))
    if config.ood and config.ood != "mahalanobis":
        checkpoint.set_entry(parent, "ood", ood.fit_logits(views[0], config.ood, fitted_on="out-of-fold"))
    elif config.ood:  # the folds' own features differ: one detector over them is not the ensemble's
        print("out-of-distribution detector skipped: Mahalanobis needs the ensemble's own features; fit one with "
              f"`skinlesion calibrate --run-dir {parent} --split test --ood mahalanobis` on held-out images")
    if config.conformal or config.referral or config.ood:
        print(f"safeguards fitted out of fold; stored in {parent / 'best.pt'}")


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    return float(np.mean(kept)), float(np.std(kept, ddof=1)) if len(kept) > 1 else None


def fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def build(parent: Path, fold_dirs: list[Path], config: TrainConfig) -> None:
    """The ensemble of the folds, its chain fitted out of fold, oof_predictions.csv and cv.json."""
    about = {"folds": len(fold_dirs), "test_frac": config.test_frac, "split_seed": config.seed,
             "recipe": config.recipe}  # fmt: skip
    ensemble_run.write(fold_dirs, parent, extra_config=about)
    table, views = read_oof(fold_dirs)
    classes = list(checkpoint.read(parent)["classes"])
    y, lesions = labels_of(table, classes), table["lesion_id"].astype(str).to_numpy()
    offsets, prior = oof_offsets(fold_dirs, table, config.metadata_prior, classes)
    if prior is not None:
        checkpoint.set_entry(parent, "metadata_prior", prior)
        print(f"{metadata_prior.summary(prior)}; stored in {parent / 'best.pt'}")

    calibration = temperature.calibrate(classes, views[0], y, lesions=lesions, method="crossfit", folds=2, seed=0,
                                        offsets=offsets)  # fmt: skip
    calibration.update(fit_on="out-of-fold predictions of the folds (single view)",
                       scored_on="out-of-fold predictions, 2-fold cross-fit")  # fmt: skip
    checkpoint.set_temperature(parent, calibration["temperature"],
                               calibration={k: v for k, v in calibration.items() if k != "reliability"})  # fmt: skip
    fileio.write_json(parent / "calibration.json", calibration)
    print(f"temperature {calibration['temperature']:.3f} fitted out of fold: ECE {calibration['before']['ece']:.4f}"
          f" -> {calibration['after']['ece']:.4f}")  # fmt: skip

    chain = DecisionChain.from_meta(checkpoint.read(parent))
    if config.min_sensitivity:
        targets = operating_point.parse_targets(config.min_sensitivity, classes)
        plain = chain.replace(operating_point=None)
        point = operating_point.build(
            plain.logits(views[:1], offsets), y, classes, targets, plain.logits(views, offsets),
            fitted_on="out-of-fold", tta_views=views.shape[0], temperature=chain.temperature,
            metadata_prior=prior is not None,
        )  # fmt: skip
        checkpoint.set_entry(parent, "operating_point", point)
        print(f"{operating_point.report_line(point)} (out of fold); stored in {parent / 'best.pt'}")
        chain = DecisionChain.from_meta(checkpoint.read(parent))

    oof_safeguards(parent, config, chain, views, offsets, y, lesions)
    pool = lesions if chain.pool_lesions else None
    decisions = chain(views, offsets, pool)
    frame = predictions_frame(table, decisions).assign(fold=table["fold"].to_numpy())
    fileio.write_csv(parent / "oof_predictions.csv", frame)
    per_fold = []
    for fold, where in enumerate(fold_dirs):
        rows = (table["fold"] == fold).to_numpy()
        sub = chain(views[:, rows], None if offsets is None else offsets[rows], None if pool is None else pool[rows])
        values = {k: v["value"] for k, v in headline(score(y[rows], sub, lesions[rows], 0, 0)).items()}
        per_fold.append({"fold": fold, "run": where.name, "best_epoch": checkpoint.read(where).get("epoch"),
                         "n_images": int(rows.sum()), **values})  # fmt: skip
    scored = score(y, decisions, lesions, 1000, 0)
    pooled = headline(scored)
    summary = {
        "folds": len(fold_dirs),
        "test_frac": config.test_frac,
        "split_seed": config.seed,
        "scoring": f"each image by the fold that did not train on it, through the ensemble's decision chain "
                   f"({views.shape[0]} views, temperature, prior, operating point, pooling as stored); the "
                   "temperature and operating point were fitted on these same predictions, so the pooled decision "
                   "metrics are in-sample for them (the held-out test part is not)",
        "per_fold": per_fold,
        "mean": {k: mean_sd([f[k] for f in per_fold])[0] for k in CV_METRICS},
        "sd": {k: mean_sd([f[k] for f in per_fold])[1] for k in CV_METRICS},
        "out_of_fold": scored,
        "temperature": chain.temperature,
        "operating_point": chain.summary()["operating_point"],
    }
    fileio.write_json(parent / "cv.json", summary)
    print(f"cross-validation of {len(fold_dirs)} folds ({len(y)} images out of fold):")
    for k in CV_METRICS:
        ci = pooled[k]["ci95"] or [float("nan")] * 2
        print(f"  {k:<18} folds {fmt(summary['mean'][k])} +- {fmt(summary['sd'][k])}   out of fold "
              f"{fmt(pooled[k]['value'])} [{fmt(ci[0])}, {fmt(ci[1])}]")  # fmt: skip
    print(f"wrote {parent / 'cv.json'}, {parent / 'oof_predictions.csv'}; the ensemble: {parent / 'best.pt'}")
