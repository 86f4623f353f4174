"""The data side of a run folder: its config.json, its splits.csv joined with the data folder it names, labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion import fileio
from skinlesion.classes import CLASSES
from skinlesion.data.datasets import DataSpec, load_dataset
from skinlesion.data.split import read_splits
from skinlesion.errors import SkinLesionError

# What a run's data options in config.json may be (data_spec, the image cache): text or null; data_dir and
# (before label sets) classes also a list.
TEXT_KEYS = ("data_dir", "metadata", "images", "cache_dir", "source", "classes", "keep_unmapped", "label_field")


def read_config(run_dir: Path) -> dict[str, Any]:
    """A run folder's config.json: size-limited, a JSON object whose data options have their types; one line
    otherwise (a truncated, huge or list file never reaches the code that reads it)."""
    path = Path(run_dir) / "config.json"
    hint = "pass the folder `skinlesion train` wrote as --run-dir, or restore its config.json"
    if not path.is_file():
        raise SkinLesionError(f"{path} not found; {hint}")
    config = fileio.read_json(path, hint)
    for key in TEXT_KEYS:
        value = config.get(key)
        # data_dir: one folder or several; classes: a label-set name, or (runs before label sets) the codes
        items = value if key in ("data_dir", "classes") and isinstance(value, list) else [value]
        if not all(isinstance(v, str | None) for v in items):
            raise SkinLesionError(f"{path}: {key} must be text or null, not {str(value)[:40]!r}; {hint}")
    return config


def run_table(run_dir: Path) -> pd.DataFrame:
    """splits.csv joined with image paths (and age, sex, site) from the data folder recorded in config.json."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    splits_path = run_dir / "splits.csv"
    if not splits_path.is_file():
        raise SkinLesionError(f"{splits_path} not found; is {run_dir} a training run folder?")
    splits = read_splits(splits_path)
    table = load_dataset(data_spec(config))
    # Age, sex and site come along for the metadata prior; source, patient and skin type for subgroups.
    extra = [c for c in ("age", "sex", "localization", "source", "source_label", "patient_id", "dx_type",
                         "fitzpatrick") if c in table and c not in splits]  # fmt: skip
    merged = splits.merge(table[["image_id", "path", *extra]], on="image_id", how="left")
    missing = merged["path"].isna()
    if missing.any():
        raise SkinLesionError(
            f"{int(missing.sum())} images of {splits_path} (e.g. {merged.loc[missing, 'image_id'].iloc[0]}) are not in "
            f"the data folder recorded in config.json ({config.get('data_dir')}); restore that folder"
        )
    return merged


def data_spec(config: dict[str, Any]) -> DataSpec:
    """Where a run's images are and how their labels were mapped, from its config.json (older runs: HAM10000)."""
    view = type("RunOptions", (), {k: v for k, v in config.items() if isinstance(k, str) and k.isidentifier()})
    if isinstance(config.get("classes"), list):  # written before the label set was an option
        view.classes = "ham7"
    return DataSpec.of(view)


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


def labels_of(table: pd.DataFrame, classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Class indices of the ``dx`` column in ``classes`` order; one line when a label is not one of them."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(table["dx"].astype(str)) - set(index))
    if unknown:
        raise SkinLesionError(f"labels {unknown} are not classes of this run ({', '.join(classes)}); evaluation needs "
                              "images labelled in the run's classes")  # fmt: skip
    return table["dx"].map(index).to_numpy(dtype=int)


def lesion_ids(table: pd.DataFrame) -> np.ndarray:
    return table["lesion_id"].astype(str).to_numpy()
