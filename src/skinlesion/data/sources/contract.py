"""The table every source reader returns, the ``Source`` description, and the cleaning they share.

Columns (one row per usable image; text columns are pandas ``str`` with NaN for missing):

* ``image_id`` file name stem (ISIC ids as ISIC_0000000); unique in a table
* ``path`` absolute path of the image file
* ``label`` the source's own label code; ``label_set`` the name of the set it comes from (``data.taxonomy``)
* ``lesion_id``, ``patient_id`` as the source gives them, else NA
* ``age`` float years; NA when missing, and when not finite or outside 0..120 (counted: attrs ``age_invalid``)
* ``sex`` male / female / NA; ``site`` body site, lower case, HAM10000 terms where they fit (``data.sites``)
* ``source`` the source's short name; optional ``fitzpatrick`` (float 1..6) and ``dx_type``
  (how the diagnosis was made: HAM10000's terms histo / follow_up / consensus / confocal where the source allows)

``attrs``: source, label_set, data_dir, labels_file, image_dirs, check, n_listed (rows after removing repeats),
label_counts, dropped (image_id, path, reason per dropped row), dropped_counts, duplicate_rows (ids listed again
with the same label: kept once), extra_files (image stems no row names), age_invalid, age_missing,
sex_unrecognised, site_unmapped (these four counted over the rows listed, before images are dropped), plus what a
source adds (named in its module).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.data.ham10000 import check_files, index_images
from skinlesion.data.images import IMAGE_SUFFIXES
from skinlesion.data.sites import to_ham_site
from skinlesion.data.taxonomy import CUSTOM, LabelSet, guess_label_set, label_set
from skinlesion.errors import SkinLesionError

COLUMNS = ("image_id", "path", "label", "label_set", "lesion_id", "patient_id", "age", "sex", "site", "source")
OPTIONAL = ("fitzpatrick", "dx_type")
AGE_RANGE = (0.0, 120.0)
MISSING_TEXT = frozenset({"", "unknown", "unk", "na", "n/a", "nan", "none", "null"})
SEXES = {"male": "male", "m": "male", "man": "male", "female": "female", "f": "female", "woman": "female"}
LIST_MAX = 10


@dataclass(frozen=True)
class Source:
    """One data source: what it is, how to recognise its folder, how to read it."""

    name: str  # short name, the ``source`` column
    title: str
    label_set: str | None  # the taxonomy name of its labels; None: taken from the data (generic sources)
    layout: str  # what a folder of it holds, one line
    citation: str
    licence: str
    url: str
    missing: Callable[[Path], str | None]  # None when ``folder`` holds this layout, else what is missing
    reader: Callable[..., pd.DataFrame]  # reader(folder, allow_missing=, check=, progress=, **options)
    detectable: bool = True  # found by ``registry.detect``; generic sources need options and are not
    shared_ids: bool = False  # its image / lesion / patient ids are ISIC archive ids (the same across ISIC sources)
    options: tuple[str, ...] = field(default=())  # extra keyword options of its reader

    def labels(self) -> LabelSet | None:
        return label_set(self.label_set) if self.label_set else None


class Frozen(tuple):
    """An immutable list for ``attrs`` (dropped rows, file names): pandas deep-copies ``attrs`` on every operation,
    and this one is shared instead (a read with 15,000 missing files stays fast). Its items are not to be changed."""

    def __deepcopy__(self, memo: dict) -> Frozen:
        return self


def named(folder: Path, pattern: str, want_dir: bool) -> list[Path]:
    """Entries of ``folder`` whose whole name matches ``pattern`` (any letter case), files or folders, sorted."""
    rx = re.compile(pattern, re.IGNORECASE)
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [p for p in entries if rx.fullmatch(p.name) and p.is_dir() == want_dir]


def first_line(path: Path) -> str:
    """The first line of a text file ('' when unreadable): enough to tell whose CSV it is."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline()
    except OSError:
        return ""


def holds_images(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.iterdir())
    except OSError:
        return False


def listing(items: Sequence[str]) -> str:
    shown = ", ".join(map(str, items[:LIST_MAX]))
    return shown + (f" ... and {len(items) - LIST_MAX} more" if len(items) > LIST_MAX else "")


