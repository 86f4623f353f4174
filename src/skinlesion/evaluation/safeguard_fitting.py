"""Fit a run's safeguards on its own labelled images and store them in best.pt (``calibrate --conformal / --ood``,
``operating-point --referral``, and train's post-hoc steps): the conformal label sets, the referral rule and the
out-of-distribution detector (decision/safeguards.py applies them). Each is fitted on the probabilities the decision
chain gives (single view, the run's temperature, metadata prior and operating point), on ``split`` (val) with its
lesions as the units."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.data.run_folder import labels_of, lesion_ids, split_part
from skinlesion.data.taxonomy import melanoma_code
from skinlesion.decision import conformal, ood, referral
from skinlesion.decision.chain import Decisions
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation.fitting import run_options, table_logits
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions
from skinlesion.model import checkpoint


def scored(run_dir: Path, split: str, options: ScoringOptions | None
           ) -> tuple[Classifier, Any, np.ndarray, np.ndarray, Decisions]:  # fmt: skip
    """The run's classifier, the split's table, labels, raw single-view logits and the chain's decisions."""
    options = options or ScoringOptions()
    classifier = Classifier.load(run_dir, "torch", options.device)
    table = split_part(run_dir, split)
    logits = table_logits(classifier, run_dir, table, 1, options, desc=f"{split} logits")
    chain = classifier.chain.replace(pool_lesions=False)  # per image, as predict scores one image
    return classifier, table, labels_of(table, chain.classes), logits[0], chain(logits[:1], chain.offsets(table))


def fit_conformal(run_dir: Path, coverage: float, method: str = "aps", split: str = "val",
                  options: ScoringOptions | None = None) -> dict[str, Any]:  # fmt: skip
    """Split-conformal label sets at ``coverage`` (APS or RAPS), lesions as the calibration units."""
    if not 0 < coverage < 1:
        raise SkinLesionError(f"--conformal {coverage:g}: the coverage must be a fraction in (0, 1), e.g. 0.9")
    classifier, table, y, _, decisions = scored(run_dir, split, options)
    fitted = conformal.fit(decisions.probabilities, y, classifier.classes, alpha=1 - coverage, method=method,
                           groups=lesion_ids(table), fitted_on=split)  # fmt: skip
    checkpoint.set_entry(run_dir, "conformal", fitted)
    return fitted


def fit_referral(run_dir: Path, target_accuracy: float, melanoma_sensitivity: float | None = None,
                 split: str = "val", options: ScoringOptions | None = None) -> dict[str, Any]:  # fmt: skip
    """Refer when the top probability is under the threshold that brings the kept images to ``target_accuracy``;
    with ``melanoma_sensitivity``, also when p(melanoma) lies in the band that brings melanomas caught or referred
    to it."""
    classifier, _, y, _, decisions = scored(run_dir, split, options)
    code = melanoma_code(classifier.classes) if melanoma_sensitivity else None
    if melanoma_sensitivity and code is None:
        raise SkinLesionError("--referral-melanoma needs a run with a melanoma class")
    rule = referral.fit(y, decisions.probabilities, decisions.labels, classifier.classes,
                        target_accuracy=target_accuracy, positive_class=code,
                        positive_sensitivity=melanoma_sensitivity, fitted_on=split)  # fmt: skip
    checkpoint.set_entry(run_dir, "referral", rule)
    return rule


def fit_ood(run_dir: Path, kind: str = "energy", refusal_rate: float = 0.05, split: str = "val",
            options: ScoringOptions | None = None) -> dict[str, Any]:  # fmt: skip
    """An out-of-distribution detector whose threshold refuses ``refusal_rate`` of the in-distribution ``split``:
    a logit score (energy, max_logit, max_softmax: raw single-view logits), or Mahalanobis on the pooled features
    (class means and shared precision from the train images)."""
    if not 0 < refusal_rate < 0.5:
        raise SkinLesionError(f"--ood-refusal {refusal_rate:g}: a fraction of in-distribution images, e.g. 0.05")
    classifier, table, y, logits, _ = scored(run_dir, split, options)
    if kind != "mahalanobis":
        detector = ood.fit_logits(logits, kind, refusal_rate, fitted_on=split)
    else:
        opts = run_options(run_dir, options)
        train = split_part(run_dir, "train")
        fit = classifier.features_of_table(train, opts, desc="train features")
        held = classifier.features_of_table(table, opts, desc=f"{split} features")
        detector = ood.fit_mahalanobis(fit, labels_of(train, classifier.classes), classifier.classes, held,
                                       refusal_rate, fitted_on=f"train (threshold on {split})")  # fmt: skip
    checkpoint.set_entry(run_dir, "ood", detector)
    return detector


def refit_dependents(run_dir: Path, why: str, options: ScoringOptions | None = None) -> list[str]:
    """Fit a stored conformal set and referral rule again with their own settings after ``why`` changed the
    probabilities they were fitted on (a new temperature, metadata prior or operating point); lines saying so."""
    meta = checkpoint.read(run_dir)
    lines = []
    if meta.get("conformal"):
        c = meta["conformal"]
        fit_conformal(run_dir, 1 - c["alpha"], c["method"], c.get("fitted_on", "val"), options)
        lines.append(f"{why}: re-fitted the conformal sets")
    if meta.get("referral"):
        r = meta["referral"]
        fit_referral(run_dir, r["target"]["accuracy"], r["target"].get("positive_sensitivity"),
                     r.get("fitted_on", "val"), options)  # fmt: skip
        lines.append(f"{why}: re-fitted the referral rule")
    return lines
