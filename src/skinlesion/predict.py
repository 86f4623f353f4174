"""``skinlesion predict``: class probabilities for image files and folders (table, JSON or CSV on stdout).

Unreadable files are reported on stderr and skipped; the command fails only when no input
at all could be read. Progress goes to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from skinlesion import lesion_pooling, metadata_prior
from skinlesion.classes import FULL_NAMES
from skinlesion.data.images import IMAGE_SUFFIXES, open_rgb
from skinlesion.errors import SkinLesionError


class ProbabilityModel(Protocol):
    classes: list[str]
    operating_point: dict | None
    img_size: int
    tta_views: int
    metadata_prior: dict | None
    pool_lesions: bool

    @property
    def temperature(self) -> float: ...

    def predict_images(
        self, images: Sequence[Image.Image], tta: bool = False, offset: np.ndarray | None = None
    ) -> np.ndarray: ...

    def decide(self, probs: np.ndarray, tta: bool = False) -> np.ndarray: ...


def load_predictor(run_dir: str | Path, backend: str = "torch") -> ProbabilityModel:
    """The torch (best.pt) or ONNX Runtime (model.onnx) predictor of a run folder."""
    run_dir = Path(run_dir)
    if backend == "onnx":
        from skinlesion.onnx_backend import OnnxPredictor

        predictor = OnnxPredictor(run_dir)
        if predictor.is_stale(run_dir / "best.pt"):
            print(
                f"warning: {predictor.path} was exported from an older best.pt (retrained or recalibrated since); "
                f"re-run `skinlesion export --run-dir {run_dir}`",
                file=sys.stderr,
            )
        return predictor
    if backend == "torch":
        from skinlesion.inference import Predictor

        return Predictor(run_dir)
    raise SkinLesionError(f"unknown backend {backend!r}; choose torch or onnx")


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(images to try, files skipped for their suffix). Folders give their .jpg/.jpeg/.png files, sorted."""
    files: list[Path] = []
    ignored: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(p for p in path.iterdir() if p.is_file()):
                (files if child.suffix.lower() in IMAGE_SUFFIXES else ignored).append(child)
        else:
            files.append(path)  # explicit files are tried whatever their suffix; missing ones are reported
    return files, ignored


def decoded_batches(
    files: Sequence[Path], batch_size: int, report: list[dict[str, str]]
) -> Iterator[tuple[list[Path], list[Image.Image]]]:
    """Batches of successfully decoded images; failures are appended to ``report`` and printed."""
    paths: list[Path] = []
    images: list[Image.Image] = []
    for path in files:
        try:
            images.append(open_rgb(path))
            paths.append(path)
        except SkinLesionError as e:
            report.append({"image": str(path), "error": str(e)})
            tqdm.write(f"skipped: {e}", file=sys.stderr)
        if len(images) == batch_size:
            yield paths, images
            paths, images = [], []
    if images:
        yield paths, images


def result_row(path: Path, probs: np.ndarray, classes: Sequence[str], top_k: int, decided: int) -> dict[str, Any]:
    """``decided``: the predicted class index (the argmax, or the operating point's decision)."""
    order = np.argsort(-probs, kind="stable")
    best = classes[decided]
    return {
        "image": str(path),
        "prediction": best,
        "prediction_name": FULL_NAMES.get(best, best),
        "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
        "top_k": [
            {"class": classes[i], "name": FULL_NAMES.get(classes[i], classes[i]), "probability": float(probs[i])}
            for i in order[:top_k]
        ],
    }


SEXES = ("male", "female")


