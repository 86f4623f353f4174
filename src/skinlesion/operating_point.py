"""Operating point: a minimum sensitivity for chosen classes (melanoma, typically), set on held-out images.

A classifier's argmax is one operating point among many; a clinic screening for melanoma wants a
missed melanoma to be rarer than a false alarm. ``skinlesion operating-point --min-sensitivity mel=0.75``
finds, on the run's val split, the smallest per-class bias b >= 0 for which the decision

    predicted class = argmax_k (log p_k + b_k)

calls at least 75 % of val melanomas melanoma, and stores b in best.pt. The probabilities p (tempered, with
the metadata prior) are left as they are -- calibrated, and scored as such (AUC, ECE, log loss) -- only the
decision moves: exp(b_k) is the factor by which class k's odds must be discounted before another class
wins, i.e. the cost of missing k relative to a false alarm. Every consumer (evaluate, predict, serve,
Grad-CAM, report, the ONNX backend) decides this way when best.pt (or model.onnx) holds an operating point.

The bias is a threshold chosen on val: the sensitivity that evaluate then reports on val is in-sample for
it. The ablation scores it honestly (set on one half of the val lesions, scored on the other).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion import checkpoint, fileio
from skinlesion.errors import SkinLesionError

MARGIN = 1e-6  # strictly above the tie, so the class wins the argmax
SUMMARY_KEYS = ("classes", "min_sensitivity", "bias", "fitted_on")  # what metrics.json records of it


def parse_targets(specs: Sequence[str] | str | None, classes: Sequence[str]) -> dict[str, float]:
    """'mel=0.75' (one string, comma-separated, or a list of them) -> {'mel': 0.75}, checked."""
    if not specs:
        return {}
    items = [s for spec in ([specs] if isinstance(specs, str) else specs) for s in spec.split(",") if s.strip()]
    targets: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in classes:
            raise SkinLesionError(
                f"--min-sensitivity {item!r}: write CLASS=FRACTION, CLASS one of {', '.join(classes)}; e.g. mel=0.75"
            )
        try:
            target = float(value)
        except ValueError:
            target = -1.0
        if not 0.0 < target <= 1.0:
            raise SkinLesionError(f"--min-sensitivity {item!r}: the sensitivity must be a fraction in (0, 1]")
        targets[name] = target
    return targets


def recall(z: np.ndarray, y: np.ndarray, k: int) -> float:
    positives = y == k
    return float((z[positives].argmax(1) == k).mean()) if positives.any() else float("nan")


def fit(z: np.ndarray, y: np.ndarray, classes: Sequence[str], targets: Mapping[str, float]) -> np.ndarray:
    """The smallest bias per targeted class (0 elsewhere) with recall >= target on (z, y).

    For one class k, image i of class k is called k once b exceeds m_i = max_{j != k} z_ij - z_ik, so the
    bias is the ceil(target * n_k)-th smallest m_i (never below 0: the operating point only raises a class).
    Several classes interact a little (raising one takes images from another), so the per-class solutions
    are repeated until none moves."""
    z = np.asarray(z, dtype=np.float64)
    bias = np.zeros(len(classes))
    index = {c: i for i, c in enumerate(classes)}
    for _ in range(10):
        before = bias.copy()
        for name, target in targets.items():
            k = index[name]
            zk = z[y == k] + bias
            if not len(zk):
                raise SkinLesionError(f"no {name} image among the images to fit the operating point on")
            margin = np.delete(zk, k, axis=1).max(1) - zk[:, k]
            need = np.sort(margin)[int(np.ceil(target * len(zk) - 1e-9)) - 1]
            bias[k] = max(0.0, bias[k] + need + MARGIN)
        if np.allclose(bias, before):
            break
    return bias


def decide(probs: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Predicted class per row: argmax of the probabilities, or of log p + bias with an operating point
    (``bias`` (C,) or one row per image, (N, C))."""
    probs = np.asarray(probs, dtype=np.float64)
    if bias is None:
        return probs.argmax(1)
    return (np.log(np.clip(probs, 1e-300, None)) + bias).argmax(1)


def vector(point: Mapping[str, Any] | None, classes: Sequence[str]) -> np.ndarray | None:
    """The stored bias in ``classes`` order, or None when there is no operating point."""
    if not point:
        return None
    if list(point["classes"]) != list(classes):
        raise SkinLesionError("operating point and model disagree on the class order; re-run operating-point")
    return np.asarray(point["bias"], dtype=np.float64)


