"""What a row is scored from: the network's logits of every val image under all 8 views, computed once per run
folder and cached in ``<run>/ablation_logits.npz``, or read from a tracked copy (``docs/ablation_logits/<row>.npz``,
``--save-logits``) when the run folder is not there (run folders are not in git).

An npz holds (all float32 / float64 / text, loadable with ``allow_pickle=False``):

* ``views`` (8, N, C) float32: best.pt's logits per view, in skinlesion/inference/views.py's order (identity,
  h, v, hv flips, then the same of the transpose) -- with any logit adjustment best.pt stores in its bias;
* ``stored_offset`` (C,): that adjustment (0 without one); ``views - stored_offset`` are the raw logits every
  variant starts from (caches written before this key had the offset taken out already: no key = raw);
* ``labels`` (N,), ``lesions`` (N,), ``image_ids`` (N,): the val images, in splits.csv order;
* ``counts`` (C,): train images per class (the logit adjustment's prior);
* tracked copies only: ``metadata_prior`` (JSON of what ``fit-metadata-prior`` would store for the run,
  ``skinlesion.evaluation.fitting.metadata_prior_of``) and ``run_stats`` (JSON: epochs, best epoch, wall time).

The metadata offsets need the val images' age, sex and site: from the run folder's table, or (tracked copy) from
the data folder's metadata by image id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ablation_rows import REPO

CACHE_NAME = "ablation_logits.npz"
TRACKED = REPO / "docs" / "ablation_logits"
N_CACHED_VIEWS = 8


def _save(path: Path, data: dict[str, Any]) -> Path:
    """np.savez_compressed, atomically; views stay float32 (never float16), text as unicode arrays."""
    from skinlesion import fileio

    arrays = {k: np.asarray(v) for k, v in data.items()}
    if arrays["views"].dtype != np.float32:
        arrays["views"] = arrays["views"].astype(np.float32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: savez would add ".npz" to the temporary name
            np.savez_compressed(f, **arrays)

    return fileio.atomic_write(path, write)


def _load(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------------ from a run folder
def compute(run_dir: Path, batch_size: int = 64, workers: int = 0) -> dict[str, Any]:
    """best.pt's logits of the run's val images under the 8 views, through skinlesion's classifier (the same
    backend and image cache ``skinlesion evaluate`` uses)."""
    from skinlesion.data.run_folder import labels_of, lesion_ids, split_part
    from skinlesion.evaluation.fitting import table_logits
    from skinlesion.inference.classifier import Classifier
    from skinlesion.inference.options import ScoringOptions
    from skinlesion.model.logit_adjustment import train_counts

    classifier = Classifier.load(run_dir, "torch", "cpu")
    meta = classifier.backend.meta
    table = split_part(run_dir, "val")
    options = ScoringOptions(batch_size=batch_size, workers=workers)
    views = table_logits(classifier, run_dir, table, N_CACHED_VIEWS, options, desc=f"{Path(run_dir).name}: 8 views")
    stored = (meta.get("logit_adjustment") or {}).get("offset")
    return {
        "views": views.astype(np.float32),
        "stored_offset": np.zeros(len(meta["classes"])) if stored is None else np.asarray(stored, dtype=np.float64),
        "labels": labels_of(table),
        "lesions": np.asarray(lesion_ids(table), dtype=str),  # not object: npz loads without pickle
        "image_ids": np.asarray(table["image_id"].astype(str).tolist(), dtype=str),
        "counts": np.asarray(train_counts(meta), dtype=np.float64),
    }


def is_cached(run_dir: Path) -> bool:
    cache, best = Path(run_dir) / CACHE_NAME, Path(run_dir) / "best.pt"
    return cache.is_file() and best.is_file() and cache.stat().st_mtime >= best.stat().st_mtime


def cached(run_dir: Path, batch_size: int = 64) -> dict[str, Any]:
    """``compute``'s arrays, cached next to best.pt (recomputed when best.pt is newer than the cache)."""
    run_dir = Path(run_dir)
    cache = run_dir / CACHE_NAME
    if is_cached(run_dir):
        data = _load(cache)
        if "image_ids" not in data:  # a cache from before image ids were kept
            from skinlesion.data.run_folder import split_part

            data["image_ids"] = np.asarray(split_part(run_dir, "val")["image_id"].astype(str).tolist(), dtype=str)
        return data
    data = compute(run_dir, batch_size)
    _save(cache, data)
    return data


def run_stats(run_dir: Path) -> dict[str, float]:
    from skinlesion.model import checkpoint

    history = pd.read_csv(Path(run_dir) / "history.csv")
    return {
        "epochs": len(history),
        "best_epoch": int(checkpoint.read(run_dir)["epoch"]),
        "wall_s": float(history["seconds"].sum()),
        "train_img_s": float(history["images_per_s"].mean()),
    }


