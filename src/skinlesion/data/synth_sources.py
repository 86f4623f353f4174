"""Small synthetic copies of the other sources' folder layouts (tests, demos): ISIC 2019, ISIC 2020, PAD-UFES-20,
a generic labels CSV and an ImageFolder, with the pictures of ``synth.draw_lesion`` (each label drawn as the
HAM10000 class it maps to) and the quirks the readers must handle: ISIC 2019's ``_downsampled`` ids, CRLF line
ends and one-hot floats; ISIC 2020's patients and one listed duplicate pair; PAD-UFES-20's upper-case values,
``UNK`` cells and PNGs split over ``images/imgs_part_*``; a CSV whose image column mixes ``a.jpg``, ``a`` and
``images/a.jpg``. ``data.sources.registry.read`` reads each (the CSV with ``CSV_OPTIONS``).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.data.sites import HAM_SITES, ISIC_GENERAL_TO_HAM, PAD_REGION_TO_HAM
from skinlesion.data.synth import MEAN_AGE, draw_lesion
from skinlesion.data.taxonomy import HAM7, ISIC2019, PAD_UFES_20, label_map
from skinlesion.errors import SkinLesionError
from skinlesion.fileio import write_bytes, write_text

LAYOUTS = ("isic2019", "isic2020", "pad-ufes-20", "csv", "imagefolder")
CSV_OPTIONS = {"labels_csv": "labels.csv", "image_col": "file", "label_col": "diagnosis", "lesion_col": "lesion",
               "patient_col": "patient", "age_col": "age", "sex_col": "sex", "site_col": "site"}  # fmt: skip
ISIC2020_LABELS = ("melanoma", "nevus", "seborrheic keratosis", "lentigo NOS", "unknown")


def _image(label: str, label_set: str, size: tuple[int, int], rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    ham = label if label_set == "ham7" else label_map(label_set, "ham7").get(label)
    image, _ = draw_lesion(ham or "nv", size, rng)
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _age(label: str, rng: np.random.Generator) -> float:
    ham = {"MEL": "mel", "melanoma": "mel", "NV": "nv", "nevus": "nv", "NEV": "nv"}.get(label, label.lower())
    return float(np.clip(round(rng.normal(MEAN_AGE.get(ham, 55), 14) / 5) * 5, 5, 85))


def _csv(path: Path, frame: pd.DataFrame, crlf: bool = False) -> None:
    write_text(path, frame.to_csv(index=False, lineterminator="\r\n" if crlf else "\n"))


def _isic2019(out: Path, n: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    gt, meta = [], []
    for k, code in enumerate(ISIC2019.codes[:-1]):
        for j in range(n):
            name = f"ISIC_91{k:02d}{j:03d}" + ("_downsampled" if j == 0 else "")
            write_bytes(out / "ISIC_2019_Training_Input" / f"{name}.jpg", _image(code, "isic2019", size, rng))
            gt.append({"image": name, **{c: "1.0" if c == code else "0.0" for c in ISIC2019.codes}})
            meta.append({"image": name, "age_approx": "" if j == 1 else int(_age(code, rng)),
                         "anatom_site_general": str(rng.choice([*ISIC_GENERAL_TO_HAM, ""])),
                         "lesion_id": "" if j == 0 else f"BCN_91{k:02d}{j // 2:03d}",
                         "sex": str(rng.choice(["male", "female", ""], p=[0.5, 0.45, 0.05]))})  # fmt: skip
    _csv(out / "ISIC_2019_Training_GroundTruth.csv", pd.DataFrame(gt), crlf=True)
    _csv(out / "ISIC_2019_Training_Metadata.csv", pd.DataFrame(meta), crlf=True)


def _isic2020(out: Path, n: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    rows = []
    for k, diagnosis in enumerate(ISIC2020_LABELS):
        for j in range(n):
            name = f"ISIC_92{k:02d}{j:03d}"
            write_bytes(out / "train" / f"{name}.jpg", _image(diagnosis, "isic2020", size, rng))
            rows.append({"image_name": name, "patient_id": f"IP_92{int(rng.integers(max(2, n))):05d}",
                         "sex": str(rng.choice(["male", "female"])), "age_approx": _age(diagnosis, rng),
                         "anatom_site_general_challenge": str(rng.choice(["torso", "head/neck", "upper extremity"])),
                         "diagnosis": diagnosis, "benign_malignant": "malignant" if k == 0 else "benign",
                         "target": int(k == 0)})  # fmt: skip
    copy = dict(rows[0], image_name="ISIC_9299999")  # a listed duplicate, as the challenge has 425
    shutil.copyfile(out / "train" / f"{rows[0]['image_name']}.jpg", out / "train" / "ISIC_9299999.jpg")
    _csv(out / "train.csv", pd.DataFrame([*rows, copy]))
    _csv(out / "ISIC_2020_Training_Duplicates.csv", pd.DataFrame([{"image_name_1": rows[0]["image_name"],
                                                                   "image_name_2": "ISIC_9299999"}]))  # fmt: skip


def _pad(out: Path, n: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    rows, image_no = [], 9300
    for k, code in enumerate(PAD_UFES_20.codes):
        for j in range(n):
            patient, lesion = 9000 + k * 100 + j // 2, 9000 + k * 100 + j
            name = f"PAT_{patient}_{lesion}_{image_no}.png"
            write_bytes(out / "images" / f"imgs_part_{1 + j % 2}" / name, _image(code, "pad-ufes-20", size, rng, "PNG"))
            rows.append({"patient_id": f"PAT_{patient}", "lesion_id": lesion, "smoke": "False", "drink": "UNK",
                         "age": int(_age(code, rng)), "gender": str(rng.choice(["FEMALE", "MALE", ""])),
                         "fitspatrick": str(rng.choice(["1.0", "2.0", "3.0", ""])),
                         "region": str(rng.choice([r.upper() for r in PAD_REGION_TO_HAM])), "diagnostic": code,
                         "itch": str(rng.choice(["True", "False", "UNK"])), "img_id": name,
                         "biopsed": str(code in ("BCC", "SCC", "MEL") or bool(rng.random() < 0.3))})  # fmt: skip
            image_no += 1
    _csv(out / "metadata.csv", pd.DataFrame(rows))


def _generic(out: Path, n: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    rows = []
    for k, code in enumerate(HAM7.codes):
        for j in range(n):
            stem = f"img_93{k:02d}{j:03d}"
            write_bytes(out / "images" / f"{stem}.jpg", _image(code, "ham7", size, rng))
            file = (f"{stem}.jpg", stem, f"images/{stem}.jpg")[j % 3]
            rows.append({"file": file, "diagnosis": code.upper(), "lesion": f"L{k}{j // 2}", "patient": f"P{k}",
                         "age": _age(code, rng), "sex": str(rng.choice(["M", "F", "unknown"])),
                         "site": str(rng.choice(HAM_SITES))})  # fmt: skip
    _csv(out / "labels.csv", pd.DataFrame(rows))


def _image_folder(out: Path, n: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    for k, code in enumerate(HAM7.codes):
        for j in range(n):
            write_bytes(out / code / f"img_94{k:02d}{j:03d}.jpg", _image(code, "ham7", size, rng))


_WRITERS: dict[str, Callable[[Path, int, tuple[int, int], np.random.Generator], None]] = {
    "isic2019": _isic2019, "isic2020": _isic2020, "pad-ufes-20": _pad, "csv": _generic, "imagefolder": _image_folder,
}  # fmt: skip


def write_layout(
    out: str | Path, layout: str, n_per_class: int = 3, size: tuple[int, int] = (64, 48), seed: int = 0
) -> Path:
    """Write a synthetic ``layout`` (one of ``LAYOUTS``) into ``out``: ``n_per_class`` images of each label
    (ISIC 2019: its 8 classes; ISIC 2020: melanoma, nevus, seborrheic keratosis, lentigo NOS, unknown; PAD-UFES-20:
    its 6; csv and imagefolder: the 7 HAM10000 classes)."""
    if layout not in _WRITERS:
        raise SkinLesionError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if n_per_class < 2:
        raise SkinLesionError(f"n_per_class must be at least 2, got {n_per_class}")
    if min(size) < 16:
        raise SkinLesionError(f"size must be at least 16x16, got {size[0]}x{size[1]}")
    out = Path(out)
    _WRITERS[layout](out, n_per_class, size, np.random.default_rng(seed))
    return out
