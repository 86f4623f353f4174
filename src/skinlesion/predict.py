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
from PIL import Image
from tqdm import tqdm

from skinlesion.classes import FULL_NAMES
from skinlesion.data.images import IMAGE_SUFFIXES, open_rgb
from skinlesion.errors import SkinLesionError


class ProbabilityModel(Protocol):
    classes: list[str]
    img_size: int
    tta_views: int

    @property
    def temperature(self) -> float: ...

    def predict_images(self, images: Sequence[Image.Image], tta: bool = False) -> np.ndarray: ...


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


def result_row(path: Path, probs: np.ndarray, classes: Sequence[str], top_k: int) -> dict[str, Any]:
    order = np.argsort(-probs, kind="stable")
    best = classes[order[0]]
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
    predictor: ProbabilityModel, files: Sequence[Path], batch_size: int = 32, tta: bool = False, top_k: int = 3
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(files), desc="predict", unit="img", file=sys.stderr, disable=len(files) < 2) as bar:
        for paths, images in decoded_batches(files, batch_size, skipped):
            probs = predictor.predict_images(images, tta=tta)
            rows += [result_row(p, pr, predictor.classes, top_k) for p, pr in zip(paths, probs, strict=True)]
            bar.update(len(rows) + len(skipped) - bar.n)
        bar.update(len(files) - bar.n)  # failures after the last full batch
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
    if ignored:
        names = ", ".join(p.name for p in ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        print(f"skipped {len(ignored)} file(s) without a .jpg/.jpeg/.png suffix: {names}", file=sys.stderr)
    if not files:
        raise SkinLesionError("no image files found in the inputs; pass .jpg/.jpeg/.png files or folders holding them")
    predictor = load_predictor(args.run_dir, args.backend)
    if getattr(args, "tta_views", None):
        predictor.tta_views = args.tta_views
    top_k = min(args.top_k, len(predictor.classes))
    rows, skipped = predict_files(predictor, files, args.batch_size, args.tta, top_k)
    if not rows:
        raise SkinLesionError(f"none of the {len(files)} input file(s) could be read as an image")
    if args.format == "json":
        doc = {
            "run_dir": str(args.run_dir),
            "backend": args.backend,
            "tta": bool(args.tta),
            "tta_views": predictor.tta_views if args.tta else 1,
            "temperature": predictor.temperature,
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
