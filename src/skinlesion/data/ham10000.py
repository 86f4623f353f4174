"""Finding and reading HAM10000 folders: layout detection, the typed metadata table, file validation.

Layouts recognised (folder and file names in any letter case):

* Kaggle: ``HAM10000_metadata.csv`` + ``HAM10000_images_part_1/`` + ``HAM10000_images_part_2/``
  (the lower-case copies Kaggle also ships are read too; an image found twice is used once).
* One folder: ``HAM10000_metadata.csv`` + ``images/``, or the images right beside the CSV.
* ISIC 2018 Task 3: one-hot ``ISIC2018_Task3_<Part>_GroundTruth.csv`` + ``ISIC2018_Task3_<Part>_Input/``
  (either at the top or one folder down, as the official zips unpack); lesion ids come from a
  ``*LesionGroupings.csv`` when one is present, else each image is its own lesion.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from skinlesion.classes import CLASSES
from skinlesion.data.images import IMAGE_SUFFIXES, ImageTooLargeError, open_rgb
from skinlesion.errors import SkinLesionError

COLUMNS = ("image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization", "path")
EXPECTED_LAYOUTS = (
    "expected HAM10000_metadata.csv + HAM10000_images_part_1/ + HAM10000_images_part_2/ (Kaggle), "
    "HAM10000_metadata.csv + images/ (one folder), or ISIC2018_Task3_*_GroundTruth.csv + "
    "ISIC2018_Task3_*_Input/ (ISIC 2018); or pass --metadata and --images"
)
CHECKS = ("none", "quick", "full")
LIST_MAX = 10  # problem lists show this many names, then a count

_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_ISIC_CODES = {c.upper(): c for c in CLASSES}


@dataclass
class Layout:
    """Where the metadata and the images of one data folder are."""

    kind: str  # kaggle | folder | isic2018 | explicit
    metadata: Path
    image_dirs: list[Path]
    lesion_groupings: Path | None = None
    root: Path = field(default=Path("."))


def sample_dir() -> Path:
    """The bundled real sample (HAM10000 subset, CC BY-NC-SA 4.0; see its NOTICE.md)."""
    return Path(__file__).resolve().parent / "sample"


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _match(folder: Path, pattern: str, want_dir: bool) -> list[Path]:
    rx = re.compile(pattern, re.IGNORECASE)
    return [p for p in _children(folder) if rx.fullmatch(p.name) and p.is_dir() == want_dir]


def _has_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file() for e in it)


def _isic_csvs(root: Path) -> list[Path]:
    found = _match(root, r"ISIC2018_Task3_\w+_GroundTruth\.csv", want_dir=False)
    for sub in _match(root, r"ISIC2018_Task3_\w+_GroundTruth", want_dir=True):
        found += _match(sub, r"ISIC2018_Task3_\w+_GroundTruth\.csv", want_dir=False)
    return found


def _image_dirs_beside(root: Path, metadata: Path) -> tuple[str, list[Path]]:
    kaggle = _match(root, r"HAM10000_images_part_\d+", want_dir=True)
    if kaggle:
        return "kaggle", kaggle
    part = re.match(r"ISIC2018_Task3_(\w+?)_GroundTruth", metadata.stem, re.IGNORECASE)
    if part:
        inputs = _match(root, rf"ISIC2018_Task3_{part.group(1)}_Input", want_dir=True)
        if inputs:
            return "isic2018", inputs
    single = _match(root, r"images?", want_dir=True)
    if single:
        return "folder", single
    inputs = _match(root, r"ISIC2018_Task3_\w+_Input", want_dir=True)
    if inputs:
        return "isic2018", inputs
    if _has_images(root):
        return "folder", [root]
    return "", []


def find_layout(
    data_dir: str | Path | None = None, metadata: str | Path | None = None, images: str | Path | None = None
) -> Layout:
    """Locate the metadata CSV and image folder(s); raise SkinLesionError naming the expected layouts."""
    if data_dir is None and metadata is None:
        data_dir = sample_dir()
    root = Path(data_dir if data_dir is not None else Path(metadata).parent).expanduser().resolve()
    if not root.is_dir():
        raise SkinLesionError(f"data folder {root} does not exist; {EXPECTED_LAYOUTS}")

    if metadata is not None:
        meta = Path(metadata).expanduser().resolve()
        if not meta.is_file():
            raise SkinLesionError(f"metadata file {meta} does not exist; pass the HAM10000 metadata CSV to --metadata")
    else:
        candidates = _match(root, r"HAM10000_metadata(\.csv|\.tab)?", want_dir=False) or _isic_csvs(root)
        if not candidates:
            raise SkinLesionError(f"no metadata CSV in {root}; {EXPECTED_LAYOUTS}")
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise SkinLesionError(f"several metadata CSVs in {root} ({names}); choose one with --metadata")
        meta = candidates[0]

    if images is not None:
        img_dir = Path(images).expanduser().resolve()
        if not img_dir.is_dir():
            raise SkinLesionError(f"image folder {img_dir} does not exist; pass the folder of .jpg/.png to --images")
        kind, dirs = "explicit", [img_dir]
    else:
        kind, dirs = _image_dirs_beside(root, meta)
        if not dirs and meta.parent != root:
            kind, dirs = _image_dirs_beside(meta.parent, meta)
        if not dirs:
            raise SkinLesionError(f"no image folder found beside {meta.name} in {root}; {EXPECTED_LAYOUTS}")
    groupings = None
    for folder in dict.fromkeys([meta.parent, root]):
        found = _match(folder, r"ISIC2018_Task3_\w+_LesionGroupings\.csv", want_dir=False)
        if found:
            groupings = found[0]
            break
    return Layout(kind=kind, metadata=meta, image_dirs=dirs, lesion_groupings=groupings, root=root)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        # Harvard Dataverse serves the metadata as tab-separated HAM10000_metadata.tab.
        sep = "\t" if path.suffix.lower() == ".tab" else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SkinLesionError(f"cannot read {path} as CSV ({e}); check the file") from e


def _from_one_hot(raw: pd.DataFrame, path: Path, groupings: Path | None) -> pd.DataFrame:
    codes = [c for c in raw.columns if c.upper() in _ISIC_CODES]
    onehot = raw[codes].apply(pd.to_numeric, errors="coerce")
    if onehot.isna().any().any() or not np.allclose(onehot.sum(axis=1), 1.0):
        raise SkinLesionError(f"{path}: every row must have exactly one 1.0 among {', '.join(codes)}")
    frame = pd.DataFrame(
        {
            "image_id": raw["image"],
            "dx": [_ISIC_CODES[codes[i].upper()] for i in onehot.to_numpy().argmax(axis=1)],
        }
    )
    frame["lesion_id"] = frame["image_id"]  # unknown: each image its own lesion
    frame["dx_type"] = "unknown"
    if groupings is not None:
        groups = _read_csv(groupings)
        if {"image", "lesion_id"} <= set(groups.columns):
            by_image = groups.set_index("image")
            known = frame["image_id"].isin(by_image.index)
            frame.loc[known, "lesion_id"] = by_image.loc[frame.loc[known, "image_id"], "lesion_id"].to_numpy()
            if "diagnosis_confirm_type" in by_image.columns:
                frame.loc[known, "dx_type"] = by_image.loc[
                    frame.loc[known, "image_id"], "diagnosis_confirm_type"
                ].to_numpy()
    return frame


def read_metadata(path: str | Path, lesion_groupings: str | Path | None = None) -> pd.DataFrame:
    """Parse a HAM10000 metadata CSV or an ISIC 2018 one-hot ground truth into the typed table (no paths).

    Raises SkinLesionError for missing columns and for dx values outside the 7 classes (listed).
    """
    path = Path(path)
    raw = _read_csv(path)
    raw.columns = [c.strip() for c in raw.columns]
    if "image" in raw.columns and sum(c.upper() in _ISIC_CODES for c in raw.columns) == len(CLASSES):
        frame = _from_one_hot(raw, path, Path(lesion_groupings) if lesion_groupings else None)
    else:
        missing = [c for c in ("image_id", "dx") if c not in raw.columns]
        if missing:
            raise SkinLesionError(
                f"{path}: missing column(s) {', '.join(missing)}; a HAM10000 metadata CSV has "
                "lesion_id,image_id,dx,dx_type,age,sex,localization"
            )
        frame = raw.copy()
        if "lesion_id" not in frame.columns:
            frame["lesion_id"] = frame["image_id"]
    for col, default in (("dx_type", "unknown"), ("age", ""), ("sex", "unknown"), ("localization", "unknown")):
        if col not in frame.columns:
            frame[col] = default
    for col in ("image_id", "lesion_id", "dx", "dx_type", "sex", "localization"):
        frame[col] = frame[col].astype(str).str.strip()
    frame["dx"] = frame["dx"].str.lower()
    frame.loc[frame["lesion_id"] == "", "lesion_id"] = frame["image_id"]
    frame["age"] = pd.to_numeric(frame["age"].replace("", None), errors="coerce").astype(float)

    unknown = frame.loc[~frame["dx"].isin(CLASSES), "dx"]
    if len(unknown):
        counts = unknown.value_counts()
        listed = ", ".join(f"{v!r} ({n} row{'s' if n > 1 else ''})" for v, n in counts.head(LIST_MAX).items())
        more = f" and {len(counts) - LIST_MAX} more" if len(counts) > LIST_MAX else ""
        raise SkinLesionError(
            f"{path}: {len(unknown)} row(s) with unknown dx: {listed}{more}; "
            f"allowed: {', '.join(CLASSES)} - fix or remove those rows"
        )
    return frame[list(COLUMNS[:-1])].reset_index(drop=True)


def index_images(image_dirs: Iterable[Path]) -> tuple[dict[str, Path], list[str]]:
    """Map image id (file stem) -> path over the folders; also the ids found more than once (first kept)."""
    found: dict[str, Path] = {}
    repeated: list[str] = []
    folder_names: set[str] = set()
    for folder in image_dirs:
        # Kaggle ships lower-case copies of its image folders: ids repeated there are expected.
        is_copy = folder.name.lower() in folder_names
        folder_names.add(folder.name.lower())
        with os.scandir(folder) as it:
            entries = sorted((e.name, e.path) for e in it if e.name.lower().endswith(IMAGE_SUFFIXES))
        for name, path in entries:
            stem = os.path.splitext(name)[0]
            if stem not in found:
                found[stem] = Path(path)
            elif not is_copy:
                repeated.append(stem)
    return found, repeated


def quick_check(path: str | Path) -> str | None:
    """Cheap check: the file exists, is not empty and starts like a JPEG or PNG. Returns a reason or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if not head:
        return "empty file"
    if not head.startswith(_MAGIC):
        return "not a JPEG or PNG"
    return None