def read_csv_checked(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """A comma-separated file as text (headers stripped); one-line errors for an unreadable file, another
    delimiter, and missing columns."""
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SkinLesionError(f"cannot read {path} as CSV ({' '.join(str(e).split())}); check the file") from e
    raw.columns = [str(c).strip().lstrip("\ufeff") for c in raw.columns]
    missing = [c for c in required if c not in raw.columns]
    if missing:
        header = ",".join(raw.columns)
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if len(raw.columns) == 1 and sep in header:
                raise SkinLesionError(f"{path} is separated by {name}; a {what} is comma-separated")
        raise SkinLesionError(
            f"{path}: missing column(s) {', '.join(missing)}; a {what} has {', '.join(required)} (found: {header})"
        )
    return raw


def text(values: pd.Series) -> pd.Series:
    """Stripped text; empty and unknown-like values -> NaN."""
    out = values.astype(str).str.strip()
    return out.where(~out.str.lower().isin(list(MISSING_TEXT)) & out.notna()).astype(str)


def clean_age(values: pd.Series) -> tuple[pd.Series, int, int]:
    """Ages as float (NA when missing or invalid) and the counts (invalid, missing)."""
    given = text(values)
    number = pd.to_numeric(given, errors="coerce").astype(float)
    lo, hi = AGE_RANGE
    valid = number.map(lambda a: math.isfinite(a) and lo <= a <= hi)
    invalid = int((given.notna() & ~valid).sum())
    return number.where(valid), invalid, int(given.isna().sum())


def clean_sex(values: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """male / female / NA, and the counts of values that are neither (they become NA)."""
    given = text(values)
    sex = given.str.lower().map(SEXES).astype(str)
    odd = given[given.notna() & sex.isna()]
    return sex, {str(k): int(n) for k, n in odd.value_counts().items()}


def check_labels(labels: pd.Series, labels_of: LabelSet, path: Path | str, column: str) -> pd.Series:
    """Labels as the set's codes (letter case ignored); one-line error listing values outside the set."""
    canon = labels.map(lambda v: labels_of.canonical(v) if isinstance(v, str) else None)
    bad = labels[canon.isna()].fillna("(empty)")
    if len(bad):
        counts = bad.value_counts()
        shown = listing([f"{v!r} ({n} row{'s' if n > 1 else ''})" for v, n in counts.items()])
        raise SkinLesionError(
            f"{path}: {len(bad)} row(s) with unknown {column}: {shown}; allowed: {', '.join(labels_of.codes)}"
            " - fix or remove those rows"
        )
    return canon.astype(str)


def drop_repeats(frame: pd.DataFrame, path: Path | str) -> tuple[pd.DataFrame, list[str]]:
    """One row per image_id: an id listed again with the same label is kept once (returned); with another label,
    a one-line error."""
    repeated = frame["image_id"].duplicated(keep="first")
    ids = sorted(set(frame.loc[repeated, "image_id"]))
    if ids:
        clash = frame[frame["image_id"].isin(ids)].groupby("image_id")["label"].nunique()
        clash = sorted(clash[clash > 1].index)
        if clash:
            raise SkinLesionError(
                f"{path}: image id(s) listed twice with different labels: {listing(clash)}; keep one row per image"
            )
    return frame.loc[~repeated].reset_index(drop=True), ids


def paths_by_stem(
    ids: pd.Series, image_dirs: Sequence[Path], aliases: Callable[[str], list[str]] | None = None
) -> tuple[list[str], list[str]]:
    """Path of each id's file in the folders ('' if none; ``aliases(id)`` gives other stems to try), and the
    stems of image files no id uses."""
    files, _ = index_images(image_dirs)
    used: set[str] = set()
    paths = []
    for image_id in ids:
        stem = next((s for s in [image_id, *(aliases(image_id) if aliases else [])] if s in files), None)
        paths.append(str(files[stem]) if stem else "")
        used.add(stem or "")
    return paths, sorted(set(files) - used)


def clinical(frame: pd.DataFrame, site_map: dict[str, str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Clean ``age``, ``sex`` and ``site`` in place of the raw values; the counts for attrs."""
    frame = frame.copy()
    for col in ("age", "sex", "site", "lesion_id", "patient_id"):
        if col not in frame.columns:
            frame[col] = np.nan
    frame["age"], age_invalid, age_missing = clean_age(frame["age"])
    frame["sex"], sex_odd = clean_sex(frame["sex"])
    frame["site"], site_odd = to_ham_site(frame["site"], site_map)
    frame["lesion_id"] = text(frame["lesion_id"])
    frame["patient_id"] = text(frame["patient_id"])
    counts = {"age_invalid": age_invalid, "age_missing": age_missing, "sex_unrecognised": sex_odd}
    return frame, {**counts, "site_unmapped": site_odd}


def finish(
    frame: pd.DataFrame,
    source: str,
    labels_of: str,
    labels_file: Path | str,
    data_dir: Path,
    image_dirs: Sequence[Path],
    allow_missing: bool,
    check: str,
    progress: bool,
    attrs: dict[str, Any],
) -> pd.DataFrame:
    """Check the files of ``frame`` (image_id, label, path, clean clinical columns, ...), drop or refuse the bad
    ones like ``ham10000.load_table`` (``allow_missing`` decodes every file), order the columns, fill attrs."""
    if allow_missing and check != "none":
        check = "full"
    checked = check_files(frame["path"].tolist(), check, progress)
    reasons = ["missing" if not p else r for p, r in zip(frame["path"], checked, strict=True)]
    bad = [(i, r) for i, r in zip(frame["image_id"], reasons, strict=True) if r]
    name = Path(labels_file).name
    if bad and not allow_missing:
        n_missing = sum(r == "missing" for _, r in bad)
        raise SkinLesionError(
            f"{len(bad)} image(s) listed in {name} cannot be used ({n_missing} missing, "
            f"{len(bad) - n_missing} unreadable): {listing([f'{i} ({r})' for i, r in bad])}; "
            "restore them, or pass --allow-missing to drop them"
        )
    rows = zip(frame["image_id"], frame["path"], reasons, strict=True)
    dropped = Frozen({"image_id": i, "path": p, "reason": r} for i, p, r in rows if r)
    table = frame.loc[[r is None for r in reasons]].reset_index(drop=True)
    if table.empty:
        raise SkinLesionError(f"no usable images for {labels_file} (all {len(frame)} listed are missing or bad)")
    table["source"] = source
    table["label_set"] = labels_of
    optional = [c for c in OPTIONAL if c in table.columns]
    extra = [c for c in table.columns if c not in COLUMNS and c not in OPTIONAL]
    table = table[[*COLUMNS, *optional, *extra]]
    kinds = pd.Series([d["reason"].split(" (")[0] for d in dropped], dtype=str).value_counts()
    table.attrs.update(
        source=source,
        label_set=labels_of,
        data_dir=str(data_dir),
        labels_file=str(labels_file),
        image_dirs=[str(d) for d in image_dirs],
        check=check,
        n_listed=len(frame),
        label_counts={str(k): int(n) for k, n in table["label"].value_counts().items()},
        dropped=dropped,
        dropped_counts={str(k): int(n) for k, n in kinds.items()},
        duplicate_rows=Frozen(),
        extra_files=Frozen(),
    )
    table.attrs.update({k: Frozen(v) if isinstance(v, list) else v for k, v in attrs.items()})
    return table


def resolve_label_set(labels: pd.Series, given: str | None, path: Path | str, column: str) -> tuple[pd.Series, str]:
    """Labels checked against the named set ``given`` (or the first named set that holds them all, else kept
    as given under ``custom``), and the set's name."""
    name = label_set(given).name if given else guess_label_set(labels)
    if name == CUSTOM:
        given_labels = labels.astype(str).str.strip()
        empty = int((given_labels.isna() | (given_labels == "")).sum())
        if empty:
            raise SkinLesionError(f"{path}: {empty} row(s) with an empty {column}; fix or remove those rows")
        return given_labels, name
    return check_labels(labels, label_set(name), path, column), name
