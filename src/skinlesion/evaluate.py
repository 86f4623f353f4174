"""``skinlesion evaluate``: predict one part of splits.csv (or an external labelled folder) with best.pt,
then write predictions.csv, metrics.json (lesion-bootstrap intervals) and classification_report.txt."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report
from torch.utils.data import DataLoader
from tqdm import tqdm

from skinlesion import fileio, lesion_pooling, metadata_prior, metrics, operating_point
from skinlesion.classes import CLASS_INDEX
from skinlesion.data.dataset import LesionDataset
from skinlesion.device import resolve_device
from skinlesion.errors import SkinLesionError
from skinlesion.inference import Predictor

SUMMARY_ROWS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss", "ece")


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise SkinLesionError(f"{path} not found; pass the folder `skinlesion train` wrote as --run-dir")
    return json.loads(path.read_text(encoding="utf-8"))


def load_data_table(data_dir: str | None, metadata: str | None = None, images: str | None = None) -> pd.DataFrame:
    from skinlesion.data.ham10000 import load_table

    return load_table(data_dir=data_dir, metadata=metadata, images=images)


def run_table(run_dir: Path) -> pd.DataFrame:
    """splits.csv joined with image paths from the data folder recorded in config.json."""
    from skinlesion.data.split import read_splits

    config = read_config(run_dir)
    splits_path = run_dir / "splits.csv"
    if not splits_path.is_file():
        raise SkinLesionError(f"{splits_path} not found; is {run_dir} a training run folder?")
    splits = read_splits(splits_path)
    table = load_data_table(config.get("data_dir"), config.get("metadata"), config.get("images"))
    # Age, sex and site come along for the metadata prior (metadata_prior.py).
    extra = [c for c in ("age", "sex", "localization") if c in table and c not in splits]
    merged = splits.merge(table[["image_id", "path", *extra]], on="image_id", how="left")
    missing = merged["path"].isna()
    if missing.any():
        raise SkinLesionError(
            f"{int(missing.sum())} images of {splits_path} (e.g. {merged.loc[missing, 'image_id'].iloc[0]}) are not in "
            f"the data folder recorded in config.json ({config.get('data_dir')}); restore that folder"
        )
    return merged


def split_part(run_dir: Path, split: str) -> pd.DataFrame:
    table = run_table(run_dir)
    part = table[table["split"] == split].reset_index(drop=True)
    if part.empty:
        have = ", ".join(sorted(table["split"].unique()))
        raise SkinLesionError(f"splits.csv of {run_dir} has no '{split}' images (it has: {have}); pick another --split")
    return part


def open_cache(table: pd.DataFrame, short_side: int, use_cache: bool, cache_dir: str | None):
    """The data layer's pre-resized image cache, or None (decode originals) when it is off or unavailable."""
    if not use_cache:
        return None
    try:
        from skinlesion.data.cache import ImageCache
    except ImportError:
        return None
    return ImageCache.open_or_build(table, short_side, cache_dir=cache_dir)