def describe(point: Mapping[str, Any]) -> str:
    """'mel >= 0.75 (bias +1.17)', for logs, the report and the web page."""
    biases = dict(zip(point["classes"], point["bias"], strict=True))
    return ", ".join(f"{c} >= {t:g} (bias {biases[c]:+.2f})" for c, t in point["min_sensitivity"].items())


def build(
    z: np.ndarray, y: np.ndarray, classes: Sequence[str], targets: Mapping[str, float], **about: Any
) -> dict[str, Any]:
    """Fit and describe: what best.pt and model.onnx carry."""
    bias = fit(z, y, classes, targets)
    index = {c: i for i, c in enumerate(classes)}
    return {
        "classes": list(classes),
        "min_sensitivity": dict(targets),
        "bias": bias.tolist(),
        "sensitivity_before": {c: recall(z, y, index[c]) for c in targets},
        "sensitivity_after": {c: recall(z + bias, y, index[c]) for c in targets},
        "n_images": int(len(y)),
        **about,
    }


def store(path: str | Path, point: Mapping[str, Any] | None) -> None:
    """Put the operating point in best.pt (atomic rewrite); None removes it."""
    path = Path(path)
    file = path / "best.pt" if path.is_dir() else path
    ckpt = checkpoint.read(file)
    if point is None:
        ckpt.pop("operating_point", None)
    else:
        vector(point, ckpt["classes"])
        ckpt["operating_point"] = dict(point)
    fileio.torch_save(file, ckpt)


def fit_run(
    run_dir: Path,
    targets: Mapping[str, float],
    split: str = "val",
    tta: bool = True,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Fit on the run's ``split`` exactly as evaluate scores it (TTA, temperature, metadata prior) and store."""
    from skinlesion import metadata_prior
    from skinlesion.evaluate import labels_of, open_cache, predict_logits, read_config, split_part
    from skinlesion.inference import Predictor

    predictor = Predictor(run_dir, device=device)
    table = split_part(run_dir, split)
    y = labels_of(table)
    cache = open_cache(
        table, int(predictor.meta["resize_size"]), True, cache_dir or read_config(run_dir).get("cache_dir")
    )
    out = predict_logits(predictor, table, batch_size, tta, cache, workers, desc=f"operating point: {split} logits")
    logits = out[1] if tta else out
    prior = predictor.metadata_prior
    z = metadata_prior.combine(logits, predictor.temperature, metadata_prior.offsets(prior, table) if prior else None)
    point = build(
        z, y, predictor.classes, targets,
        fitted_on=split, tta=bool(tta), tta_views=predictor.tta_views if tta else 1,
        temperature=predictor.temperature, metadata_prior=prior is not None,
    )  # fmt: skip
    store(run_dir, point)
    return point


def report_line(point: Mapping[str, Any]) -> str:
    before, after = point["sensitivity_before"], point["sensitivity_after"]
    moved = ", ".join(f"{c} {before[c]:.3f} -> {after[c]:.3f}" for c in point["min_sensitivity"])
    return (
        f"operating point {describe(point)} fitted on {point['n_images']} {point['fitted_on']} images "
        f"({'TTA' if point['tta'] else 'no TTA'}, T {point['temperature']:.3f}); sensitivity there: {moved}"
    )


def main(args: argparse.Namespace) -> None:
    from skinlesion.device import resolve_device

    run_dir = Path(args.run_dir)
    if args.remove:
        had = "operating_point" in checkpoint.read(run_dir)
        store(run_dir, None)
        print(f"removed the operating point from {run_dir / 'best.pt'}" if had else f"{run_dir / 'best.pt'} had none")
        return
    targets = parse_targets(args.min_sensitivity, checkpoint.read(run_dir)["classes"])
    if not targets:
        raise SkinLesionError("say which class needs which sensitivity, e.g. --min-sensitivity mel=0.75")
    point = fit_run(
        run_dir, targets, args.split, args.tta, args.batch_size, str(resolve_device(args.device)), args.workers,
        args.cache_dir,
    )  # fmt: skip
    print(report_line(point))
    print(f"stored in {run_dir / 'best.pt'}; re-run evaluate (and export for the ONNX backend) to use it")
