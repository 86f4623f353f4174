"""Lesion-grouped stratified split on the real HAM10000 metadata."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from skinlesion.classes import CLASSES
from skinlesion.data.ham10000 import read_metadata
from skinlesion.data.split import make_split, read_splits, summary, write_splits
from skinlesion.errors import SkinLesionError

REAL_METADATA = Path(__file__).parent / "data" / "HAM10000_metadata.csv"


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    return read_metadata(REAL_METADATA)


@pytest.fixture(scope="module")
def default_split(meta) -> pd.DataFrame:
    return make_split(meta)


def _no_lesion_in_two_parts(split: pd.DataFrame) -> bool:
    return bool((split.groupby("lesion_id")["split"].nunique() == 1).all())


def test_default_split_is_grouped_and_stratified_within_one_point(meta, default_split):
    assert list(default_split.columns) == ["image_id", "lesion_id", "dx", "split"]
    assert len(default_split) == len(meta) and set(default_split["image_id"]) == set(meta["image_id"])
    assert _no_lesion_in_two_parts(default_split)
    parts = default_split["split"].value_counts(normalize=True)
    assert set(parts.index) == {"train", "val"} and abs(parts["val"] - 0.2) < 0.01
    overall = meta["dx"].value_counts(normalize=True)
    for part, rows in default_split.groupby("split"):
        share = rows["dx"].value_counts(normalize=True).reindex(list(CLASSES), fill_value=0)
        worst = (share - overall.reindex(list(CLASSES))).abs().max()
        assert worst < 0.01, f"{part}: a class share is {worst:.2%} away from overall"


def test_split_ignores_row_order_and_depends_on_seed(meta, default_split):
    shuffled = make_split(meta.sample(frac=1.0, random_state=7))
    pd.testing.assert_frame_equal(shuffled, default_split)
    other = make_split(meta, seed=1)
    assert not other["split"].equals(default_split["split"])


def test_kfold_folds_partition_the_lesions(meta):
    vals = [make_split(meta, folds=5, fold=i) for i in range(5)]
    val_ids = [set(s.loc[s["split"] == "val", "image_id"]) for s in vals]
    assert all(_no_lesion_in_two_parts(s) for s in vals)
    assert sum(len(v) for v in val_ids) == len(meta) and set().union(*val_ids) == set(meta["image_id"])
    assert all(0.19 < len(v) / len(meta) < 0.21 for v in val_ids)


def test_test_fraction_gives_three_lesion_disjoint_parts(meta):
    split = make_split(meta, val_frac=0.15, test_frac=0.15)
    assert _no_lesion_in_two_parts(split)
    shares = split["split"].value_counts(normalize=True)
    assert abs(shares["test"] - 1 / 7) < 0.01 and abs(shares["val"] - 0.85 / 6) < 0.01
    # The test part does not depend on the val fraction (carved first).
    other = make_split(meta, val_frac=0.25, test_frac=0.15)
    assert set(other.loc[other["split"] == "test", "image_id"]) == set(split.loc[split["split"] == "test", "image_id"])


@pytest.mark.parametrize(
    "kwargs", [{"val_frac": 0}, {"val_frac": 1.2}, {"test_frac": 0.9}, {"folds": 1}, {"folds": 5, "fold": 5}]
)
def test_bad_fractions_are_refused(meta, kwargs):
    with pytest.raises(SkinLesionError):
        make_split(meta, **kwargs)


def test_splits_csv_round_trip_and_validation(default_split, tmp_path):
    path = write_splits(tmp_path / "run" / "splits.csv", default_split)
    pd.testing.assert_frame_equal(read_splits(path), default_split.reset_index(drop=True))
    counts = summary(default_split)
    assert counts.loc["images", "all"] == 10015 and counts.loc["lesions", "all"] == 7470

    broken = default_split.drop(columns="lesion_id")
    broken.to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(SkinLesionError, match="missing column.*lesion_id"):
        read_splits(tmp_path / "a.csv")
    default_split.assign(split="holdout").to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(SkinLesionError, match="unknown split value"):
        read_splits(tmp_path / "b.csv")
    crossing = default_split.copy()
    lesion = crossing.groupby("lesion_id").size().idxmax()
    crossing.loc[crossing.index[crossing["lesion_id"] == lesion][0], "split"] = "test"
    crossing.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(SkinLesionError, match=f"more than one part: {lesion}"):
        read_splits(tmp_path / "c.csv")
    with pytest.raises(SkinLesionError, match="does not exist"):
        read_splits(tmp_path / "none.csv")