def from_run(run_dir: Path, clinical: bool = True) -> dict[str, Any]:
    """A trained run folder's arrays plus, with ``clinical``, its metadata prior (``metadata_prior_of``) and
    the val rows' table (age, sex, site) in the arrays' order; and its run stats when it has a history."""
    from skinlesion.data.run_folder import split_part
    from skinlesion.evaluation.fitting import metadata_prior_of

    run_dir = Path(run_dir)
    data = cached(run_dir)
    if clinical:
        data["prior"] = metadata_prior_of(run_dir)
        data["table"] = split_part(run_dir, "val")
        _check_order(data, data["table"])
    if (run_dir / "history.csv").is_file():
        data["stats"] = run_stats(run_dir)
    return data


# ------------------------------------------------------------------------------------------ tracked copies
def save_tracked(run_dir: Path, dest: Path) -> Path:
    """Copy a run's cached logits to ``dest`` (compressed, float32) with its metadata prior and run stats, so
    the row can be scored again without the run folder; the file written."""
    from skinlesion.evaluation.fitting import metadata_prior_of

    run_dir = Path(run_dir)
    data = {k: v for k, v in cached(run_dir).items()}
    data["metadata_prior"] = np.asarray(json.dumps(metadata_prior_of(run_dir)))
    data["run_stats"] = np.asarray(json.dumps(run_stats(run_dir)))
    return _save(Path(dest) / f"{run_dir.name}.npz", data)


def from_tracked(path: Path, data_dir: Path | None, clinical: bool = True) -> dict[str, Any]:
    """A tracked copy's arrays; with ``clinical``, its metadata prior and the val rows' age, sex and site read
    from the data folder's metadata by image id (``data_dir``)."""
    data = _load(Path(path))
    prior = json.loads(str(data.pop("metadata_prior", "null")))
    stats = json.loads(str(data.pop("run_stats", "null")))
    if stats is not None:
        data["stats"] = stats
    if clinical:
        data["prior"] = prior
        data["table"] = val_table(data["image_ids"], data_dir)
        _check_order(data, data["table"])
    return data


def val_table(image_ids: np.ndarray, data_dir: Path | None) -> pd.DataFrame:
    """The data folder's rows of ``image_ids``, in that order (age, sex, localization for the metadata prior)."""
    from skinlesion.data.ham10000 import load_table
    from skinlesion.errors import SkinLesionError

    table = load_table(data_dir=data_dir, check="none").set_index("image_id", drop=False)
    missing = [i for i in image_ids if i not in table.index]
    if missing:
        raise SkinLesionError(f"{len(missing)} val images (e.g. {missing[0]}) are not in {data_dir}; pass --data-dir")
    return table.loc[list(image_ids)].reset_index(drop=True)


def _check_order(data: dict[str, Any], table: pd.DataFrame) -> None:
    from skinlesion.data.run_folder import labels_of

    if "image_ids" in data and not np.array_equal(table["image_id"].astype(str).to_numpy(), data["image_ids"]):
        raise ValueError("the cached logits and the val table list different images; delete the cache")
    if not np.array_equal(labels_of(table), data["labels"]):
        raise ValueError("the cached logits' labels differ from the val table's; delete the cache")


# ------------------------------------------------------------------------------------------ either
def available(name: str, out: Path, logits_dir: Path | None, finished: bool, cached_only: bool = False) -> str | None:
    """Where row ``name`` can be scored from: "run" (``finished`` run folder; ``cached_only``: whose logits are
    cached already), "tracked" (no run folder, a tracked copy in ``logits_dir``) or None."""
    run_dir = Path(out) / name
    if finished:
        return "run" if not cached_only or is_cached(run_dir) else None
    started = (run_dir / "best.pt").is_file() or (run_dir / "history.csv").is_file()
    if not started and logits_dir is not None and (Path(logits_dir) / f"{name}.npz").is_file():
        return "tracked"
    return None


def load(name: str, out: Path, logits_dir: Path | None, data_dir: Path | None, finished: bool,
         clinical: bool = True, cached_only: bool = False) -> dict[str, Any] | None:  # fmt: skip
    """Row ``name``'s arrays from its run folder or its tracked copy (``available``); None when neither."""
    where = available(name, out, logits_dir, finished, cached_only)
    if where == "run":
        return from_run(Path(out) / name, clinical)
    if where == "tracked":
        return from_tracked(Path(logits_dir) / f"{name}.npz", data_dir, clinical)
    return None
