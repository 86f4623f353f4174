"""ISIC 2020 challenge (SIIM-ISIC Melanoma Classification): a ground truth CSV (``train.csv`` as Kaggle ships it,
or ``ISIC_2020_Training_GroundTruth[_v2].csv``: image_name, patient_id, [lesion_id,] sex, age_approx,
anatom_site_general_challenge, diagnosis, benign_malignant, target) + the JPEGs in ``train/``, ``jpeg/train/``
or ``ISIC_2020_Training_JPEG/[train/]``.

Labels: ``diagnosis`` (label set isic2020, 9 values with "unknown") or, with ``label_field="target"``, the
melanoma flag (label set melanoma-binary: 1 -> mel, 0 -> other). The ``target`` column is kept either way.
``ISIC_2020_Training_Duplicates.csv`` (pairs image_name_1, image_name_2), when beside the CSV, keeps one image of
each set of duplicates (the one listed first in the ground truth); attrs add ``duplicates_removed`` (ids) and
``target_disagrees`` (rows whose target is not "diagnosis is melanoma").
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from skinlesion.data.sites import ISIC_GENERAL_TO_HAM
from skinlesion.data.sources.contract import (
    Frozen,
    Source,
    check_labels,
    clinical,
    drop_repeats,
    finish,
    first_line,
    holds_images,
    named,
    paths_by_stem,
    read_csv_checked,
)
from skinlesion.data.taxonomy import ISIC2020, MELANOMA, LabelSet
from skinlesion.errors import SkinLesionError

CSV_NAMES = (r"ISIC_2020_Training_GroundTruth_v2\.csv", r"ISIC_2020_Training_GroundTruth\.csv", r"train\.csv")
IMAGE_DIRS = ("train", "jpeg/train", "ISIC_2020_Training_JPEG/train", "ISIC_2020_Training_JPEG")
RENAME = {"image_name": "image_id", "age_approx": "age", "anatom_site_general_challenge": "site"}
LABEL_FIELDS = ("diagnosis", "target")
_TARGET = LabelSet("target", ("0", "1"), {"0": "benign", "1": "malignant"})


def _csv(folder: Path) -> Path | None:
    for pattern in CSV_NAMES:
        found = named(folder, pattern, False)
        if found and "image_name" in first_line(found[0]):
            return found[0]
    return None


def _image_dir(folder: Path) -> Path | None:
    for sub in IMAGE_DIRS:
        candidate = folder
        for part in sub.split("/"):
            hits = named(candidate, part, True)
            if not hits:
                break
            candidate = hits[0]
        else:
            if holds_images(candidate):
                return candidate
    return None


def missing(folder: Path) -> str | None:
    if _csv(folder) is None:
        return "no train.csv / ISIC_2020_Training_GroundTruth.csv with image_name"
    if _image_dir(folder) is None:
        return "no train/ (or jpeg/train/, ISIC_2020_Training_JPEG/) folder of JPEGs"
    return None


def _clusters(pairs: pd.DataFrame, order: dict[str, int]) -> list[str]:
    """Ids to remove so that one image of each set of duplicates stays (the first in ``order``)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in zip(pairs["image_name_1"], pairs["image_name_2"], strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            keep, drop = sorted((ra, rb), key=lambda i: order.get(i, len(order)))
            parent[drop] = keep
    return sorted(i for i in parent if i in order and root(i) != i)


def read_isic2020_csv(
    path: str | Path, duplicates: str | Path | None = None, label_field: str = "diagnosis"
) -> pd.DataFrame:
    """The ground truth as image_id, label, target, patient_id, lesion_id, age, sex, site (raw text); one image
    of each duplicate set when ``duplicates`` is given."""
    if label_field not in LABEL_FIELDS:
        raise SkinLesionError(f"label_field must be one of {', '.join(LABEL_FIELDS)}, got {label_field!r}")
    path = Path(path)
    raw = read_csv_checked(path, ["image_name", "patient_id", "diagnosis", "target"], "ISIC 2020 ground truth")
    frame = raw.rename(columns=RENAME)
    frame["image_id"] = frame["image_id"].str.strip()
    frame["diagnosis"] = check_labels(frame["diagnosis"], ISIC2020, path, "diagnosis")
    frame["target"] = check_labels(frame["target"], _TARGET, path, "target").astype(int)
    frame["label"] = frame["diagnosis"] if label_field == "diagnosis" else frame["target"].map({1: "mel", 0: "other"})
    disagree = int(((frame["diagnosis"] == "melanoma") != (frame["target"] == 1)).sum())
    removed: list[str] = []
    if duplicates is not None:
        pairs = read_csv_checked(Path(duplicates), ["image_name_1", "image_name_2"], "ISIC 2020 duplicates list")
        order = {i: n for n, i in enumerate(frame["image_id"])}
        removed = _clusters(pairs.apply(lambda c: c.str.strip()), order)
        frame = frame[~frame["image_id"].isin(removed)].reset_index(drop=True)
    cols = ["image_id", "label", "target", "patient_id", "lesion_id", "age", "sex", "site"]
    frame = frame.reindex(columns=cols)
    frame.attrs.update(duplicates_removed=Frozen(removed), target_disagrees=disagree, label_field=label_field)
    return frame


def read_isic2020(
    folder: str | Path,
    allow_missing: bool = False,
    check: str = "quick",
    progress: bool = False,
    label_field: str = "diagnosis",
) -> pd.DataFrame:
    """An ISIC 2020 folder as a source table (``label_field``: diagnosis or target)."""
    root = Path(folder).expanduser().resolve()
    csv, images = _csv(root), _image_dir(root)
    if csv is None or images is None:
        raise SkinLesionError(f"{root}: {missing(root)}; expected train.csv + train/*.jpg (ISIC 2020 layout)")
    dup = named(csv.parent, r"ISIC_2020_Training_Duplicates\.csv", False)
    frame = read_isic2020_csv(csv, dup[0] if dup else None, label_field)
    extra = dict(frame.attrs, duplicates_file=str(dup[0]) if dup else None)
    frame, repeats = drop_repeats(frame, csv)
    frame["path"], extra_files = paths_by_stem(frame["image_id"], [images])
    extra_files = sorted(set(extra_files) - set(extra["duplicates_removed"]))
    frame, counts = clinical(frame, ISIC_GENERAL_TO_HAM)
    labels_of = "isic2020" if label_field == "diagnosis" else MELANOMA.name
    return finish(frame, "isic2020", labels_of, csv, root, [images], allow_missing, check, progress,
                  {**extra, **counts, "duplicate_rows": repeats, "extra_files": extra_files})  # fmt: skip


ISIC_2020 = Source(
    name="isic2020",
    title="ISIC 2020 challenge (SIIM-ISIC Melanoma Classification)",
    label_set="isic2020",
    layout="train.csv (or ISIC_2020_Training_GroundTruth.csv) + train/*.jpg (or jpeg/train/, "
    "ISIC_2020_Training_JPEG/)",
    citation="Rotemberg V., Kurtansky N., Betz-Stablein B., et al. A patient-centric dataset of images and metadata "
    "for identifying melanomas using clinical context. Sci. Data 8, 34 (2021). doi:10.1038/s41597-021-00815-z",
    licence="CC BY-NC 4.0",
    url="https://challenge.isic-archive.com/data/#2020",
    missing=missing,
    reader=read_isic2020,
    shared_ids=True,
    options=("label_field",),
)
