"""The data side of a run folder: its config.json, its splits.csv joined with the data folder it names, labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion import fileio
from skinlesion.classes import CLASS_INDEX
from skinlesion.data.ham10000 import load_table
from skinlesion.data.split import read_splits
from skinlesion.errors import SkinLesionError

# Where a run's data lives (run_table, the image cache): a folder or file name, or null.
PATH_KEYS = ("data_dir", "metadata", "images", "cache_dir")


def read_config(run_dir: Path) -> dict[str, Any]:
    """A run folder's config.json (size-limited, an object whose data paths are strings): one line otherwise."""
    path = Path(run_dir) / "config.json"
    hint = "pass the folder `skinlesion train` wrote as --run-dir, or restore its config.json"
    if not path.is_file():
        raise SkinLesionError(f"{path} not found; {hint}")
    config = fileio.read_json(path, hint)
    for key in PATH_KEYS:
        if not isinstance(config.get(key), str | None):
            raise SkinLesionError(f"{path}: {key} must be a path or null, not {str(config[key])[:40]!r}; {hint}")
    return config


def run_table(run_dir: Path) -> pd.DataFrame:
    """splits.csv joined with image paths (and age, sex, site) from the data folder recorded in config.json."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    splits_path = run_dir / "splits.csv"
    if not splits_path.is_file():
        raise SkinLesionError(f"{splits_path} not found; is {run_dir} a training run folder?")
    splits = read_splits(splits_path)
    table = load_table(data_dir=config.get("data_dir"), metadata=config.get("metadata"), images=config.get("images"))
    # Age, sex and site come along for the metadata prior.
    extra = [c for c in ("age", "sex", "localization") if c in table and c not in splits]
    merged = splits.merge(table[["image_id", "path", *extra]], on="image_id", how="left")
    missing = merged["path"].isna()
    if missing.any():
        raise SkinLesionError(
            f"{int(missing.sum())} images of {splits_path} (e.g. {merged.loc[missing, 'image_id'].iloc[0]}) are not in "
            f"the data folder recorded in config.json ({config.get('data_dir')}); restore that folder"
        )
    return merged


def overlap_with_training(run_dir: Path, table: pd.DataFrame) -> tuple[np.ndarray, int, int]:
    """Rows of ``table`` (an external set) that the run trained on: same image id, or same lesion id (another
    shot of a training lesion). The mask and how many match by image id and by lesion id alone."""
    trained = read_splits(Path(run_dir) / "splits.csv")
    trained = trained[trained["split"] == "train"]
    same_image = table["image_id"].astype(str).isin(set(trained["image_id"])).to_numpy()
    same_lesion = table["lesion_id"].astype(str).isin(set(trained["lesion_id"])).to_numpy() & ~same_image
    return same_image | same_lesion, int(same_image.sum()), int(same_lesion.sum())


def default_split(run_dir: Path) -> str:
    """val; else test (an ensemble of K folds with a test part: every other image trained a member); else ``oof``,
    the out-of-fold predictions of a ``train --folds`` run without a test part."""
    parts = set(read_splits(Path(run_dir) / "splits.csv")["split"])
    if "val" in parts or "test" not in parts and not any(Path(run_dir).glob("fold_*/oof_logits.npz")):
        return "val"
    return "test" if "test" in parts else "oof"


def split_part(run_dir: Path, split: str) -> pd.DataFrame:
    table = run_table(run_dir)
    part = table[table["split"] == split].reset_index(drop=True)
    if part.empty:
        have = ", ".join(sorted(table["split"].unique()))
        raise SkinLesionError(f"splits.csv of {run_dir} has no '{split}' images (it has: {have}); pick another --split")
    return part


def labels_of(table: pd.DataFrame) -> np.ndarray:
    unknown = sorted(set(table["dx"].astype(str)) - set(CLASS_INDEX))
    if unknown:
        raise SkinLesionError(f"labels {unknown} are not HAM10000 classes; evaluation needs labelled images")
    return table["dx"].map(CLASS_INDEX).to_numpy(dtype=int)


def lesion_ids(table: pd.DataFrame) -> np.ndarray:
    return table["lesion_id"].astype(str).to_numpy()
