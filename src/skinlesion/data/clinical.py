"""Clinical metadata of images to predict: age, sex and body site (for the metadata prior) and lesion ids (for
lesion pooling), from a --metadata CSV matched on the file name stem or from values given for one patient."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from skinlesion.data.sources.contract import clean_age
from skinlesion.errors import SkinLesionError

FIELDS = ("age", "sex", "localization")

SEXES = ("male", "female")


def read_metadata_csv(csv_path: str) -> pd.DataFrame:
    """The --metadata CSV, one row per image_id (the first where an id repeats); ages that are not ages (out of
    0-120, not finite, not numbers: contract.clean_age, as every reader) are unknown, counted in
    ``attrs["ages_refused"]``."""
    path = Path(csv_path)
    if not path.is_file():
        raise SkinLesionError(f"--metadata {path} does not exist; pass a CSV of image_id, age, sex, localization")
    try:
        given = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SkinLesionError(f"--metadata {path} is not a readable CSV ({' '.join(str(e).split())})") from e
    if "image_id" not in given:
        raise SkinLesionError(
            f"--metadata {path} needs an image_id column (the file name stem; it has: "
            f"{', '.join(map(str, given.columns))})"
        )
    given = given.drop_duplicates("image_id").reset_index(drop=True)
    refused = 0
    if "age" in given:  # -5, 1e309, -inf, 'abc': unknown, as --age would refuse them (counted for the summary)
        given["age"], refused, _ = clean_age(given["age"])
    given.attrs["ages_refused"] = refused
    return given


def lesion_ids(
    files: Sequence[Path], given: pd.DataFrame | None, required: bool, csv_path: str | None = None
) -> list[str | None] | None:
    """Lesion id of each input from the --metadata CSV's lesion_id column (None for an image it does not name: a
    lesion of its own); None when there is no such column, an error instead when pooling was asked for
    (``required``), as when the CSV names none of the inputs."""
    if given is None or "lesion_id" not in given:
        if required:
            raise SkinLesionError("--pool-lesions needs --metadata CSV with image_id and lesion_id columns "
                                  "(e.g. HAM10000_metadata.csv) to know which images show the same lesion")  # fmt: skip
        return None
    known = {k: str(v) for k, v in zip(given["image_id"], given["lesion_id"], strict=True) if pd.notna(v)}
    ids = [known.get(f.stem) for f in files]
    if required and all(i is None for i in ids):
        raise SkinLesionError(f"--pool-lesions: --metadata {csv_path} gives a lesion_id for none of the inputs "
                              "(its image_id must be the file name without extension)")  # fmt: skip
    return ids


def clinical_table(
    files: Sequence[Path],
    given: pd.DataFrame | None = None,
    age: float | None = None,
    sex: str | None = None,
    site: str | None = None,
    sites: Sequence[str] = (),
    csv_path: str | None = None,
) -> pd.DataFrame | None:
    """Age, sex and site of each input (row i = files[i]): from the --metadata CSV ``given`` (read_metadata_csv)
    matched on image_id = file stem, then the command-line values for every image. None when nothing was given."""
    if given is None and age is None and sex is None and site is None:
        return None
    table = pd.DataFrame({"image_id": [f.stem for f in files]})
    if given is not None:
        fields = [c for c in FIELDS if c in given]
        if not fields:
            pool = "; for its lesion ids alone add --pool-lesions" if "lesion_id" in given else ""
            raise SkinLesionError(
                f"--metadata {csv_path} needs at least one of {', '.join(FIELDS)} for the metadata "
                f"prior (it has: {', '.join(map(str, given.columns))}){pool}"
            )
        table = table.merge(given[["image_id", *fields]], on="image_id", how="left")
    for column, value in clinical_values(age, sex, site, sites).items():
        table[column] = value
    return table


def clinical_values(
    age: float | None, sex: str | None, site: str | None, sites: Sequence[str] = ()
) -> dict[str, float | str]:
    """Checked age / sex / site of one patient as metadata columns; those left out are not in the dict."""
    values: dict[str, float | str] = {}
    if age is not None:
        if not 0 <= age <= 120:
            raise SkinLesionError(f"age {age:g} is not an age in years (0-120)")
        values["age"] = float(age)
    if sex is not None and sex.strip():
        if sex.strip().lower() not in SEXES:
            raise SkinLesionError(f"sex {sex!r}: use male or female (leave it out when unknown)")
        values["sex"] = sex.strip().lower()
    if site is not None and site.strip():
        if sites and site.strip().lower() not in sites:
            raise SkinLesionError(f"site {site!r} is not a body site the prior knows; use one of: {', '.join(sites)}")
        values["localization"] = site.strip().lower()
    return values
