"""Source readers on synthetic layouts (data.synth_sources): detection, the common table, grouping, union, and a
one-line error for every kind of malformed input."""

from __future__ import annotations

import inspect
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from skinlesion.data.sources import registry
from skinlesion.data.sources.contract import COLUMNS, clean_age
from skinlesion.data.sources.grouping import group_ids
from skinlesion.data.sources.union import union
from skinlesion.data.synth import write_synthetic
from skinlesion.data.synth_sources import CSV_OPTIONS, LAYOUTS, write_layout
from skinlesion.data.taxonomy import map_labels
from skinlesion.errors import SkinLesionError


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {name: write_layout(root / name, name, n_per_class=3, size=(40, 30), seed=3) for name in LAYOUTS}


def _copy(layouts: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(layouts[name], tmp_path / name))


def _one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(SkinLesionError) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_each_layout_is_detected_and_read_into_the_common_table(layouts):
    expected = {"isic2019": 24, "isic2020": 15, "pad-ufes-20": 18, "csv": 21, "imagefolder": 21}
    for name, folder in layouts.items():
        options = CSV_OPTIONS if name == "csv" else {}
        if name != "csv":
            assert registry.detect(folder).name == name
        table = registry.read(folder, source=name if name == "csv" else None, **options)
        assert list(table.columns[: len(COLUMNS)]) == list(COLUMNS), name
        assert len(table) == expected[name] and table["image_id"].is_unique, name
        assert (table["source"] == name).all() and table["path"].map(lambda p: Path(p).is_file()).all()
        assert table["age"].dtype == float and set(table["sex"].dropna()) <= {"male", "female"}
        assert table.attrs["source"] == name and sum(table.attrs["label_counts"].values()) == len(table)
    assert registry.get_source("PAD").name == "pad-ufes-20" and registry.get_source("isic2018").name == "ham10000"


def test_source_descriptions_and_reader_options_agree():
    for source in registry.SOURCES.values():
        params = inspect.signature(source.reader).parameters
        assert set(source.options) <= set(params) and {"allow_missing", "check", "progress"} <= set(params)
        assert source.layout and source.licence and source.citation
        if source.label_set:
            assert source.labels().codes
    assert registry.SOURCES["pad-ufes-20"].licence == "CC BY 4.0"


def test_isic2019_quirks(layouts):
    table = registry.read(layouts["isic2019"])
    # The first image of each class is stored as <id>_downsampled.jpg; the id drops the suffix.
    downsampled = table[table["path"].str.endswith("_downsampled.jpg")]
    assert len(downsampled) == 8 and table.attrs["downsampled"] == 8
    assert not table["image_id"].str.contains("downsampled").any()
    assert downsampled["lesion_id"].isna().all() and table["lesion_id"].notna().sum() == 16
    ids, levels = group_ids(table)
    assert levels == {"isic2019": {"lesion": 16, "image": 8}}
    assert ids[table["lesion_id"].isna()].str.startswith("image:ISIC_").all()


def test_isic2019_malformed_ground_truth(layouts, tmp_path):
    folder = _copy(layouts, "isic2019", tmp_path)
    gt = folder / "ISIC_2019_Training_GroundTruth.csv"
    good = pd.read_csv(gt, dtype=str)
    bad = good.copy()
    bad.loc[0, "MEL"] = "0.0"  # sums to 0
    bad.loc[[1, 2], "NV"] = "1.0"  # MEL and NV: sums to 2
    bad.to_csv(gt, index=False)
    message = _one_line_error(registry.read, folder)
    assert "1 sum to 0 (ISIC_9100000_downsampled)" in message and "2 sum to 2 (ISIC_9100001, ISIC_9100002)" in message
    bad = good.copy()
    bad.loc[0, "MEL"] = "yes"
    bad.to_csv(gt, index=False)
    assert "values other than 0 and 1" in _one_line_error(registry.read, folder)
    good.assign(EXTRA="0.0").to_csv(gt, index=False)
    assert "unknown column(s) EXTRA" in _one_line_error(registry.read, folder)
    good.drop(columns=["SCC"]).to_csv(gt, index=False)
    assert "missing column(s) SCC" in _one_line_error(registry.read, folder)
    good.to_csv(gt, index=False, sep=";")
    message = _one_line_error(registry.read, folder)
    assert "separated by semicolons; a ISIC 2019 ground truth is comma-separated" in message
    good.to_csv(gt, index=False, sep="\t")
    assert "separated by tabs" in _one_line_error(registry.read, folder)
    repeated = good.loc[4, "image"]  # an NV image
    pd.concat([good, good.iloc[[4]]]).to_csv(gt, index=False)  # the same row twice: kept once, reported
    assert list(registry.read(folder).attrs["duplicate_rows"]) == [repeated]
    twice = good.iloc[[4]].assign(MEL="1.0", NV="0.0")
    pd.concat([good, twice]).to_csv(gt, index=False)
    assert f"listed twice with different labels: {repeated}" in _one_line_error(registry.read, folder)


