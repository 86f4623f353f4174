"""Subgroup table: each row equals the metrics of its images, gaps with paired lesion-bootstrap intervals, small
groups marked (not hidden), attribute columns found under their usual names; and the forest plot."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion import metrics
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import subgroups
from skinlesion.reporting import clinical_plots

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """800 lesions of 1-3 images; the model is worse on women (their probabilities are noisier)."""
    rng = np.random.default_rng(0)
    n_lesions = 800
    per = rng.integers(1, 4, n_lesions)
    lesion = np.repeat(np.arange(n_lesions), per)
    sex = np.where(rng.random(n_lesions) < 0.5, "female", "male").astype(object)
    sex[:40] = "unknown"
    y_lesion = rng.choice(7, n_lesions, p=[0.04, 0.06, 0.12, 0.02, 0.14, 0.58, 0.04])
    y_lesion[:40] = np.where(np.arange(40) < 3, 4, 5)  # sex unknown: 40 lesions, 3 of them melanomas
    y = y_lesion[lesion]
    noise = np.where(sex[lesion] == "female", 1.6, 0.7)[:, None]
    z = rng.normal(0, 1, (len(lesion), 7)) * noise
    z[np.arange(len(lesion)), y] += 2.0
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    out = pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(len(lesion))],
                        "lesion_id": [f"HAM_{i:07d}" for i in lesion],
                        "y_true": np.asarray(CLASSES)[y], "y_pred": np.asarray(CLASSES)[p.argmax(1)]})  # fmt: skip
    for i, c in enumerate(CLASSES):
        out[f"p_{c}"] = p[:, i]
    site = rng.choice(["back", "face", "lower extremity"], n_lesions)
    site[-5:] = "acral"  # five lesions only
    age = np.where(rng.random(n_lesions) < 0.05, np.nan, rng.integers(0, 18, n_lesions) * 5.0)
    fitz = np.where(rng.random(n_lesions) < 0.1, np.nan, rng.integers(1, 7, n_lesions).astype(float))
    return out.assign(sex=sex[lesion], age=age[lesion], localization=site[lesion], fitzpatrick=fitz[lesion])


@pytest.fixture(scope="module")
def table(frame) -> pd.DataFrame:
    return subgroups.subgroup_table(frame, CLASSES, positive_class="mel", n_boot=200, seed=1)


def test_rows_are_the_metrics_of_their_images(frame, table):
    assert table.iloc[0][["attribute", "value", "n_images"]].tolist() == ["overall", "all", len(frame)]
    assert list(dict.fromkeys(table["attribute"])) == ["overall", "sex", "age", "body_site", "fitzpatrick"]
    ages = table.loc[table["attribute"] == "age", "value"].tolist()
    assert ages == ["<30", "30-44", "45-59", "60-74", "75+", "unknown"]
    assert table.loc[table["attribute"] == "fitzpatrick", "value"].tolist() == ["1", "2", "3", "4", "5", "6", "unknown"]
    index = {c: i for i, c in enumerate(CLASSES)}
    for _, row in table.iloc[[1, 4, 9, 13]].iterrows():
        rows = frame if row["attribute"] == "overall" else frame[
            subgroups.attribute_values(frame, row["attribute"]) == row["value"]]  # fmt: skip
        y = rows["y_true"].map(index).to_numpy()
        pred = rows["y_pred"].map(index).to_numpy()
        point = metrics.point_metrics(y, rows[[f"p_{c}" for c in CLASSES]].to_numpy(), pred)["overall"]
        assert row["n_images"] == len(rows) and row["n_lesions"] == rows["lesion_id"].nunique()
        for m in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
            assert row[m] == pytest.approx(point[m])
            assert row[f"{m}_lo"] <= row[m] <= row[f"{m}_hi"]
        mel = y == index["mel"]
        assert row["mel_sensitivity"] == pytest.approx((pred[mel] == index["mel"]).mean())
        assert row["mel_specificity"] == pytest.approx((pred[~mel] != index["mel"]).mean())


def test_gaps_have_paired_intervals(table):
    sex = table[table["attribute"] == "sex"].set_index("value")
    assert sex.loc["female", "accuracy_gap_hi"] < 0 < sex.loc["male", "accuracy_gap_lo"]  # worse on women, clearly
    assert sex.loc["female", "accuracy_gap"] == pytest.approx(sex.loc["female", "accuracy"] - table.loc[0, "accuracy"])
    assert table.loc[0, "accuracy_gap"] == 0.0 and table.loc[0, "accuracy_gap_lo"] == 0.0
    # A paired gap is tighter than the group's own interval (the whole set moves with it in each resample).
    female = sex.loc["female"]
    assert female["accuracy_gap_hi"] - female["accuracy_gap_lo"] < female["accuracy_hi"] - female["accuracy_lo"]


def test_small_groups_are_marked_not_hidden(table, frame):
    acral = table[(table["attribute"] == "body_site") & (table["value"] == "acral")].iloc[0]
    assert acral["small"] and acral["n_lesions"] == 5 and acral["reason"].startswith("5 lesions < 30")
    unknown_sex = table[(table["attribute"] == "sex") & (table["value"] == "unknown")].iloc[0]
    assert unknown_sex["small"] and unknown_sex["reason"] == "3 mel lesions < 10"  # enough lesions, few melanomas
    assert not table.loc[0, "small"] and table.loc[0, "reason"] is None
    again = subgroups.subgroup_table(frame, CLASSES, attributes=["sex"], positive_class="mel", n_boot=200, seed=1)
    pd.testing.assert_frame_equal(table.iloc[:4], again)  # seeded: the same resamples


def test_attribute_columns_and_joining():
    frame = pd.DataFrame({"image_id": ["a", "b", "c"], "age_approx": [29.0, 30.0, None],
                          "anatom_site_general_challenge": ["torso", None, " head/neck"],
                          "fitzpatrick_scale": ["2", "2.0", "6"]})  # fmt: skip
    assert subgroups.attribute_values(frame, "age").tolist() == ["<30", "30-44", "unknown"]
    assert subgroups.attribute_values(frame, "body_site").tolist() == ["torso", "unknown", "head/neck"]
    assert subgroups.attribute_values(frame, "fitzpatrick").tolist() == ["2", "2", "6"]
    assert subgroups.attribute_values(frame, "sex") is None
    predictions = pd.DataFrame({"image_id": ["c", "a", "z"], "y_true": ["mel", "nv", "nv"]})
    joined = subgroups.with_attributes(predictions, frame)
    assert pd.isna(joined.loc[0, "age_approx"]) and joined.loc[1, "age_approx"] == 29.0
    assert joined["fitzpatrick_scale"].tolist()[:2] == ["6", "2"] and pd.isna(joined["fitzpatrick_scale"].iloc[2])


def test_bad_frames_are_one_line_errors(frame):
    with pytest.raises(SkinLesionError, match="lacks p_vasc"):
        subgroups.subgroup_table(frame.drop(columns="p_vasc"), CLASSES, n_boot=0)
    with pytest.raises(SkinLesionError, match="labels melanoma are not among"):
        subgroups.subgroup_table(frame.assign(y_true="melanoma"), CLASSES, n_boot=0)
    with pytest.raises(SkinLesionError, match="no column for attribute 'dx_type'"):
        subgroups.subgroup_table(frame, CLASSES, attributes=["dx_type"], n_boot=0)


def test_forest_plot(table, tmp_path):
    out = clinical_plots.forest_plot(table, "mel_sensitivity", tmp_path / "forest.png")
    few = clinical_plots.forest_plot(table.iloc[:4], "mel_sensitivity", tmp_path / "few.png")
    with Image.open(out) as big, Image.open(few) as small:
        assert big.format == "PNG" and big.height > small.height + 300  # one row per group
        pixels = np.asarray(big.convert("RGB"))
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    red = (r - g > 60) & (r - b > 60)
    assert red.sum() > 100  # the whole-set line
    with pytest.raises(SkinLesionError, match="no column 'auc_80'"):
        clinical_plots.forest_plot(table, "auc_80", tmp_path / "x.png")
