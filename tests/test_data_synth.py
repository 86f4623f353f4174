"""Synthetic HAM10000-layout data: loadable, plausible metadata, known lesion masks."""

from __future__ import annotations

import numpy as np
import pytest

from skinlesion.classes import CLASSES
from skinlesion.data.ham10000 import load_table
from skinlesion.data.synth import draw_lesion, write_synthetic


def test_synth_folder_loads_through_load_table(synth_dir):
    table = load_table(synth_dir, check="full")
    assert table.attrs["layout"] == "folder"
    assert table["dx"].value_counts().to_dict() == dict.fromkeys(CLASSES, 30)
    per_lesion = table.groupby("lesion_id").size()
    assert per_lesion.min() >= 1 and per_lesion.max() <= 3 and (per_lesion > 1).any()
    # A lesion's images share its patient data.
    assert (table.groupby("lesion_id")[["dx", "sex", "localization"]].nunique() == 1).all().all()
    ages = table["age"].dropna()
    assert ages.between(5, 85).all() and (ages % 5 == 0).all()
    assert set(table["sex"]) <= {"male", "female", "unknown"}
    assert table["image_id"].str.fullmatch(r"ISIC_\d{7}").all()


def test_imbalance_follows_ham10000_and_seed_is_reproducible(tmp_path):
    a = write_synthetic(tmp_path / "a", n_per_class=10, size=(32, 24), imbalance=True, seed=5)
    b = write_synthetic(tmp_path / "b", n_per_class=10, size=(32, 24), imbalance=True, seed=5)
    ta, tb = load_table(a), load_table(b)
    counts = ta["dx"].value_counts()
    assert counts.idxmax() == "nv" and counts["nv"] > 5 * counts["df"] and counts.min() >= 4
    assert ta.drop(columns="path").equals(tb.drop(columns="path"))
    assert all(
        (a / "images" / f"{i}.jpg").read_bytes() == (b / "images" / f"{i}.jpg").read_bytes() for i in ta["image_id"][:5]
    )


@pytest.mark.parametrize("dx", CLASSES)
def test_draw_lesion_mask_marks_the_lesion(dx):
    rng = np.random.default_rng(0)
    image, mask = draw_lesion(dx, (96, 72), rng, center=(30.0, 40.0))
    assert image.size == (96, 72) and mask.shape == (72, 96) and mask.dtype == bool
    assert 0.02 < mask.mean() < 0.5
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 30) < 12 and abs(ys.mean() - 40) < 12
    pixels = np.asarray(image, dtype=float)
    # The lesion looks different from the skin around it.
    assert np.abs(pixels[mask].mean(0) - pixels[~mask].mean(0)).max() > 25


def test_classes_differ_in_colour():
    rng = np.random.default_rng(1)
    means = {}
    for dx in CLASSES:
        image, mask = draw_lesion(dx, (96, 72), rng)
        means[dx] = np.asarray(image, dtype=float)[mask].mean(0)
    closest = min(np.abs(means[a] - means[b]).max() for i, a in enumerate(CLASSES) for b in CLASSES[i + 1 :])
    assert closest > 10