def full_check(path: str | Path) -> str | None:
    """Decode the whole image (catches truncated and corrupt files, and images over the decompression limit).
    Returns a reason or None."""
    reason = quick_check(path)
    if reason:
        return reason
    try:
        open_rgb(path)  # the decode training does, with the one decompression limit
    except ImageTooLargeError as e:
        return f"too large ({str(e).removeprefix(f'{path}: ')})"
    except SkinLesionError as e:
        return f"corrupt ({str(e).removeprefix(f'{path}: ')})"
    return None


def check_files(paths: list[str], check: str = "quick", progress: bool = False) -> list[str | None]:
    """Run ``quick_check`` or ``full_check`` over ``paths`` (threads: PIL decodes release the GIL)."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}")
    if check == "none":
        return [None] * len(paths)
    fn = full_check if check == "full" else quick_check
    workers = min(8, os.cpu_count() or 1) if check == "full" else 1
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(fn, paths, chunksize=64)
        return list(tqdm(results, total=len(paths), desc="checking images", unit="img", disable=not progress))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:LIST_MAX])
    return shown + (f" ... and {len(items) - LIST_MAX} more" if len(items) > LIST_MAX else "")


def load_table(
    data_dir: str | Path | None = None,
    metadata: str | Path | None = None,
    images: str | Path | None = None,
    allow_missing: bool = False,
    check: str = "quick",
    progress: bool = False,
) -> pd.DataFrame:
    """The validated table: image_id, lesion_id, dx, dx_type, age (float, NaN if empty), sex, localization, path.

    ``data_dir`` None means the bundled sample. ``check``: "quick" (default) = every image exists, is
    non-empty and starts with JPEG/PNG magic bytes; "full" = decode every image (what ``prepare`` does);
    "none" = only resolve paths. Missing / bad files raise SkinLesionError listing them, unless
    ``allow_missing``: then the check is "full" (whatever ``check`` says: the files dropped are the ones
    ``prepare`` drops) and they are dropped and listed in ``table.attrs["dropped"]`` (dicts with image_id,
    path, reason).
    ``table.attrs`` also holds ``layout``, ``data_dir``, ``metadata``, ``image_dirs``, ``duplicate_rows``,
    ``duplicate_files`` (ids found in more than one image file) and ``extra_files`` (images with no row).
    """
    if allow_missing and check != "none":
        check = "full"
    layout = find_layout(data_dir, metadata, images)
    frame = read_metadata(layout.metadata, layout.lesion_groupings)

    dup_mask = frame["image_id"].duplicated(keep="first")
    duplicate_rows = sorted(frame.loc[dup_mask, "image_id"].unique())
    if duplicate_rows:
        clash = frame[frame["image_id"].isin(duplicate_rows)].groupby("image_id")["dx"].nunique()
        clash = sorted(clash[clash > 1].index)
        if clash:
            raise SkinLesionError(
                f"{layout.metadata}: image id(s) listed twice with different dx: {_listing(clash)}; "
                "keep one row per image"
            )
        frame = frame[~dup_mask].reset_index(drop=True)

    files, duplicate_files = index_images(layout.image_dirs)
    frame["path"] = [str(files[i]) if i in files else "" for i in frame["image_id"]]
    checked = check_files(frame["path"].tolist(), check, progress)
    reasons = ["missing" if not p else r for p, r in zip(frame["path"], checked, strict=True)]
    bad = [(i, r) for i, r in zip(frame["image_id"], reasons, strict=True) if r]
    if bad and not allow_missing:
        n_missing = sum(r == "missing" for _, r in bad)
        kinds = f"{n_missing} missing, {len(bad) - n_missing} unreadable"
        listed = _listing([f"{i} ({r})" for i, r in bad])
        raise SkinLesionError(
            f"{len(bad)} image(s) listed in {layout.metadata.name} cannot be used ({kinds}): {listed}; "
            "restore them, or pass --allow-missing to drop them"
        )
    keep = np.array([r is None for r in reasons], dtype=bool)
    # Plain lists, not DataFrames: pandas compares and deep-copies attrs on every operation.
    dropped = [
        {"image_id": i, "path": p, "reason": r}
        for i, p, r in zip(frame["image_id"], frame["path"], reasons, strict=True)
        if r
    ]
    table = frame.loc[keep].reset_index(drop=True)
    if table.empty:
        raise SkinLesionError(f"no usable images for {layout.metadata}; {EXPECTED_LAYOUTS}")
    listed_ids = set(frame["image_id"])
    table.attrs.update(
        layout=layout.kind,
        data_dir=str(layout.root),
        metadata=str(layout.metadata),
        image_dirs=[str(d) for d in layout.image_dirs],
        dropped=dropped,
        duplicate_rows=duplicate_rows,
        duplicate_files=sorted(set(duplicate_files)),
        extra_files=sorted(set(files) - listed_ids),
        check=check,
    )
    return table
