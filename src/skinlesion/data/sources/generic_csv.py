"""Any labels CSV + a folder of images, described by column names.

The image column may hold file names with an extension (``a.jpg``), without (``a``: looked up by name stem in
``images``), or paths relative to ``images`` or to the CSV's folder (``part1/a.jpg``). image_id is the file's name
stem (ids must stay unique). Labels are checked against ``label_set`` when given, else the first named set that
holds them all is used (``taxonomy.guess_label_set``), else they are kept as given under label set ``custom``.
Sites: HAM10000 terms stay, ISIC general sites map as for ISIC, anything else is kept in lower case.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from skinlesion.data.ham10000 import index_images
from skinlesion.data.images import IMAGE_SUFFIXES
from skinlesion.data.sites import ISIC_GENERAL_TO_HAM
from skinlesion.data.sources.contract import (
    Source,
    clinical,
    drop_repeats,
    finish,
    listing,
    read_csv_checked,
    resolve_label_set,
)
from skinlesion.errors import SkinLesionError

CLINICAL = {"lesion_col": "lesion_id", "patient_col": "patient_id", "age_col": "age", "sex_col": "sex",
            "site_col": "site"}  # fmt: skip


def _csv_file(root: Path, labels_csv: str | Path | None) -> Path:
    if labels_csv is not None:
        path = Path(labels_csv).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise SkinLesionError(f"labels CSV {path} does not exist")
        return path.resolve()
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        what = "no CSV" if not found else f"{len(found)} CSVs ({', '.join(p.name for p in found)})"
        raise SkinLesionError(f"{root} holds {what}; name the labels CSV with labels_csv=")
    return found[0]


def _resolve(values: pd.Series, images: Path, csv_dir: Path) -> tuple[list[str], list[str]]:
    """(image_id, path or '') per value: a relative path or file name first, else a name stem in ``images``."""
    by_stem, _ = index_images([images]) if images.is_dir() else ({}, [])
    ids, paths = [], []
    for value in values:
        rel = Path(value)
        found = next((p for p in (images / rel, csv_dir / rel) if value and p.is_file()), None)
        stem = rel.stem if rel.suffix.lower() in IMAGE_SUFFIXES else rel.name
        if found is None and stem in by_stem:
            found = by_stem[stem]
        ids.append(stem)
        paths.append(str(found.resolve()) if found else "")
    return ids, paths


def read_csv_source(
    folder: str | Path,
    allow_missing: bool = False,
    check: str = "quick",
    progress: bool = False,
    labels_csv: str | Path | None = None,
    image_col: str = "image_id",
    label_col: str = "label",
    images: str | Path | None = None,
    lesion_col: str | None = None,
    patient_col: str | None = None,
    age_col: str | None = None,
    sex_col: str | None = None,
    site_col: str | None = None,
    label_set: str | None = None,
    name: str = "csv",
) -> pd.DataFrame:
    """A labels CSV + image folder as a source table named ``name``. ``images`` defaults to ``folder/images`` when
    it exists, else ``folder``; relative ``labels_csv`` / ``images`` are taken from ``folder``."""
    root = Path(folder).expanduser().resolve()
    path = _csv_file(root, labels_csv)
    given = {"lesion_col": lesion_col, "patient_col": patient_col, "age_col": age_col, "sex_col": sex_col,
             "site_col": site_col}  # fmt: skip
    optional = {col: CLINICAL[key] for key, col in given.items() if col}
    raw = read_csv_checked(path, [image_col, label_col, *optional], "labels CSV")
    if images is None:
        img_dir = root / "images" if (root / "images").is_dir() else root
    else:
        img_dir = Path(images).expanduser()
        img_dir = img_dir if img_dir.is_absolute() else root / img_dir
    if not img_dir.is_dir():
        raise SkinLesionError(f"image folder {img_dir} does not exist")
    frame = raw[list(optional)].rename(columns=optional)
    frame["label"], labels_of = resolve_label_set(raw[label_col], label_set, path, label_col)
    frame["image_id"], frame["path"] = _resolve(raw[image_col].str.strip(), img_dir, path.parent)
    if (frame["image_id"] == "").any():
        raise SkinLesionError(f"{path}: {int((frame['image_id'] == '').sum())} row(s) with an empty {image_col}")
    files = frame[frame["path"] != ""].groupby("image_id")["path"].unique()
    clash = files[files.map(len) > 1]
    if len(clash):
        shown = listing([f"{i} ({', '.join(os.path.relpath(p, root) for p in ps)})" for i, ps in clash.items()])
        raise SkinLesionError(f"{path}: several files share a name stem (the image id): {shown}; rename them")
    frame, repeats = drop_repeats(frame, path)
    frame, counts = clinical(frame, ISIC_GENERAL_TO_HAM)
    attrs = {**counts, "duplicate_rows": repeats, "columns": {"image": image_col, "label": label_col, **optional}}
    return finish(frame, name, labels_of, path, root, [img_dir], allow_missing, check, progress, attrs)


CSV = Source(
    name="csv",
    title="Any labels CSV + image folder",
    label_set=None,
    layout="a CSV with an image column and a label column (+ optional lesion, patient, age, sex, site) + images/",
    citation="(that of the data)",
    licence="(that of the data)",
    url="",
    missing=lambda folder: "a generic CSV is read only when named (source='csv', image_col=, label_col=)",
    reader=read_csv_source,
    detectable=False,
    options=("labels_csv", "image_col", "label_col", "images", *CLINICAL, "label_set", "name"),
)
