"""Fit the post-hoc steps of a run on its own images and store them in best.pt: the temperature, the metadata
prior and the operating point. The calibrate / fit-metadata-prior / operating-point commands and train call
these; each step is scored through the run's decision chain, the one evaluate and predict use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion import fileio
from skinlesion.data.run_folder import labels_of, lesion_ids, read_config, run_table, split_part
from skinlesion.data.split import lesion_folds
from skinlesion.decision import metadata_prior, operating_point, temperature
from skinlesion.errors import SkinLesionError
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions
from skinlesion.model import checkpoint


def run_options(run_dir: Path, options: ScoringOptions | None) -> ScoringOptions:
    """``options`` (defaults when None) with the cache folder the run trained with, unless one is given."""
    options = options or ScoringOptions()
    return options if options.cache_dir else options.replace(cache_dir=read_config(run_dir).get("cache_dir"))


def table_logits(
    classifier: Classifier,
    run_dir: Path,
    table,
    n_views: int = 1,
    options: ScoringOptions | None = None,
    desc: str = "logits",
) -> np.ndarray:
    """Raw logits (n_views, N, C) of rows of the run's own table, read from the cache training used."""
    return classifier.view_logits_of_table(table, n_views, run_options(run_dir, options), desc)


# ------------------------------------------------------------------------------------------ metadata prior
def metadata_prior_of(run_dir: Path) -> dict[str, Any] | None:
    """p(class | age, sex, site) fitted on the run's training rows; None when they have no age, sex or site."""
    table = run_table(run_dir)
    train = table[table["split"] == "train"]
    if not metadata_prior.known(train).any():
        return None
    return metadata_prior.fit(train, checkpoint.read(run_dir)["classes"])


def fit_metadata_prior(run_dir: Path) -> dict[str, Any] | None:
    """``metadata_prior_of`` stored in best.pt; None (nothing stored) without age, sex or site."""
    model = metadata_prior_of(run_dir)
    if model is not None:
        checkpoint.set_entry(run_dir, "metadata_prior", model)
    return model


def remove(run_dir: Path, key: str) -> bool:
    """Take ``metadata_prior`` or ``operating_point`` out of best.pt; whether it had one."""
    had = key in checkpoint.read(run_dir)
    checkpoint.set_entry(run_dir, key, None)
    return had


# ------------------------------------------------------------------------------------------ operating point
def set_operating_point(
    run_dir: Path,
    targets: Mapping[str, float],
    split: str = "val",
    tta: bool = True,
    options: ScoringOptions | None = None,
) -> dict[str, Any]:
    """Set on the run's ``split`` through its decision chain (temperature, metadata prior; single views and, with
    ``tta``, the run's TTA views from the same pass) and store in best.pt."""
    options = options or ScoringOptions()
    classifier = Classifier.load(run_dir, "torch", options.device)
    chain = classifier.chain.replace(operating_point=None, pool_lesions=False)  # set per image, on p before it
    table = split_part(run_dir, split)
    y = labels_of(table, chain.classes)
    missing = [c for c in targets if not (y == chain.classes.index(c)).any()]
    if missing:  # before the model runs over the whole split
        raise SkinLesionError(f"the {split} split has no {', '.join(missing)} image to set the operating point on")
    views = table_logits(classifier, run_dir, table, classifier.n_views(tta), options,
                         desc=f"operating point: {split} logits")  # fmt: skip
    offsets = chain.offsets(table)
    point = operating_point.build(
        chain.logits(views[:1], offsets), y, chain.classes, targets,
        chain.logits(views, offsets) if tta else None,
        fitted_on=split, tta_views=chain.tta_views if tta else None, temperature=chain.temperature,
        metadata_prior=chain.metadata_prior is not None,
    )  # fmt: skip
    checkpoint.set_entry(run_dir, "operating_point", point)
    return point


def refit_operating_point(run_dir: Path, why: str, options: ScoringOptions | None = None) -> str | None:
    """Set a stored operating point again with its own targets, split and views after ``why`` changed the
    probabilities it was set on (a new temperature, metadata prior); removed if that fails. What happened, in a
    line (None: there was none)."""
    point = checkpoint.read(run_dir).get("operating_point")
    if point is None:
        return None
    try:
        point = set_operating_point(run_dir, point["min_sensitivity"], point["fitted_on"],
                                    point.get("tta_views") is not None, options)  # fmt: skip
    except SkinLesionError as e:
        checkpoint.set_entry(run_dir, "operating_point", None)
        return (f"warning: the operating point was removed ({why} changed the probabilities it was set on, and "
                f"setting it again failed: {e})")  # fmt: skip
    return f"{why}: re-set the {operating_point.report_line(point)}"


# ------------------------------------------------------------------------------------------ temperature
def train_slice(table, frac: float, seed: int):
    """A lesion-grouped, diagnosis-stratified ``frac`` of ``table``."""
    fold = lesion_folds(table["dx"].astype(str).to_numpy(), lesion_ids(table), max(2, round(1 / frac)), seed)
    return table[fold == 0].reset_index(drop=True)


@dataclass(frozen=True)
class CalibrationSpec:
    """How ``skinlesion calibrate`` fits T: crossfit over ``folds`` lesion folds of ``split``, or on a lesion slice
    (``slice_frac``) of train scored on ``split``."""

    method: str = "crossfit"
    split: str = "val"
    folds: int = 2
    seed: int = 0
    slice_frac: float = 0.1


def calibrate(run_dir: Path, spec: CalibrationSpec | None = None, options: ScoringOptions | None = None
              ) -> dict[str, Any]:  # fmt: skip
    """Fit the temperature (temperature.py), store it in best.pt and write calibration.json; the result."""
    spec, options = spec or CalibrationSpec(), options or ScoringOptions()
    classifier = Classifier.load(run_dir, "torch", options.device)
    chain = classifier.chain

    def logits_of(table, what: str) -> np.ndarray:
        return table_logits(classifier, run_dir, table, 1, options, what)[0]

    held = split_part(run_dir, spec.split)
    y_held = labels_of(held, chain.classes)
    logits_held = logits_of(held, f"{spec.split} logits")
    offsets = chain.offsets(held)  # scored as evaluate will use them
    if spec.method == "crossfit":
        result = temperature.calibrate(chain.classes, logits_held, y_held, lesions=lesion_ids(held),
                                       method="crossfit", folds=spec.folds, seed=spec.seed, offsets=offsets)
        result.update(fit_on=f"{spec.split} (all lesions)", scored_on=f"{spec.split}, out of fold")
    elif spec.method == "train-slice":
        fit = train_slice(split_part(run_dir, "train"), spec.slice_frac, spec.seed)
        y_fit = labels_of(fit, chain.classes)
        result = temperature.calibrate(chain.classes, logits_of(fit, "train-slice logits"), y_fit,
                                       lesions=lesion_ids(fit), method="train-slice", seed=spec.seed,
                                       offsets=offsets, logits_eval=logits_held, y_eval=y_held)  # fmt: skip
        result.update(fit_on=f"{spec.slice_frac:.0%} of train lesions (trained on)", scored_on=spec.split)
    else:
        raise SkinLesionError(f"unknown calibration method {spec.method!r}; use crossfit or train-slice")
    result["metadata_prior_images"] = chain.images_with_metadata(held)
    summary = {k: v for k, v in result.items() if k != "reliability"}
    checkpoint.set_temperature(run_dir, result["temperature"], calibration=summary)
    fileio.write_json(Path(run_dir) / "calibration.json", result)
    return result
