"""``skinlesion predict``: class probabilities for image files and folders (table, JSON or CSV on stdout).

Unreadable files are reported on stderr and skipped; the command fails only when no input
at all could be read. Progress goes to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from skinlesion.classes import FULL_NAMES
from skinlesion.data.clinical import FIELDS, clinical_table, lesion_ids, read_metadata_csv
from skinlesion.data.images import IMAGE_SUFFIXES
from skinlesion.decision import lesion_pooling
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import isic
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


def decoded_batches(
    files: Sequence[Path], batch_size: int, report: list[dict[str, str]], decode: Callable[[Path], Image.Image]
) -> Iterator[tuple[list[Path], list[Image.Image]]]:
    """Batches of images ``decode`` (the classifier's) read; failures are appended to ``report`` and printed."""
    paths: list[Path] = []
    images: list[Image.Image] = []
    for path in files:
        try:
            images.append(decode(path))
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


def predict_files(
    classifier: Classifier,
    files: Sequence[Path],
    batch_size: int = 32,
    tta: bool = False,
    top_k: int = 3,
    clinical: pd.DataFrame | None = None,
    lesions: Sequence[str | None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``clinical`` (row i for files[i]): age, sex, site for the metadata prior; ``lesions`` (row i for files[i]):
    lesion ids whose images the chain scores together (after every batch: a lesion may span batches)."""
    read: list[Path] = []
    chunks: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(files), desc="predict", unit="img", file=sys.stderr, disable=len(files) < 2) as bar:
        for paths, images in decoded_batches(files, batch_size, skipped, classifier.decode):
            chunks.append(classifier.view_logits(images, tta))
            read += paths
            if len(read) + len(skipped) < len(files):
                bar.update(len(read) + len(skipped) - bar.n)
        bar.n = len(files)  # no redraw here: closing the bar draws its final line, once
    if not read:
        return [], skipped
    index = {str(f): i for i, f in enumerate(files)}
    rows_read = [index[str(p)] for p in read]
    table = None if clinical is None else clinical.iloc[rows_read].reset_index(drop=True)
    ids = None if lesions is None else [lesions[i] for i in rows_read]
    chain = classifier.chain
    decisions = chain(np.concatenate(chunks, axis=1), chain.offsets(table), ids)
    rows = [result_row(p, pr, chain.classes, top_k, k)
            for p, pr, k in zip(read, decisions.probabilities, decisions.labels, strict=True)]  # fmt: skip
    if ids is not None:
        for row, lesion in zip(rows, ids, strict=True):
            row["lesion_id"] = lesion
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


def load_classifier(run_dir: str | Path, backend: str = "torch") -> Classifier:
    """The run's classifier on ``backend``, warning when model.onnx is older than best.pt."""
    classifier = Classifier.load(run_dir, backend)
    if backend == "onnx" and classifier.backend.is_stale(Path(run_dir) / "best.pt"):
        print(
            f"warning: {classifier.backend.path} was exported from an older best.pt (retrained or recalibrated "
            f"since); re-run `skinlesion export --run-dir {run_dir}`",
            file=sys.stderr,
        )
    return classifier


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
    classifier = load_classifier(args.run_dir, args.backend)
    asked = getattr(args, "pool_lesions", None)
    switches = (getattr(args, "tta_views", None), getattr(args, "metadata_prior", True),
                getattr(args, "operating_point", True), asked)  # fmt: skip
    classifier = classifier.switched(*switches)
    chain = classifier.chain
    top_k = min(args.top_k, len(chain.classes))
    prior = chain.metadata_prior
    csv = read_metadata_csv(args.metadata) if args.metadata is not None else None
    lesions = lesion_ids(files, csv, bool(asked), args.metadata) if chain.pool_lesions else None
    given = [f"--{k}" for k in ("metadata", "age", "sex", "site") if getattr(args, k, None) is not None]
    if lesions is not None and (prior is None or not set(FIELDS) & set(csv)):
        given.remove("--metadata")  # it was given for the lesion ids alone
    clinical = None
    if given and getattr(args, "metadata_prior", True):
        if prior is None:
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
    with_metadata = chain.images_with_metadata(clinical)
    rows, skipped = predict_files(classifier, files, args.batch_size, args.tta, top_k, clinical, lesions)
    pooled = lesion_pooling.shared([r["lesion_id"] for r in rows]) if lesions is not None else 0
    if not rows:
        raise SkinLesionError(f"none of the {len(files)} input file(s) could be read as an image")
    if args.isic_csv:
        probs = np.array([[r["probabilities"][c] for c in chain.classes] for r in rows])
        path = isic.write_submission(args.isic_csv, [Path(r["image"]).stem for r in rows],
                                     chain.decision_probabilities(probs, bool(args.tta)), chain.classes)  # fmt: skip
        print(f"wrote {path} (ISIC 2018 Task 3 submission, {len(rows)} images)", file=sys.stderr)
    if args.format == "json":
        doc = {
            "run_dir": str(args.run_dir),
            "backend": args.backend,
            "tta": bool(args.tta),
            "tta_views": chain.tta_views if args.tta else 1,
            "temperature": chain.temperature,
            "metadata_prior": {"applied": with_metadata > 0, "images_with_metadata": with_metadata},
            # Images that share a lesion_id were scored together.
            "lesion_pooling": {"applied": pooled > 0, "images_pooled": pooled},
            # "prediction" honours these minimum sensitivities; null = the argmax.
            "operating_point": chain.operating_point,
            "classes": list(chain.classes),
            "predictions": rows,
            "skipped": skipped + [{"image": str(p), "error": "not a .jpg/.jpeg/.png file"} for p in ignored],
        }
        print(json.dumps(doc, indent=2))
    elif args.format == "csv":
        write_csv(rows, chain.classes)
    else:
        print(format_table(rows, chain.classes))
    if skipped:
        print(f"{len(skipped)} of {len(files)} file(s) could not be read and were skipped", file=sys.stderr)
    if clinical is not None:
        print(f"metadata prior added for {with_metadata} of {len(files)} image(s)", file=sys.stderr)
    if lesions is not None:
        print(lesion_pooling.describe([r["lesion_id"] for r in rows]) if pooled else
              "lesion pooling: no two inputs share a lesion id", file=sys.stderr)  # fmt: skip