def test_isic2020_patients_duplicates_and_target(layouts, tmp_path):
    table = registry.read(layouts["isic2020"])
    assert list(table.attrs["duplicates_removed"]) == ["ISIC_9299999"] and not table.attrs["extra_files"]
    ids, levels = group_ids(table)
    assert levels == {"isic2020": {"patient": 15}} and ids.str.startswith("patient:IP_").all()
    binary = registry.read(layouts["isic2020"], label_field="target")
    assert binary["label"].value_counts().to_dict() == {"other": 12, "mel": 3}
    assert "label_field must be one of" in _one_line_error(registry.read, layouts["isic2020"], label_field="x")
    folder = _copy(layouts, "isic2020", tmp_path)
    csv = pd.read_csv(folder / "train.csv", dtype=str, keep_default_na=False)
    csv.loc[4, "diagnosis"] = "dysplastic nevus"
    csv.to_csv(folder / "train.csv", index=False)
    message = _one_line_error(registry.read, folder)
    assert "1 row(s) with unknown diagnosis: 'dysplastic nevus' (1 row)" in message and "lentigo NOS" in message


def test_pad_ufes_20_columns(layouts, tmp_path):
    table = registry.read(layouts["pad-ufes-20"])
    raw = pd.read_csv(layouts["pad-ufes-20"] / "metadata.csv", dtype=str, keep_default_na=False)
    assert table["image_id"].tolist() == [Path(n).stem for n in raw["img_id"]]
    assert {Path(p).parent.name for p in table["path"]} == {"imgs_part_1", "imgs_part_2"}
    assert set(table["fitzpatrick"].dropna()) <= {1.0, 2.0, 3.0} and table["fitzpatrick"].isna().any()
    assert (table["dx_type"][table["label"].isin(["BCC", "SCC", "MEL"])] == "histo").all()
    assert table["sex"].isna().sum() == (raw["gender"] == "").sum()
    assert set(table["site"]) <= {"abdomen", "upper extremity", "back", "chest", "ear", "face", "foot", "hand", "neck",
                                  "scalp", "lower extremity"}  # fmt: skip
    ids, levels = group_ids(table)
    assert levels == {"pad-ufes-20": {"patient": 18}} and ids.str.startswith("patient:pad-ufes-20:PAT_").all()
    mapped, _ = map_labels(table, "ham7")
    assert mapped["label"].value_counts().to_dict() == {"akiec": 6, "bcc": 3, "mel": 3, "nv": 3, "bkl": 3}
    folder = _copy(layouts, "pad-ufes-20", tmp_path)
    raw.loc[0, "diagnostic"] = "BOD"
    raw.to_csv(folder / "metadata.csv", index=False)
    assert "unknown diagnostic: 'BOD' (1 row); allowed: ACK, BCC, MEL, NEV, SCC, SEK" in _one_line_error(
        registry.read, folder)  # fmt: skip
    raw.drop(columns=["img_id"]).to_csv(folder / "metadata.csv", index=False)
    assert "no metadata.csv with img_id" in _one_line_error(registry.read, folder)