def read_metadata_csv(csv_path: str) -> pd.DataFrame:
    """The --metadata CSV, one row per image_id (the first where an id repeats)."""
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
    return given.drop_duplicates("image_id")


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
        fields = [c for c in metadata_prior.FIELDS if c in given]
        if not fields:
            pool = "; for its lesion ids alone add --pool-lesions" if "lesion_id" in given else ""
            raise SkinLesionError(
                f"--metadata {csv_path} needs at least one of {', '.join(metadata_prior.FIELDS)} for the metadata "
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


def predict_files(
    predictor: ProbabilityModel,
    files: Sequence[Path],
    batch_size: int = 32,
    tta: bool = False,
    top_k: int = 3,
    offsets: np.ndarray | None = None,
    lesions: Sequence[str | None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``offsets`` (row i for files[i]): the metadata prior's, added to the tempered logits; ``lesions`` (row i
    for files[i]): lesion ids whose images are scored together (lesion_pooling.py)."""
    offset_of = {} if offsets is None else {str(f): offsets[i] for i, f in enumerate(files)}
    read: list[Path] = []
    chunks: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(files), desc="predict", unit="img", file=sys.stderr, disable=len(files) < 2) as bar:
        for paths, images in decoded_batches(files, batch_size, skipped):
            offset = np.stack([offset_of[str(p)] for p in paths]) if offset_of else None
            chunks.append(predictor.predict_images(images, tta=tta, offset=offset))
            read += paths
            bar.update(len(read) + len(skipped) - bar.n)
        bar.update(len(files) - bar.n)  # failures after the last full batch
    if not read:
        return [], skipped
    probs = np.concatenate(chunks)
    if lesions is not None:  # after every image is read: a lesion's images may sit in different batches
        lesion_of = {str(f): lesions[i] for i, f in enumerate(files)}
        probs = lesion_pooling.pool(probs, [lesion_of[str(p)] for p in read]).astype(np.float32)
    decided = predictor.decide(probs, tta)
    rows = [result_row(p, pr, predictor.classes, top_k, k) for p, pr, k in zip(read, probs, decided, strict=True)]
    if lesions is not None:
        for row, path in zip(rows, read, strict=True):
            row["lesion_id"] = lesion_of[str(path)]
    return rows, skipped


def format_table(rows: list[dict[str, Any]], classes: Sequence[str]) -> str:
    width = max([len("image"), *(len(r["image"]) for r in rows)])
    header = f"{'image':<{width}}  " + " ".join(f"{c:>6}" for c in classes) + "  prediction  top-k"
    lines = [header]
    for r in rows:
        probs = " ".join(f"{r['probabilities'][c]:6.3f}" for c in classes)
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"])
        lines.append(f"{r['image']:<{width}}  {probs}  {r['prediction']} ({r['prediction_name']})  [{top}]")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], classes: Sequence[str], out: TextIO | None = None) -> None:
    writer = csv.writer(out or sys.stdout, lineterminator="\n")
    writer.writerow(["image", "prediction", "prediction_name", *(f"p_{c}" for c in classes), "top_k"])
    for r in rows:
        writer.writerow(
            [
                r["image"],
                r["prediction"],
                r["prediction_name"],
                *(f"{r['probabilities'][c]:.6f}" for c in classes),
                ";".join(t["class"] for t in r["top_k"]),
            ]
        )


def main(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise SkinLesionError("--top-k must be at least 1")
    if args.batch_size < 1:
        raise SkinLesionError("--batch-size must be at least 1")
    files, ignored = expand_inputs(args.inputs)
    files = list(dict.fromkeys(files))  # a file named twice is predicted once
    if ignored:
        names = ", ".join(p.name for p in ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        print(f"skipped {len(ignored)} file(s) without a .jpg/.jpeg/.png suffix: {names}", file=sys.stderr)
    if not files:
        raise SkinLesionError("no image files found in the inputs; pass .jpg/.jpeg/.png files or folders holding them")
    predictor = load_predictor(args.run_dir, args.backend)
    if getattr(args, "tta_views", None):
        predictor.tta_views = args.tta_views
    top_k = min(args.top_k, len(predictor.classes))
    prior = predictor.metadata_prior if getattr(args, "metadata_prior", True) else None
    if not getattr(args, "operating_point", True):
        predictor.operating_point = None
    asked = getattr(args, "pool_lesions", None)
    pool = predictor.pool_lesions if asked is None else asked
    csv = read_metadata_csv(args.metadata) if args.metadata is not None else None
    lesions = lesion_ids(files, csv, bool(asked), args.metadata) if pool else None
    given = [f"--{k}" for k in ("metadata", "age", "sex", "site") if getattr(args, k, None) is not None]
    if lesions is not None and (prior is None or not set(metadata_prior.FIELDS) & set(csv)):
        given.remove("--metadata")  # it was given for the lesion ids alone
    clinical = None
    if given and getattr(args, "metadata_prior", True):
        if prior is None:
            from skinlesion import checkpoint

            if args.backend == "onnx" and "metadata_prior" in checkpoint.read(args.run_dir):
                raise SkinLesionError(
                    f"model.onnx was exported before best.pt got its metadata prior; re-run `skinlesion export "
                    f"--run-dir {args.run_dir}`"
                )
            raise SkinLesionError(
                f"{'/'.join(given)} need a run with a metadata prior; run `skinlesion fit-metadata-prior --run-dir "
                f"{args.run_dir}` (and `skinlesion export` again for --backend onnx)"
            )
        sites = prior["categories"]["localization"]
        csv_used = csv if "--metadata" in given else None
        clinical = clinical_table(files, csv_used, args.age, args.sex, args.site, sites, args.metadata)
    offsets = metadata_prior.offsets(prior, clinical) if clinical is not None else None
    with_metadata = int(metadata_prior.known(clinical, prior).sum()) if clinical is not None else 0
    rows, skipped = predict_files(predictor, files, args.batch_size, args.tta, top_k, offsets, lesions)
    pooled = lesion_pooling.shared([r["lesion_id"] for r in rows]) if lesions is not None else 0
    if not rows:
        raise SkinLesionError(f"none of the {len(files)} input file(s) could be read as an image")
    if args.format == "json":
        doc = {
            "run_dir": str(args.run_dir),
            "backend": args.backend,
            "tta": bool(args.tta),
            "tta_views": predictor.tta_views if args.tta else 1,
            "temperature": predictor.temperature,
            "metadata_prior": {"applied": with_metadata > 0, "images_with_metadata": with_metadata},
            # Images that share a lesion_id were scored together (lesion_pooling.py).
            "lesion_pooling": {"applied": pooled > 0, "images_pooled": pooled},
            # "prediction" honours these minimum sensitivities (operating_point.py); null = the argmax.
            "operating_point": predictor.operating_point,
            "classes": list(predictor.classes),
            "predictions": rows,
            "skipped": skipped + [{"image": str(p), "error": "not a .jpg/.jpeg/.png file"} for p in ignored],
        }
        print(json.dumps(doc, indent=2))
    elif args.format == "csv":
        write_csv(rows, predictor.classes)
    else:
        print(format_table(rows, predictor.classes))
    if skipped:
        print(f"{len(skipped)} of {len(files)} file(s) could not be read and were skipped", file=sys.stderr)
    if clinical is not None:
        print(f"metadata prior added for {with_metadata} of {len(files)} image(s)", file=sys.stderr)
    if lesions is not None:
        print(lesion_pooling.describe([r["lesion_id"] for r in rows]) if pooled else
              "lesion pooling: no two inputs share a lesion id", file=sys.stderr)  # fmt: skip
