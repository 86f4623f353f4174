"""The source readers, label maps, grouping and union on the real ISIC 2019 / ISIC 2020 / HAM10000 files in
../shared/data (skipped when absent). ISIC 2019's images are not there: its layout is assembled from the real
CSVs and links to the 10,015 HAM10000 images it includes (same ids); the other 15,316 are missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion.data.ham10000 import read_metadata
from skinlesion.data.sites import GENERAL_SITE
from skinlesion.data.sources import registry
from skinlesion.data.sources.grouping import group_ids, strata
from skinlesion.data.sources.isic2019 import read_isic2019_csv
from skinlesion.data.sources.isic2020 import read_isic2020_csv
from skinlesion.data.sources.union import union
from skinlesion.data.split import lesion_folds
from skinlesion.data.taxonomy import map_labels
from skinlesion.errors import SkinLesionError

HAM_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


@pytest.fixture(scope="module")
def isic2019_dir(shared_data, tmp_path_factory) -> Path:
    """ISIC_2019_Training_{GroundTruth,Metadata}.csv + ISIC_2019_Training_Input/ of links to the HAM images, plus
    one HAM image copied under a real `_downsampled` name (an MSK id of ISIC 2019)."""
    root = tmp_path_factory.mktemp("isic2019")
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"):
        shutil.copyfile(shared_data / "isic2019_csv" / name, root / name)
    images = root / "ISIC_2019_Training_Input"
    images.mkdir()
    for entry in os.scandir(shared_data / "ham10000_200x150" / "images"):
        os.symlink(entry.path, images / entry.name)
    shutil.copyfile(images / "ISIC_0024306.jpg", images / "ISIC_0000017_downsampled.jpg")
    return root


@pytest.fixture(scope="module")
def isic2019(isic2019_dir) -> pd.DataFrame:
    return registry.read(isic2019_dir, allow_missing=True, check="none")


@pytest.fixture(scope="module")
def ham(shared_data) -> pd.DataFrame:
    return registry.read(shared_data / "ham10000_200x150")


def test_isic2019_real_csvs_parse_with_the_downsampled_quirk(shared_data):
    csvs = shared_data / "isic2019_csv"
    frame = read_isic2019_csv(csvs / "ISIC_2019_Training_GroundTruth.csv", csvs / "ISIC_2019_Training_Metadata.csv")
    assert len(frame) == 25331 and frame["image_id"].is_unique
    assert frame.attrs["downsampled"] == 2074 and not frame["image_id"].str.endswith("_downsampled").any()
    assert (frame["isic_name"].str.endswith("_downsampled")).sum() == 2074
    expected = {"MEL": 4522, "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239, "VASC": 253, "SCC": 628}
    assert frame["label"].value_counts().to_dict() == expected
    assert frame.attrs["no_metadata"] == 0 and frame.attrs["metadata_only"] == 0


def test_isic2019_layout_from_real_csvs_and_the_ham_images(isic2019_dir, isic2019, shared_data):
    assert registry.detect(isic2019_dir).name == "isic2019"
    table = isic2019
    assert len(table) == 10016 and table.attrs["n_listed"] == 25331
    assert table.attrs["dropped_counts"] == {"missing": 25331 - 10016}
    assert len(table.attrs["dropped"]) == 15315 and table.attrs["dropped"][0]["reason"] == "missing"
    assert table.iloc[:5].attrs["dropped"] is table.attrs["dropped"]  # shared, not deep-copied by each step
    assert table.set_index("image_id").loc["ISIC_0000017", "path"].endswith("ISIC_0000017_downsampled.jpg")

    ham_meta = read_metadata(shared_data / "HAM10000_metadata.csv").set_index("image_id")
    in_ham = table[table["image_id"].isin(ham_meta.index)].set_index("image_id")
    assert len(in_ham) == 10015
    # ISIC 2019 splits HAM10000's akiec into AK 130 / SCC 197; the other six classes map one to one.
    akiec = in_ham.loc[ham_meta.index[ham_meta["dx"] == "akiec"], "label"]
    assert akiec.value_counts().to_dict() == {"SCC": 197, "AK": 130}
    mapped, dropped = map_labels(table[table["image_id"].isin(ham_meta.index)], to="ham7")
    assert dropped.empty and mapped["label"].value_counts().to_dict() == HAM_COUNTS
    assert (mapped.set_index("image_id")["label"] == ham_meta.loc[mapped["image_id"], "dx"]).all()
    assert (in_ham["lesion_id"] == ham_meta.loc[in_ham.index, "lesion_id"]).all()
    groups = group_ids(table)[0].set_axis(table["image_id"])
    assert groups["ISIC_0024306"] == "lesion:HAM_0000550"  # the same group as read through ham10000
    # Sex agrees with HAM10000's own wherever both know it (HAM has 57 unknown; ISIC 2019 knows 10 of those).
    ham_sex = ham_meta.loc[in_ham.index, "sex"].replace("unknown", np.nan)
    both = in_ham["sex"].notna() & ham_sex.notna()
    assert (in_ham.loc[both, "sex"] == ham_sex[both]).all() and both.sum() == 10015 - 57


def test_isic2019_without_allow_missing_is_one_line(isic2019_dir):
    with pytest.raises(SkinLesionError) as e:
        registry.read(isic2019_dir, check="none")
    message = str(e.value)
    assert "\n" not in message and "15315 image(s) listed in ISIC_2019_Training_GroundTruth.csv" in message
    assert "--allow-missing" in message


def test_ham_is_inside_isic2019_and_union_keeps_each_image_once(ham, isic2019):
    assert len(ham) == 10015 and ham.attrs["source"] == "ham10000"
    assert group_ids(ham)[0][ham["image_id"] == "ISIC_0024306"].tolist() == ["lesion:HAM_0000550"]
    raw = union([ham, isic2019])  # different label sets: repeats counted, labels not comparable
    assert len(raw) == 10016 and raw.attrs["unchecked_duplicates"] == 10015 and raw.attrs["conflicts"] == []
    assert raw.attrs["duplicates"] == [{"kept": "ham10000", "dropped_from": "isic2019", "rows": 10015}]
    ham7 = [map_labels(t, "ham7")[0] for t in (isic2019, ham)]
    both = union(ham7)
    assert both.attrs["rows_per_source"] == {"isic2019": 10016}
    assert both.attrs["conflicts"] == [] and both.attrs["unchecked_duplicates"] == 0
    # A wrong label on one HAM image is reported as a conflict after mapping.
    broken = ham7[1].copy()
    broken.loc[broken["image_id"] == "ISIC_0024306", "label"] = "mel"
    conflicts = union([ham7[0], broken]).attrs["conflicts"]
    assert conflicts == [{"image_id": "ISIC_0024306", "kept": "isic2019", "kept_label": "nv",
                          "dropped_from": "ham10000", "dropped_label": "mel"}]  # fmt: skip


def test_ham_sites_map_onto_isic_general_sites_as_isic2019_assigned_them(ham, isic2019):
    isic_site = pd.read_csv(Path(isic2019.attrs["metadata_file"]), dtype=str, keep_default_na=False)
    isic_site = isic_site.set_index("image")["anatom_site_general"].replace("", np.nan)
    ours = ham.set_index("image_id")["site"]
    general = pd.Series(ours.map(GENERAL_SITE), index=ours.index)
    isic = isic_site.loc[ours.index]
    known = isic.notna()
    assert (general[known] == isic[known]).all() and known.sum() == 10015 - 1404 - 234 - 48
    # ISIC 2019 left HAM's trunk, genital and unknown sites blank.
    assert set(ours[~known].fillna("unknown")) == {"trunk", "genital", "unknown"}
    isic_read = isic2019.set_index("image_id").loc[ours.index, "site"]
    assert set(isic_read[ours == "back"]) == {"back"}  # posterior torso -> back, one to one


def test_isic2020_subset(shared_data):
    table = registry.read(shared_data / "isic2020_subset")
    assert len(table) == 826 and table["patient_id"].nunique() == 34 and table["patient_id"].notna().all()
    assert table.attrs["label_counts"] == {"unknown": 792, "nevus": 18, "melanoma": 16}
    assert (table["target"] == 1).sum() == 16 and table.attrs["target_disagrees"] == 0
    assert table["sex"].value_counts().to_dict() == {"female": 468, "male": 358}
    assert table["site"].value_counts().to_dict()["trunk"] == 344 and table["site"].isna().sum() == 1
    ids, levels = group_ids(table)
    assert levels == {"isic2020": {"patient": 826}} and ids.nunique() == 34
    mapped, dropped = map_labels(table, "ham7")
    assert mapped["label"].value_counts().to_dict() == {"nv": 18, "mel": 16}
    assert dropped[["label", "rows"]].values.tolist() == [["unknown", 792]]
    binary = registry.read(shared_data / "isic2020_subset", label_field="target")
    assert binary.attrs["label_set"] == "melanoma-binary"
    assert binary["label"].value_counts().to_dict() == {"other": 810, "mel": 16}


def test_isic2020_full_ground_truth_and_its_duplicates(shared_data):
    folder = shared_data / "isic2020_csv"
    full = read_isic2020_csv(folder / "ISIC_2020_Training_GroundTruth.csv")
    assert len(full) == 33126 and full["patient_id"].nunique() == 2056
    duplicates = folder / "ISIC_2020_Training_Duplicates.csv"
    frame = read_isic2020_csv(folder / "ISIC_2020_Training_GroundTruth.csv", duplicates)
    pairs = pd.read_csv(duplicates, dtype=str)
    assert len(frame) == 33126 - 425 and set(frame.attrs["duplicates_removed"]) == set(pairs["image_name_2"])
    assert frame.attrs["target_disagrees"] == 0
    table = frame.assign(source="isic2020", label_set="isic2020")
    mapped, dropped = map_labels(table, "ham7")
    # seborrheic keratosis 135 + lentigo NOS 44 + lichenoid keratosis 35 + solar lentigo 7 -> bkl
    assert mapped["label"].value_counts().to_dict() == {"nv": 5191, "mel": 581, "bkl": 221}
    assert dict(zip(dropped["label"], dropped["rows"], strict=True)) == {
        "atypical melanocytic proliferation": 1, "cafe-au-lait macule": 1, "unknown": 26706}  # fmt: skip


def test_patient_and_lesion_grouped_split_keeps_groups_whole(shared_data, ham):
    """5 StratifiedGroupKFold folds over ISIC 2020 (patients) + HAM10000 (lesions), stratified by class x source:
    no patient or lesion is in two folds, and every fold holds both sources."""
    isic = map_labels(registry.read(shared_data / "isic2020_subset"), "melanoma-binary")[0]
    both = union([isic, map_labels(ham, "melanoma-binary")[0]])
    ids, levels = group_ids(both)
    assert levels == {"isic2020": {"patient": 826}, "ham10000": {"lesion": 10015}}
    folds = lesion_folds(strata(both).to_numpy(), ids.to_numpy(), 5, seed=0)
    assert (pd.Series(folds).groupby(ids.to_numpy()).nunique() == 1).all()
    per_fold = pd.crosstab(folds, both["source"])
    assert (per_fold > 0).all().all() and per_fold["isic2020"].sum() == 826
    mel = pd.crosstab(folds, strata(both))["mel|ham10000"]
    assert mel.min() > 0.15 * 1113 and mel.max() < 0.25 * 1113  # classes spread evenly
    # ISIC 2020 alone, by patient.
    isic_ids, _ = group_ids(isic)
    isic_folds = lesion_folds(strata(isic).to_numpy(), isic_ids.to_numpy(), 5, seed=1)
    assert (pd.Series(isic_folds).groupby(isic_ids.to_numpy()).nunique() == 1).all()
    assert set(isic_folds) == set(range(5))
