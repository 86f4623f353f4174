"""``skinlesion predict``: class probabilities for image files and folders (table, JSON or CSV on stdout).

Unreadable files are reported on stderr and skipped; the command fails only when no input
at all could be read. Progress goes to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from tqdm import tqdm

from skinlesion.data.clinical import FIELDS, clinical_table, lesion_ids, read_metadata_csv
from skinlesion.data.images import IMAGE_SUFFIXES
from skinlesion.decision import lesion_pooling
from skinlesion.device import retain_freed_memory
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import isic
from skinlesion.inference import selection
from skinlesion.inference.classifier import Classifier
from skinlesion.model import checkpoint


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


def json_rows(frame: pd.DataFrame, classes: Sequence[str], top_k: int, names: dict[str, str]) -> list[dict[str, Any]]:
    """The predictions of ``Classifier.predict_files`` as JSON objects (full class names, top-k with names)."""
    rows = []
    for r in frame.itertuples(index=False):
        r = r._asdict()
        probs = {c: float(r[f"p_{c}"]) for c in classes}
        order = sorted(classes, key=lambda c: -probs[c])[:top_k]
        row = {"image": r["image"], "prediction": r["prediction"], "prediction_name": r["prediction_name"],
               "probabilities": probs,
               "top_k": [{"class": c, "name": names[c], "probability": probs[c]}
                         for c in order]}  # fmt: skip
        if "lesion_id" in r:
            row["lesion_id"] = r["lesion_id"] if isinstance(r["lesion_id"], str) else None  # NaN is not JSON
        if "refer" in r:  # the run's safeguards (decision/safeguards.py)
            row.update(refer=bool(r["refer"]), refer_reason=r["refer_reason"],
                       prediction_set=r["prediction_set"].split(";") if isinstance(r["prediction_set"], str) else None,
                       out_of_distribution=bool(r["out_of_distribution"]),
                       ood_score=None if pd.isna(r["ood_score"]) else float(r["ood_score"]))  # fmt: skip
        rows.append(row)
    return rows


TABLE_WIDTH = 120  # the table fits a terminal this wide: short class codes, the image name shortened on the left


def format_table(frame: pd.DataFrame, classes: Sequence[str], width: int = TABLE_WIDTH) -> str:
    """image | one probability column per class | decision | top-k codes, within ``width`` columns."""
    cells = [f"{c[:6]:>6}" for c in classes]
    fixed = len(" ".join(cells)) + 2 + 2 + max(10, *(len(c) for c in classes)) + (8 if "refer" in frame else 0) + 2
    with_top = fixed + max(len("top-k"), *(len(t) for t in frame["top_k"]))
    show_top = with_top + 12 <= width  # room for at least 12 characters of image name
    room = width - (with_top if show_top else fixed)
    names = [shorten(i, room) for i in frame["image"]]
    name_w = max(len("image"), *(len(n) for n in names))
    pred_w = max(10, *(len(c) for c in classes)) + (8 if "refer" in frame else 0)
    head = f"{'image':<{name_w}}  {' '.join(cells)}  {'prediction':<{pred_w}}" + ("  top-k" if show_top else "")
    lines = [head.rstrip()]
    for name, r in zip(names, frame.itertuples(index=False), strict=True):
        r = r._asdict()
        probs = " ".join(f"{r[f'p_{c}']:6.3f}" for c in classes)
        top = f"  {r['top_k']}" if show_top else ""
        lines.append(f"{name:<{name_w}}  {probs}  {decision_cell(r):<{pred_w}}{top}".rstrip())
    if "refer" in frame and frame["refer"].fillna(False).astype(bool).any():
        lines.append("refer = refer to a dermatologist (the run's referral rule; --format json says why); "
                     "ood = out of distribution, no diagnosis")  # fmt: skip
    return "\n".join(lines)


def decision_cell(row: dict[str, Any]) -> str:
    """The decided class, or why there is none to act on: ``ood`` (out of distribution), ``refer (mel)``."""
    if row.get("out_of_distribution"):
        return "ood"
    return f"refer ({row['prediction']})" if row.get("refer") else str(row["prediction"])


def shorten(text: str, room: int) -> str:
    """``text`` cut on the left to ``room`` characters ('...' marks the cut); the file name end is kept."""
    return text if len(text) <= room else "..." + text[len(text) - max(1, room - 3):]


def write_csv(frame: pd.DataFrame, classes: Sequence[str], out: TextIO | None = None) -> None:
    guards = [c for c in ("refer", "refer_reason", "prediction_set", "out_of_distribution") if c in frame]
    writer = csv.writer(out or sys.stdout, lineterminator="\n")
    writer.writerow(["image", "prediction", "prediction_name", *(f"p_{c}" for c in classes), "top_k", *guards])
    for r in frame.itertuples(index=False):
        r = r._asdict()
        writer.writerow([r["image"], r["prediction"], r["prediction_name"], *(f"{r[f'p_{c}']:.6f}" for c in classes),
                         r["top_k"], *(r[g] for g in guards)])  # fmt: skip


def load_classifier(run_dir: str | Path, backend: str = "torch") -> Classifier:
    """The run's classifier on ``backend`` (auto: inference/selection.py), warning when the ONNX file asked for is
    older than best.pt."""
    classifier, choice = selection.load(run_dir, backend)
    for note in choice.notes:
        print(note, file=sys.stderr)
    return classifier


def main(args: argparse.Namespace) -> None:
    files, ignored = inputs(args.inputs)
    if args.isic_csv:
        check_isic_names(files)
    if len(files) > 1:
        retain_freed_memory()  # a batch job in its own process (the Python API leaves the caller's malloc alone)
    classifier = load_classifier(args.run_dir, args.backend).switched(
        args.tta_views, args.metadata_prior, args.operating_point, args.pool_lesions)  # fmt: skip
    chain = classifier.chain
    clinical, lesions = patient_inputs(args, files, classifier)
    frame = classifier.predict_files(files, args.batch_size, args.tta, clinical, lesions,
                                     top_k=min(args.top_k, len(chain.classes)), progress=len(files) > 1)  # fmt: skip
    read = frame[frame["error"].isna()].reset_index(drop=True)
    if read.empty and len(files) == 1:  # the one input's own reason is the error line
        raise SkinLesionError(frame["error"].iloc[0])
    for error in frame["error"].dropna():
        tqdm.write(f"skipped: {error}", file=sys.stderr)
    if read.empty:
        raise SkinLesionError(f"none of the {len(files)} input files could be read as an image (see above)")
    if args.isic_csv:
        probs = read[[f"p_{c}" for c in chain.classes]].to_numpy()
        path = isic.write_submission(args.isic_csv, [Path(i).stem for i in read["image"]],
                                     chain.decision_probabilities(probs, bool(args.tta)), chain.classes)  # fmt: skip
        print(f"wrote {path} (ISIC 2018 Task 3 submission, {len(read)} images)", file=sys.stderr)
    with_metadata = chain.images_with_metadata(clinical)
    pooled = lesion_pooling.shared(read["lesion_id"].tolist()) if lesions is not None else 0
    if args.format == "json":
        doc = json_document(args, classifier, frame, read, with_metadata, pooled)
        doc["skipped"] += [{"image": str(p), "error": "not a .jpg/.jpeg/.png file"} for p in ignored]
        print(json.dumps(doc, indent=2))
    elif args.format == "csv":
        write_csv(read, chain.classes)
    else:
        print(format_table(read, chain.classes))
    if len(read) < len(files):
        print(f"{len(files) - len(read)} of {len(files)} file(s) could not be read and were skipped", file=sys.stderr)
    if clinical is not None:
        print(f"metadata prior added for {with_metadata} of {len(files)} image(s)", file=sys.stderr)
    if lesions is not None:
        print(lesion_pooling.describe(read["lesion_id"].tolist()) if pooled else
              "lesion pooling: no two inputs share a lesion id", file=sys.stderr)  # fmt: skip


def inputs(items: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """The image files to predict (folders expanded, duplicates once) and the files skipped for their suffix."""
    files, ignored = expand_inputs(items)
    files = list(dict.fromkeys(files))  # a file named twice is predicted once
    if ignored:
        names = ", ".join(p.name for p in ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        print(f"skipped {len(ignored)} file(s) without a .jpg/.jpeg/.png suffix: {names}", file=sys.stderr)
    if not files:
        raise SkinLesionError("no image files found in the inputs; pass .jpg/.jpeg/.png files or folders holding them")
    return files, ignored


def check_isic_names(files: Sequence[Path]) -> None:
    """An ISIC submission is UTF-8 text whose ``image`` column is the file name stem: a name that is not UTF-8
    (bytes from another system's encoding) cannot be written there, so say so before scoring anything."""
    for f in files:
        try:
            f.stem.encode("utf-8")
        except UnicodeEncodeError:
            name = f.name.encode("utf-8", "backslashreplace").decode()
            raise SkinLesionError(f"--isic-csv: the file name {name} is not UTF-8, and an ISIC file is UTF-8 text; "
                                  "rename the file") from None  # fmt: skip


def patient_inputs(args: argparse.Namespace, files: list[Path], classifier: Classifier
                   ) -> tuple[pd.DataFrame | None, list[str | None] | None]:  # fmt: skip
    """Per-file age / sex / site for the metadata prior, and lesion ids for pooling, from --metadata / --age /
    --sex / --site; one line when the run cannot use what was given."""
    chain = classifier.chain
    prior = chain.metadata_prior
    csv = read_metadata_csv(args.metadata) if args.metadata is not None else None
    lesions = lesion_ids(files, csv, bool(args.pool_lesions), args.metadata) if chain.pool_lesions else None
    given = [f"--{k}" for k in ("metadata", "age", "sex", "site") if getattr(args, k, None) is not None]
    if lesions is not None and (prior is None or not set(FIELDS) & set(csv)):
        given.remove("--metadata")  # it was given for the lesion ids alone
    if not given or not args.metadata_prior:
        return None, lesions
    if prior is None:
        name = getattr(classifier.backend, "path", None)
        if name is not None and "metadata_prior" in checkpoint.read(args.run_dir):
            raise SkinLesionError(f"{name.name} was exported before best.pt got its metadata prior; re-run `skinlesion "
                                  f"export --run-dir {args.run_dir}`")  # fmt: skip
        raise SkinLesionError(f"{'/'.join(given)} need a run with a metadata prior; run `skinlesion fit-metadata-prior "
                              f"--run-dir {args.run_dir}` (and `skinlesion export` again for --backend onnx)")
    csv_used = csv if "--metadata" in given else None
    if csv_used is not None and csv_used.attrs.get("ages_refused"):
        print(f"--metadata {args.metadata}: {csv_used.attrs['ages_refused']} age(s) outside 0-120 or not a number "
              "taken as unknown", file=sys.stderr)  # fmt: skip
    sites = prior["categories"]["localization"]
    return clinical_table(files, csv_used, args.age, args.sex, args.site, sites, args.metadata), lesions


def json_document(args: argparse.Namespace, classifier: Classifier, frame: pd.DataFrame, read: pd.DataFrame,
                  with_metadata: int, pooled: int) -> dict[str, Any]:  # fmt: skip
    chain = classifier.chain
    skipped = [{"image": r.image, "error": r.error} for r in frame[frame["error"].notna()].itertuples()]
    return {
        "run_dir": str(args.run_dir),
        "backend": classifier.backend.name,
        "tta": bool(args.tta),
        "tta_views": chain.tta_views if args.tta else 1,
        "temperature": chain.temperature,
        "metadata_prior": {"applied": with_metadata > 0, "images_with_metadata": with_metadata},
        # Images that share a lesion_id were scored together.
        "lesion_pooling": {"applied": pooled > 0, "images_pooled": pooled},
        # "prediction" honours these minimum sensitivities; null = the argmax.
        "operating_point": chain.operating_point,
        "classes": list(chain.classes),
        # Beside each decision: refer, the conformal set, out of distribution (null: the run has no such step).
        "safeguards": classifier.safeguards.summary(),
        "predictions": json_rows(read, chain.classes, min(args.top_k, len(chain.classes)), classifier.class_names),
        "class_names": classifier.class_names,
        "skipped": skipped,
    }
