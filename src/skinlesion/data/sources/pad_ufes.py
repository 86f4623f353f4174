"""PAD-UFES-20 (smartphone clinical images, Brazil): ``metadata.csv`` (patient_id, lesion_id, ..., age, gender,
fitspatrick, region, diagnostic, ..., img_id, biopsed) + the PNGs in ``images/`` or ``imgs_part_1..3/`` (at the
top or under ``images/``, as the Mendeley zip unpacks).

Columns: diagnostic -> label (ACK BCC MEL NEV SCC SEK), gender -> sex, region -> site (``sites.PAD_REGION_TO_HAM``),
fitspatrick -> fitzpatrick (1..6, else NA), biopsed -> dx_type (True: histo; False: consensus, as the dataset
describes its non-biopsied diagnoses), img_id without its extension -> image_id. lesion_id is unique over the
dataset (the file names read PAT_<patient>_<lesion>_<image>.png).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from skinlesion.data.sites import PAD_REGION_TO_HAM
from skinlesion.data.sources.contract import (
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
    text,
)
from skinlesion.data.taxonomy import PAD_UFES_20
from skinlesion.errors import SkinLesionError

REQUIRED = ("patient_id", "lesion_id", "img_id", "diagnostic")
RENAME = {"gender": "sex", "region": "site", "fitspatrick": "fitzpatrick"}


def _metadata(folder: Path) -> Path | None:
    for found in named(folder, r"metadata\.csv", False):
        header = first_line(found)
        if "img_id" in header and "diagnostic" in header:
            return found
    return None


def _image_dirs(folder: Path) -> list[Path]:
    tops = [folder, *named(folder, r"images", True)]
    for top in tops[1:]:
        tops += named(top, r"images", True)  # images/images/ in some re-zipped copies
    candidates = [*tops[1:], *[p for top in tops for p in named(top, r"imgs_part_\d+", True)]]
    found = [c for c in candidates if holds_images(c)]
    return found or ([folder] if holds_images(folder) else [])


def missing(folder: Path) -> str | None:
    if _metadata(folder) is None:
        return "no metadata.csv with img_id and diagnostic columns"
    if not _image_dirs(folder):
        return "no images/ or imgs_part_*/ folder of images"
    return None


def read_pad_ufes_csv(path: str | Path) -> pd.DataFrame:
    """metadata.csv as image_id, label, patient_id, lesion_id, age, sex, site, fitzpatrick, dx_type (raw text
    for age / sex / site)."""
    path = Path(path)
    raw = read_csv_checked(path, REQUIRED, "PAD-UFES-20 metadata.csv")
    frame = raw.rename(columns=RENAME)
    frame["image_id"] = frame["img_id"].str.strip().map(lambda n: Path(n).stem)
    frame["label"] = check_labels(frame["diagnostic"], PAD_UFES_20, path, "diagnostic")
    if "fitzpatrick" in frame.columns:
        skin = pd.to_numeric(text(frame["fitzpatrick"]), errors="coerce")
        frame["fitzpatrick"] = skin.where(skin.isin([1, 2, 3, 4, 5, 6]))
    if "biopsed" in frame.columns:
        biopsy = frame["biopsed"].str.strip().str.lower()
        frame["dx_type"] = biopsy.map({"true": "histo", "false": "consensus"}).astype(str)
    cols = ["image_id", "label", "patient_id", "lesion_id", "age", "sex", "site", "fitzpatrick", "dx_type"]
    return frame.reindex(columns=cols)


def read_pad_ufes20(
    folder: str | Path, allow_missing: bool = False, check: str = "quick", progress: bool = False
) -> pd.DataFrame:
    """A PAD-UFES-20 folder as a source table."""
    root = Path(folder).expanduser().resolve()
    meta, dirs = _metadata(root), _image_dirs(root)
    if meta is None or not dirs:
        raise SkinLesionError(f"{root}: {missing(root)}; expected metadata.csv + images/imgs_part_*/ (PAD-UFES-20)")
    frame, repeats = drop_repeats(read_pad_ufes_csv(meta), meta)
    frame["path"], extra_files = paths_by_stem(frame["image_id"], dirs)
    frame, counts = clinical(frame, PAD_REGION_TO_HAM)
    return finish(frame, "pad-ufes-20", "pad-ufes-20", meta, root, dirs, allow_missing, check, progress,
                  {**counts, "duplicate_rows": repeats, "extra_files": extra_files})  # fmt: skip


PAD_UFES = Source(
    name="pad-ufes-20",
    title="PAD-UFES-20 (smartphone clinical images)",
    label_set="pad-ufes-20",
    layout="metadata.csv + images/imgs_part_1..3/*.png (or imgs_part_*/ at the top)",
    citation="Pacheco A. G. C. et al. PAD-UFES-20: a skin lesion dataset composed of patient data and clinical "
    "images collected from smartphones. Data in Brief 32, 106221 (2020). doi:10.1016/j.dib.2020.106221",
    licence="CC BY 4.0",
    url="https://data.mendeley.com/datasets/zr7vgbcyr2/1",
    missing=missing,
    reader=read_pad_ufes20,
)