def test_generic_csv_image_column_forms_and_columns(layouts, tmp_path):
    table = registry.read(layouts["csv"], source="csv", **CSV_OPTIONS)
    assert table.attrs["label_set"] == "ham7" and set(table["label"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv",
                                                                          "vasc"}  # fmt: skip
    raw = pd.read_csv(layouts["csv"] / "labels.csv", dtype=str)
    assert {v.endswith(".jpg") and "/" not in v for v in raw["file"]} == {True, False}  # all three forms used
    assert table["image_id"].tolist() == [Path(v).stem for v in raw["file"]]
    assert table["sex"].isna().sum() == (raw["sex"] == "unknown").sum()
    ids, levels = group_ids(table)
    assert levels == {"csv": {"patient": 21}} and ids.nunique() == 7
    no_patient = registry.read(layouts["csv"], source="csv", **{**CSV_OPTIONS, "patient_col": None}, name="mine")
    assert group_ids(no_patient)[1] == {"mine": {"lesion": 21}} and (no_patient["source"] == "mine").all()
    folder = _copy(layouts, "csv", tmp_path)
    assert "missing column(s) grade" in _one_line_error(registry.read, folder, source="csv",
                                                        **{**CSV_OPTIONS, "label_col": "grade"})  # fmt: skip
    raw.loc[0, "diagnosis"] = "SCC"
    raw.to_csv(folder / "labels.csv", index=False)
    custom = registry.read(folder, source="csv", **CSV_OPTIONS)  # akiec..vasc + SCC fit no named set
    assert custom.attrs["label_set"] == "custom" and "SCC" in set(custom["label"]) and "AKIEC" in set(custom["label"])
    message = _one_line_error(registry.read, folder, source="csv", label_set="ham7", **CSV_OPTIONS)
    assert "unknown diagnosis: 'SCC' (1 row); allowed: akiec," in message
    (folder / "images" / "sub").mkdir()
    shutil.copyfile(folder / "images" / "img_9300001.jpg", folder / "images" / "sub" / "img_9300001.jpg")
    raw.loc[0, "file"] = "sub/img_9300001.jpg"
    raw.to_csv(folder / "labels.csv", index=False)
    assert "several files share a name stem" in _one_line_error(registry.read, folder, source="csv", **CSV_OPTIONS)
    assert "has no option part" in _one_line_error(registry.read, folder, source="csv", part="x")


def test_image_folder(layouts, tmp_path):
    table = registry.read(layouts["imagefolder"], label_set="ham7")
    assert table.attrs["label_counts"] == dict.fromkeys(("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"), 3)
    assert group_ids(table)[1] == {"imagefolder": {"image": 21}}
    folder = _copy(layouts, "imagefolder", tmp_path)
    shutil.copyfile(folder / "nv" / "img_9405000.jpg", folder / "mel" / "img_9405000.jpg")
    assert "same file name in several class folders: img_9405000 (mel, nv)" in _one_line_error(registry.read, folder)


def test_missing_and_corrupt_images(layouts, tmp_path):
    folder = _copy(layouts, "pad-ufes-20", tmp_path)
    gone = sorted((folder / "images" / "imgs_part_1").iterdir())[0]
    gone.unlink()
    corrupt = sorted((folder / "images" / "imgs_part_2").iterdir())[0]
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    message = _one_line_error(registry.read, folder)  # quick check: only the missing one
    assert f"1 image(s) listed in metadata.csv cannot be used (1 missing, 0 unreadable): {gone.stem}" in message
    table = registry.read(folder, allow_missing=True)  # decodes every file: the truncated PNG goes too
    assert len(table) == 16 and table.attrs["check"] == "full"
    assert {d["image_id"]: d["reason"].split(" ")[0] for d in table.attrs["dropped"]} == {
        gone.stem: "missing", corrupt.stem: "corrupt"}  # fmt: skip


def test_ages_sexes_and_unknown_values_are_cleaned():
    ages, invalid, missing = clean_age(pd.Series(["45", "-5", "130", "inf", "abc", "", "unknown", "0", "120", "nan"]))
    assert ages.iloc[[0, 7, 8]].tolist() == [45.0, 0.0, 120.0] and ages.isna().sum() == 7
    assert (invalid, missing) == (4, 3)  # -5, 130, inf, abc; empty, unknown and nan are missing
    assert all(math.isnan(a) for a in ages.iloc[1:7])


def test_detect_explains_what_is_missing(layouts, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _one_line_error(registry.detect, empty)
    for part in ("ham10000: no HAM10000_metadata.csv", "isic2019: no ISIC_2019_Training_GroundTruth.csv",
                 "isic2020: no train.csv", "pad-ufes-20: no metadata.csv", "imagefolder: no two class sub-folders"):
        assert part in message  # fmt: skip
    both = _copy(layouts, "isic2020", tmp_path)
    for item in (layouts["pad-ufes-20"] / "metadata.csv", layouts["pad-ufes-20"] / "images"):
        (shutil.copytree if item.is_dir() else shutil.copyfile)(item, both / item.name)
    assert "several sources (isic2020, pad-ufes-20)" in _one_line_error(registry.detect, both)
    assert "does not exist" in _one_line_error(registry.read, tmp_path / "nowhere")
    assert "unknown source 'isic2018x'" in _one_line_error(registry.read, empty, source="isic2018x")


def test_union_of_synthetic_sources_and_group_namespaces(layouts):
    pad = map_labels(registry.read(layouts["pad-ufes-20"]), "ham7")[0]
    csv = map_labels(registry.read(layouts["csv"], source="csv", **CSV_OPTIONS), "ham7")[0]
    clash = csv.copy()
    clash.loc[0, ["image_id", "label"]] = [pad.loc[0, "image_id"], "vasc"]  # same id, other label
    both = union([pad, clash])
    assert len(both) == len(pad) + len(csv) - 1 and both["image_id"].is_unique
    assert both.attrs["duplicates"] == [{"kept": "pad-ufes-20", "dropped_from": "csv", "rows": 1}]
    conflict = {"image_id": pad.loc[0, "image_id"], "kept": "pad-ufes-20", "kept_label": "akiec",
                "dropped_from": "csv", "dropped_label": "vasc"}  # fmt: skip
    assert both.attrs["conflicts"] == [conflict]
    assert "fitzpatrick" in both.columns and both.loc[both["source"] == "csv", "fitzpatrick"].isna().all()
    ids, levels = group_ids(both)
    assert levels == {"pad-ufes-20": {"patient": 18}, "csv": {"patient": 20}}
    assert not set(ids[both["source"] == "csv"]) & set(ids[both["source"] == "pad-ufes-20"])
    assert "lacks column(s) source" in _one_line_error(union, [pad.drop(columns=["source"])])


def test_write_layout_refuses_bad_arguments(tmp_path):
    assert "unknown layout 'ham'" in _one_line_error(write_layout, tmp_path, "ham")
    assert "at least 2" in _one_line_error(write_layout, tmp_path, "csv", n_per_class=1)


def test_ham10000_wrapper_and_its_isic2018_layout(tmp_path):
    ham = write_synthetic(tmp_path / "ham", n_per_class=3, size=(40, 30), seed=2)
    meta = pd.read_csv(ham / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    table = registry.read(ham)
    assert table.attrs["source"] == "ham10000" and table.attrs["layout"] == "folder" and len(table) == 21
    assert table["label"].tolist() == meta["dx"].tolist() and table["lesion_id"].tolist() == meta["lesion_id"].tolist()
    assert table["sex"].isna().sum() == (meta["sex"] == "unknown").sum()
    assert table["site"].isna().sum() == (meta["localization"] == "unknown").sum()
    # ISIC 2018 Task 3 layout of the same images: no lesion groupings -> lesion unknown, each image its own group.
    root = tmp_path / "isic2018"
    onehot = pd.DataFrame({"image": meta["image_id"]})
    for code in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"):
        onehot[code] = (meta["dx"].str.upper() == code).astype(float)
    root.mkdir()
    onehot.to_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    shutil.copytree(ham / "images", root / "ISIC2018_Task3_Training_Input")
    assert registry.detect(root).name == "ham10000"
    assert group_ids(registry.read(root))[1] == {"ham10000": {"image": 21}}
    groupings = meta.rename(columns={"image_id": "image"})[["image", "lesion_id"]]
    groupings.to_csv(root / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    assert group_ids(registry.read(root))[1] == {"ham10000": {"lesion": 21}}
