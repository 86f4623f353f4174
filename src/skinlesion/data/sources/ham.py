"""HAM10000 (and the ISIC 2018 Task 3 layout of the same images) through ``data.ham10000.load_table``, as a
source table: dx -> label (ham7), localization -> site, "unknown" sex / site -> NA. For the ISIC 2018 layout
without a lesion-groupings file, lesion_id is NA (``load_table`` puts the image id there)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from skinlesion.data import ham10000
from skinlesion.data.sources.contract import COLUMNS, Frozen, Source, clinical
from skinlesion.errors import SkinLesionError


def missing(folder: Path) -> str | None:
    try:
        ham10000.find_layout(folder)
    except SkinLesionError:
        return "no HAM10000_metadata.csv (or ISIC2018_Task3_*_GroundTruth.csv) with its image folder"
    return None


def read_ham10000(
    folder: str | Path, allow_missing: bool = False, check: str = "quick", progress: bool = False,
    metadata: str | Path | None = None, images: str | Path | None = None,
) -> pd.DataFrame:
    """The HAM10000 folder (any layout ``ham10000.find_layout`` knows; ``metadata`` / ``images`` override its
    files) as a source table; attrs add ``layout``."""
    loaded = ham10000.load_table(folder, metadata, images, allow_missing=allow_missing, check=check,
                                 progress=progress)  # fmt: skip
    info, loaded.attrs = loaded.attrs, {}  # its list of dicts would be deep-copied by every step below
    frame = loaded.rename(columns={"dx": "label", "localization": "site"})
    if info["layout"] == "isic2018" and ham10000.find_layout(info["data_dir"]).lesion_groupings is None:
        frame["lesion_id"] = pd.NA  # load_table's stand-in (the image id) is not a known lesion
    frame, counts = clinical(frame, {})
    frame["source"] = "ham10000"
    frame["label_set"] = "ham7"
    table = frame[[*COLUMNS, "dx_type"]].reset_index(drop=True)
    n_dropped = len(info["dropped"])
    kinds = pd.Series([d["reason"].split(" (")[0] for d in info["dropped"]], dtype=str).value_counts()
    table.attrs = {
        "source": "ham10000",
        "label_set": "ham7",
        "data_dir": info["data_dir"],
        "labels_file": info["metadata"],
        "image_dirs": info["image_dirs"],
        "check": info["check"],
        "n_listed": len(table) + n_dropped,
        "label_counts": {str(k): int(n) for k, n in table["label"].value_counts().items()},
        "dropped": Frozen(info["dropped"]),
        "dropped_counts": {str(k): int(n) for k, n in kinds.items()},
        "duplicate_rows": Frozen(info["duplicate_rows"]),
        "extra_files": Frozen(info["extra_files"]),
        "layout": info["layout"],
        **counts,
    }
    return table


HAM10000 = Source(
    name="ham10000",
    title="HAM10000 (ISIC 2018 Task 3 training set)",
    label_set="ham7",
    layout="HAM10000_metadata.csv + images/ or HAM10000_images_part_1/2/, or ISIC2018_Task3_*_GroundTruth.csv + "
    "ISIC2018_Task3_*_Input/",
    citation="Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of multi-source "
    "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018). doi:10.1038/sdata.2018.161",
    licence="CC BY-NC-SA 4.0",
    url="https://doi.org/10.7910/DVN/DBW86T",
    missing=missing,
    reader=read_ham10000,
    shared_ids=True,
    options=("metadata", "images"),
)
