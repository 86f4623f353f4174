"""Grouped, class-stratified train/val(/test) split (scikit-learn StratifiedGroupKFold).

Every image of a group lands in the same part: the table's ``group_id`` (data/datasets: the patient where a source
knows patients, else the lesion, else the image) or, for a table without one, its lesion. With several sources the
strata are class x source, so every source's classes are spread over the parts. The table is sorted by image id
first, so the result depends only on its content and the seed, never on the CSV row order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from skinlesion.classes import CLASSES
from skinlesion.errors import SkinLesionError
from skinlesion.fileio import write_csv

SPLIT_COLUMNS = ("image_id", "lesion_id", "dx", "split")
OPTIONAL_COLUMNS = ("group_id", "source")  # written when the table has them; older splits.csv files lack them
PARTS = ("train", "val", "test")


def lesion_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) per row: lesions kept whole, labels spread evenly where the counts allow
    (scikit-learn StratifiedGroupKFold, shuffled, seeded). Splits, calibration and the ablation all use it."""
    n_groups = len(pd.unique(np.asarray(groups)))
    if n_folds > n_groups:
        raise SkinLesionError(f"cannot make {n_folds} folds from {n_groups} lesions; use fewer folds or more data")
    fold = np.empty(len(labels), dtype=int)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare classes with fewer lesions than folds are still split as evenly as possible.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for f, (_, held) in enumerate(sgkf.split(np.zeros(len(labels)), labels, groups=groups)):
            fold[held] = f
    return fold


def _held_out(table: pd.DataFrame, n_splits: int, fold: int, seed: int) -> np.ndarray:
    """Boolean mask of fold ``fold`` of ``n_splits`` grouped stratified folds."""
    return lesion_folds(table["stratum"].to_numpy(), table["group"].to_numpy(), n_splits, seed) == fold


def make_split(
    table: pd.DataFrame,
    val_frac: float = 0.2,
    test_frac: float = 0.0,
    folds: int | None = None,
    fold: int = 0,
    seed: int = 42,
) -> pd.DataFrame:
    """Return image_id, lesion_id, dx, split (train / val / test), sorted by image_id.

    A part of fraction f is one fold of round(1/f) folds, so fractions are met as closely as whole
    lesions allow. With ``test_frac`` the test part is carved first, then val from the rest.
    With ``folds=K``, val is fold ``fold`` of K (of what remains after the test part).
    """
    if folds is None and not 0 < val_frac < 1:
        raise SkinLesionError(f"--val-frac must be between 0 and 1, got {val_frac}")
    if not 0 <= test_frac < 1 or (folds is None and val_frac + test_frac >= 1):
        raise SkinLesionError(f"--test-frac must be >= 0 and leave room for train (val {val_frac}, test {test_frac})")
    if folds is not None and (folds < 2 or not 0 <= fold < folds):
        raise SkinLesionError(f"--folds must be >= 2 and --fold in 0..{(folds or 2) - 1}, got {folds} and {fold}")
    missing = [c for c in ("image_id", "lesion_id", "dx") if c not in table.columns]
    if missing:
        raise SkinLesionError(f"table lacks column(s) {', '.join(missing)}")

    extra = [c for c in OPTIONAL_COLUMNS if c in table.columns]
    frame = table[["image_id", "lesion_id", "dx", *extra]].astype(str)
    frame = frame.sort_values(["image_id", "lesion_id"], kind="stable").reset_index(drop=True)
    frame["group"] = frame["group_id"] if "group_id" in frame else frame["lesion_id"]
    several = "source" in frame and frame["source"].nunique() > 1
    frame["stratum"] = frame["dx"] + "|" + frame["source"] if several else frame["dx"]
    frame["split"] = "train"
    rest = np.ones(len(frame), dtype=bool)
    if test_frac > 0:
        test = _held_out(frame, max(2, round(1 / test_frac)), 0, seed)
        frame.loc[test, "split"] = "test"
        rest = ~test
    remaining = frame[rest]
    if folds is not None:
        val = _held_out(remaining, folds, fold, seed)
    else:
        val = _held_out(remaining, max(2, round((1 - test_frac) / val_frac)), 0, seed)
    frame.loc[remaining.index[val], "split"] = "val"
    return frame[["image_id", "lesion_id", "dx", "split", *extra]]


def read_splits(path: str | Path) -> pd.DataFrame:
    """Read and check a splits.csv (image_id, lesion_id, dx, split)."""
    path = Path(path)
    if not path.is_file():
        raise SkinLesionError(f"splits file {path} does not exist; write one with `skinlesion split --out {path}`")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SkinLesionError(f"cannot read splits file {path} ({e})") from e
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise SkinLesionError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(SPLIT_COLUMNS)}")
    bad_parts = sorted(set(frame["split"]) - set(PARTS))
    if bad_parts:
        raise SkinLesionError(f"{path}: unknown split value(s) {bad_parts}; allowed: {', '.join(PARTS)}")
    dups = frame["image_id"][frame["image_id"].duplicated()].tolist()
    if dups:
        raise SkinLesionError(f"{path}: image id(s) listed twice: {', '.join(dups[:10])}")
    for column, what in (("lesion_id", "lesion"), ("group_id", "group")):
        if column not in frame:
            continue
        crossing = frame.groupby(column)["split"].nunique()
        crossing = crossing[crossing > 1].index.tolist()
        if crossing:
            raise SkinLesionError(f"{path}: {what}(s) in more than one part: {', '.join(crossing[:10])}")
    return frame[[*SPLIT_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in frame.columns)]]


def write_splits(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write the split atomically (columns image_id, lesion_id, dx, split, and group_id / source when known)."""
    return write_csv(path, frame[[*SPLIT_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in frame.columns)]])


def class_order(values: pd.Series) -> list[str]:
    """The classes of a split in a fixed order: HAM10000's first, any other after them, sorted."""
    present = set(values.astype(str))
    return [c for c in CLASSES if c in present] + sorted(present - set(CLASSES))


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Images per class and part (rows: classes + total + lesions; columns: parts present + all)."""
    parts = [p for p in PARTS if (frame["split"] == p).any()]
    counts = pd.crosstab(frame["dx"], frame["split"]).reindex(index=class_order(frame["dx"]), columns=parts,
                                                              fill_value=0)  # fmt: skip
    counts["all"] = counts.sum(axis=1)
    counts.loc["images"] = counts.sum(axis=0)
    lesions = frame.groupby("split")["lesion_id"].nunique().reindex(parts, fill_value=0)
    counts.loc["lesions"] = [*lesions.tolist(), frame["lesion_id"].nunique()]
    counts.index.name = None
    counts.columns.name = None
    return counts


def format_summary(frame: pd.DataFrame) -> str:
    counts = summary(frame)
    classes = class_order(frame["dx"])
    share = counts.loc[classes] / counts.loc["images"] * 100
    out = counts.astype(object)
    for part in counts.columns:
        out.loc[classes, part] = [f"{n} ({s:.1f}%)" for n, s in zip(counts.loc[classes, part], share[part],
                                                                     strict=True)]  # fmt: skip
    text = out.to_string()
    if "group_id" in frame and (frame["group_id"] != frame["lesion_id"]).any():
        groups = frame.groupby("split")["group_id"].nunique().reindex([p for p in PARTS if p in set(frame["split"])])
        text += "\ngroups (patients / lesions / images kept whole): " + ", ".join(f"{p} {n}" for p, n in
                                                                                 groups.items())  # fmt: skip
    return text