def predict_logits(
    predictor: Predictor,
    table: pd.DataFrame,
    batch_size: int = 64,
    tta: bool = False,
    cache: Any = None,
    workers: int = 0,
    desc: str = "predict",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Raw logits for every row of ``table``; with ``tta`` a (plain, tta) pair from one pass over the data."""
    loader = DataLoader(
        LesionDataset(table, predictor.transform, cache), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    plain, flipped = [], []
    for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        plain.append(predictor.logits(x).numpy())
        if tta:
            flipped.append(predictor.logits(x, tta=True).numpy())
    if tta:
        return np.concatenate(plain), np.concatenate(flipped)
    return np.concatenate(plain)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature  # float64 so rows sum to 1 for log-loss
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def labels_of(table: pd.DataFrame) -> np.ndarray:
    unknown = sorted(set(table["dx"].astype(str)) - set(CLASS_INDEX))
    if unknown:
        raise SkinLesionError(f"labels {unknown} are not HAM10000 classes; evaluation needs labelled images")
    return table["dx"].map(CLASS_INDEX).to_numpy(dtype=int)


def predictions_frame(
    table: pd.DataFrame, probs: np.ndarray, classes: list[str], decided: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per image; ``y_pred`` is the decision (``decided``, an operating point's) or the argmax."""
    frame = pd.DataFrame(
        {
            "image_id": table["image_id"].astype(str).to_numpy(),
            "lesion_id": table["lesion_id"].astype(str).to_numpy(),
            "y_true": table["dx"].astype(str).to_numpy(),
            "y_pred": np.asarray(classes)[probs.argmax(1) if decided is None else decided],
        }
    )
    for i, c in enumerate(classes):
        frame[f"p_{c}"] = probs[:, i]
    return frame


def lesion_level(frame: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, mean probabilities, lesion ids) with one row per lesion."""
    cols = [f"p_{c}" for c in classes]
    grouped = frame.groupby("lesion_id", sort=True)
    probs = grouped[cols].mean().to_numpy()
    truth = grouped["y_true"].agg(lambda s: s.mode().iloc[0])
    return truth.map(CLASS_INDEX).to_numpy(dtype=int), probs, truth.index.to_numpy()


def _fmt(entry: dict[str, Any]) -> str:
    if entry["value"] is None:
        return "n/a"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def summary_table(columns: dict[str, dict[str, Any]]) -> str:
    """Plain-text table: one row per headline metric, one column per scoring (images, TTA, lesions)."""
    header = ["metric", *columns]
    rows = [header, *[[m, *(_fmt(c[m]) for c in columns.values())] for m in SUMMARY_ROWS]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "external"


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    external = any(getattr(args, k, None) for k in ("data_dir", "metadata", "images"))
    device = resolve_device(args.device)
    predictor = Predictor(run_dir, device=str(device))
    classes = predictor.classes
    if external:
        table = load_data_table(args.data_dir, args.metadata, args.images)
        if "lesion_id" not in table or table["lesion_id"].isna().any():
            # No lesion ids (e.g. ISIC 2018 test): each image is its own lesion for the bootstrap.
            table = table.assign(lesion_id=table.get("lesion_id", table["image_id"]).fillna(table["image_id"]))
        name = _safe_name(args.name or Path(args.data_dir or args.images or args.metadata).name)
        out_dir = run_dir / f"eval_{name}"
        source = {"external": name, "data_dir": args.data_dir, "metadata": args.metadata, "images": args.images}
    else:
        table = split_part(run_dir, args.split)
        out_dir = run_dir
        source = {"split": args.split}
    y = labels_of(table)
    # The run's own images live in the cache training used, unless told otherwise.
    cache_dir = args.cache_dir or (None if external else read_config(run_dir).get("cache_dir"))
    cache = open_cache(table, int(predictor.meta["resize_size"]), getattr(args, "cache", True), cache_dir)
    if getattr(args, "tta_views", None):
        predictor.tta_views = args.tta_views
    out = predict_logits(predictor, table, args.batch_size, args.tta, cache, args.workers, desc=f"evaluate {len(y)}")
    logits, logits_tta = out if args.tta else (out, None)
    temperature = predictor.temperature
    prior = predictor.metadata_prior if getattr(args, "metadata_prior", True) else None
    offset = metadata_prior.offsets(prior, table) if prior else None
    with_metadata = int(metadata_prior.known(table, prior).sum()) if prior else 0
    point = predictor.operating_point if getattr(args, "operating_point", True) else None
    predictor.operating_point = point
    lesions = table["lesion_id"].astype(str).to_numpy()
    asked = getattr(args, "pool_lesions", None)
    pool = predictor.pool_lesions if asked is None else asked
    pooled = lesion_pooling.shared(lesions) if pool else 0

    def probabilities(z: np.ndarray) -> np.ndarray:
        p = softmax(metadata_prior.combine(z, temperature, offset))
        return lesion_pooling.pool(p, lesions) if pooled else p

    probs = probabilities(logits)
    decided = predictor.decide(probs)
    frame = predictions_frame(table, probs, classes, decided)

    def score(p: np.ndarray, groups: np.ndarray, labels: np.ndarray, tta: bool = False) -> dict[str, Any]:
        y_pred = predictor.decide(p, tta)  # the operating point's decisions (the argmax without one)
        return metrics.evaluate(labels, p, groups, classes, n_boot=args.bootstrap, seed=args.seed, y_pred=y_pred)

    result: dict[str, Any] = {
        **source,
        "temperature": temperature,
        "metadata_prior": {"applied": with_metadata > 0, "images_with_metadata": with_metadata},
        # Each image scored with its lesion's pooled probabilities (lesion_pooling.py).
        "lesion_pooling": {"applied": pooled > 0, "images_pooled": pooled},
        # In-sample when scored on the split it was fitted on (operating_point.py).
        "operating_point": None if point is None else {k: point[k] for k in operating_point.SUMMARY_KEYS},
        "tta": False,
        **score(probs, lesions, y),
    }
    columns = {"images": result}
    report = classification_report(
        y, decided, labels=list(range(len(classes))), target_names=classes, digits=3, zero_division=0
    )
    fileio.write_csv(out_dir / "predictions.csv", frame)
    if logits_tta is not None:
        probs_tta = probabilities(logits_tta)
        decided_tta = predictor.decide(probs_tta, tta=True)
        fileio.write_csv(out_dir / "predictions_tta.csv", predictions_frame(table, probs_tta, classes, decided_tta))
        result["with_tta"] = columns["images+TTA"] = score(probs_tta, lesions, y, tta=True)
        result["tta_views"] = predictor.tta_views
        views = "identity, h, v, hv flips" + (" of the image and of its transpose" if predictor.tta_views == 8 else "")
        report += f"\nWith TTA ({predictor.tta_views} views: {views}):\n" + classification_report(
            y, decided_tta, labels=list(range(len(classes))), target_names=classes, digits=3, zero_division=0
        )
    if args.lesion_level:
        ly, lp, lid = lesion_level(frame, classes)
        result["lesion_level"] = columns["lesions"] = score(lp, lid, ly)
    fileio.write_json(out_dir / "metrics.json", result)
    fileio.write_text(out_dir / "classification_report.txt", report)
    where = source.get("split") or source.get("external")
    print(f"{where}: {result['n_images']} images, {result['n_lesions']} lesions, temperature {temperature:.3f}")
    if prior:
        print(f"metadata prior added for {with_metadata} of {len(y)} images (age / sex / site known)")
    if pool:
        print(lesion_pooling.describe(lesions) if pooled else "lesion pooling: no two images share a lesion id")
    if point is not None:
        fitted_here = point["fitted_on"] == source.get("split")
        print(f"operating point {operating_point.describe(point)}" + (f" (set on these {point['fitted_on']} images: "
              "its sensitivity here is in-sample)" if fitted_here else ""))  # fmt: skip
        if pooled:
            print("note: the operating point was set on single images; pooled, its sensitivity is close to the target "
                  "rather than exactly on it")  # fmt: skip
        if point.get("metadata_prior") and not prior:
            print("note: the operating point was set with the metadata prior; without it its sensitivity is not kept")
        if args.tta and point.get("tta_views") not in (None, predictor.tta_views):
            print(f"note: the operating point's TTA bias was set on {point['tta_views']} views, not "
                  f"{predictor.tta_views}; its sensitivity with these is not kept")  # fmt: skip
    print(summary_table(columns))
    print(f"wrote {out_dir / 'predictions.csv'}, metrics.json, classification_report.txt")
