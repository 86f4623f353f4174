"""ISIC 2019 challenge: ``ISIC_2019_<Part>_GroundTruth.csv`` (one-hot MEL NV BCC AK BKL DF VASC SCC UNK) +
``ISIC_2019_<Part>_Input/`` (+ ``ISIC_2019_<Part>_Metadata.csv``: image, age_approx, anatom_site_general,
lesion_id, sex), Part = Training or Test.

Quirk: 2,074 training ids end in ``_downsampled`` (MSK images the challenge stored smaller). The table's image_id
drops the suffix, so the id is the ISIC archive id other sources use; the file may have either name. attrs add
``downsampled`` (ids renamed), ``no_metadata`` (ground-truth rows without a metadata row) and ``metadata_only``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.data.sites import ISIC_GENERAL_TO_HAM
from skinlesion.data.sources.contract import (
    Source,
    clinical,
    drop_repeats,
    finish,
    holds_images,
    listing,
    named,
    paths_by_stem,
    read_csv_checked,
)
from skinlesion.data.taxonomy import ISIC2019
from skinlesion.errors import SkinLesionError

SUFFIX = "_downsampled"
METADATA_COLUMNS = {"age_approx": "age", "anatom_site_general": "site", "lesion_id": "lesion_id", "sex": "sex"}


def _parts(folder: Path) -> list[str]:
    return [p.name.split("_")[2] for p in named(folder, r"ISIC_2019_(Training|Test)_GroundTruth\.csv", False)]


def _image_dir(folder: Path, part: str) -> Path | None:
    for found in named(folder, rf"ISIC_2019_{part}_Input", True):
        inner = named(found, rf"ISIC_2019_{part}_Input", True)  # some zips nest the folder in itself
        for candidate in (found, *inner):
            if holds_images(candidate):
                return candidate
    return None


def missing(folder: Path) -> str | None:
    parts = _parts(folder)
    if not parts:
        return "no ISIC_2019_Training_GroundTruth.csv"
    if not any(_image_dir(folder, p) for p in parts):
        return f"no ISIC_2019_{parts[0]}_Input/ folder of images"
    return None


def _one_hot_labels(raw: pd.DataFrame, path: Path) -> pd.Series:
    codes = [c for c in ISIC2019.codes if c in raw.columns]
    values = raw[codes].apply(pd.to_numeric, errors="coerce")
    odd = values.isna().any(axis=1) | ~values.isin([0, 1]).all(axis=1)
    if odd.any():
        rows = listing(list(raw.loc[odd, "image"]))
        raise SkinLesionError(f"{path}: one-hot values other than 0 and 1 in row(s) {rows}")
    sums = values.sum(axis=1).astype(int)
    if (sums != 1).any():
        groups = [f"{int((sums == k).sum())} sum to {k} ({listing(list(raw.loc[sums == k, 'image']))})"
                  for k in sorted(set(sums) - {1})]  # fmt: skip
        raise SkinLesionError(f"{path}: every row needs exactly one 1 among {', '.join(codes)}; {'; '.join(groups)}")
    return pd.Series(np.array(codes)[values.to_numpy().argmax(axis=1)], index=raw.index)


def read_isic2019_csv(ground_truth: str | Path, metadata: str | Path | None = None) -> pd.DataFrame:
    """The ground truth (+ metadata) as image_id, isic_name, label, lesion_id, age, sex, site (raw text)."""
    gt_path = Path(ground_truth)
    raw = read_csv_checked(gt_path, ["image", *ISIC2019.codes[:-1]], "ISIC 2019 ground truth")
    unknown = [c for c in raw.columns if c not in ("image", *ISIC2019.codes)]
    if unknown:
        raise SkinLesionError(
            f"{gt_path}: unknown column(s) {', '.join(unknown)}; an ISIC 2019 ground truth has image,"
            f"{','.join(ISIC2019.codes)}"
        )
    raw["image"] = raw["image"].str.strip()
    frame = pd.DataFrame({"isic_name": raw["image"], "label": _one_hot_labels(raw, gt_path)})
    frame["image_id"] = frame["isic_name"].str.removesuffix(SUFFIX)
    renamed = int((frame["image_id"] != frame["isic_name"]).sum())
    no_metadata, metadata_only = len(frame), 0
    if metadata is not None:
        meta = read_csv_checked(Path(metadata), ["image"], "ISIC 2019 metadata file")
        meta["image"] = meta["image"].str.strip()
        meta = meta.drop_duplicates("image").rename(columns=METADATA_COLUMNS)
        cols = ["image", *[c for c in METADATA_COLUMNS.values() if c in meta.columns]]
        frame = frame.merge(meta[cols], left_on="isic_name", right_on="image", how="left", indicator=True)
        no_metadata = int((frame["_merge"] == "left_only").sum())
        metadata_only = int((~meta["image"].isin(frame["isic_name"])).sum())
        frame = frame.drop(columns=["image", "_merge"])
    frame.attrs.update(downsampled=renamed, no_metadata=no_metadata, metadata_only=metadata_only)
    return frame


def read_isic2019(
    folder: str | Path,
    allow_missing: bool = False,
    check: str = "quick",
    progress: bool = False,
    part: str | None = None,
) -> pd.DataFrame:
    """An ISIC 2019 folder as a source table (``part``: Training or Test, needed only when both are there)."""
    root = Path(folder).expanduser().resolve()
    parts = _parts(root)
    if part is None and len(parts) > 1:
        raise SkinLesionError(f"{root} holds ISIC 2019 {' and '.join(parts)} ground truths; choose one with part=")
    part = (part or (parts[0] if parts else "Training")).capitalize()
    gt = named(root, rf"ISIC_2019_{part}_GroundTruth\.csv", False)
    images = _image_dir(root, part)
    if not gt or images is None:
        raise SkinLesionError(f"{root}: {missing(root) or f'no ISIC 2019 {part} files'}; expected "
                              f"ISIC_2019_{part}_GroundTruth.csv + ISIC_2019_{part}_Input/")  # fmt: skip
    meta = named(root, rf"ISIC_2019_{part}_Metadata\.csv", False)
    frame = read_isic2019_csv(gt[0], meta[0] if meta else None)
    extra = dict(frame.attrs, metadata_file=str(meta[0]) if meta else None)
    frame, repeats = drop_repeats(frame, gt[0])
    frame["path"], extra_files = paths_by_stem(frame["image_id"], [images], lambda i: [i + SUFFIX])
    frame, counts = clinical(frame.drop(columns=["isic_name"]), ISIC_GENERAL_TO_HAM)
    return finish(frame, "isic2019", "isic2019", gt[0], root, [images], allow_missing, check, progress,
                  {**extra, **counts, "duplicate_rows": repeats, "extra_files": extra_files})  # fmt: skip


ISIC_2019 = Source(
    name="isic2019",
    title="ISIC 2019 challenge (BCN20000 + HAM10000 + MSK)",
    label_set="isic2019",
    layout="ISIC_2019_Training_GroundTruth.csv + ISIC_2019_Training_Input/ (+ ISIC_2019_Training_Metadata.csv)",
    citation="Tschandl et al., Sci. Data 5, 180161 (2018); Codella et al., arXiv:1710.05006 (2017); Combalia et "
    "al., BCN20000: Dermoscopic lesions in the wild, arXiv:1908.02288 (2019)",
    licence="CC BY-NC 4.0",
    url="https://challenge.isic-archive.com/data/#2019",
    missing=missing,
    reader=read_isic2019,
    shared_ids=True,
    options=("part",),
)
