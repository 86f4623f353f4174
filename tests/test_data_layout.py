"""Layout detection, metadata parsing and file checks of skinlesion.data.ham10000."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.classes import CLASSES
from skinlesion.data.ham10000 import check_files, load_table, read_metadata, sample_dir
from skinlesion.data.synth import write_synthetic
from skinlesion.errors import SkinLesionError

REAL_METADATA = Path(__file__).parent / "data" / "HAM10000_metadata.csv"


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("layout") / "ham", n_per_class=3, size=(40, 30), seed=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_real_metadata_is_parsed_into_a_typed_table():
    meta = read_metadata(REAL_METADATA)
    assert len(meta) == 10015
    assert meta["lesion_id"].nunique() == 7470
    assert meta["age"].dtype == np.float64 and meta["age"].isna().sum() == 57
    expected = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
    assert meta["dx"].value_counts().to_dict() == expected
    assert "unknown" in set(meta["sex"]) and "unknown" in set(meta["localization"])
    assert list(meta.columns) == ["image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization"]


def test_single_folder_layout_and_overrides(small_synth, tmp_path):
    table = load_table(small_synth)
    assert table.attrs["layout"] == "folder" and len(table) == 21
    assert all(Path(p).is_absolute() and Path(p).parent.name == "images" for p in table["path"])
    assert set(table["dx"]) == set(CLASSES)

    # Images right beside the metadata, one as .png and one as .jpeg; metadata as Dataverse's tab-separated .tab.
    flat = tmp_path / "flat"
    flat.mkdir()
    meta = pd.read_csv(small_synth / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    meta.to_csv(flat / "HAM10000_metadata.tab", sep="\t", index=False)
    for i, img in enumerate(sorted((small_synth / "images").iterdir())):
        suffix = {0: ".png", 1: ".jpeg"}.get(i, ".jpg")
        Image.open(img).save(flat / (img.stem + suffix))
    flat_table = load_table(flat)
    assert len(flat_table) == 21
    assert {Path(p).suffix for p in flat_table["path"]} == {".png", ".jpeg", ".jpg"}

    # --metadata / --images override detection.
    other = tmp_path / "elsewhere"
    (other / "pics").mkdir(parents=True)
    meta = other / "labels.csv"
    shutil.copy(small_synth / "HAM10000_metadata.csv", meta)
    for img in (small_synth / "images").iterdir():
        shutil.copy(img, other / "pics")
    over = load_table(metadata=meta, images=other / "pics")
    assert over.attrs["layout"] == "explicit" and len(over) == 21
    assert all(Path(p).parent == (other / "pics").resolve() for p in over["path"])


def test_kaggle_layout_with_lower_case_copies(small_synth, tmp_path):
    root = tmp_path / "kaggle"
    root.mkdir()
    shutil.copy(small_synth / "HAM10000_metadata.csv", root)
    images = sorted((small_synth / "images").iterdir())
    for part, chunk in (("1", images[:10]), ("2", images[10:])):
        for name in (f"HAM10000_images_part_{part}", f"ham10000_images_part_{part}"):
            (root / name).mkdir()
            for img in chunk:
                shutil.copy(img, root / name)
    table = load_table(root)
    assert table.attrs["layout"] == "kaggle"
    assert len(table) == 21 and table["image_id"].is_unique
    # The upper-case folders come first; the lower-case copies are not reported as duplicates.
    assert {Path(p).parent.name for p in table["path"]} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert table.attrs["duplicate_files"] == []


def test_isic2018_one_hot_layout(small_synth, tmp_path):
    meta = pd.read_csv(small_synth / "HAM10000_metadata.csv")
    root = tmp_path / "isic"
    gt_dir, inputs = root / "ISIC2018_Task3_Validation_GroundTruth", root / "ISIC2018_Task3_Validation_Input"
    gt_dir.mkdir(parents=True)
    inputs.mkdir()
    codes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    onehot = pd.DataFrame({"image": meta["image_id"]})
    for code in codes:
        onehot[code] = (meta["dx"].str.upper() == code).astype(float)
    onehot.to_csv(gt_dir / "ISIC2018_Task3_Validation_GroundTruth.csv", index=False)
    for img in (small_synth / "images").iterdir():
        shutil.copy(img, inputs)
    (inputs / "LICENSE.txt").write_text("CC-BY-NC")

    table = load_table(root)
    assert table.attrs["layout"] == "isic2018"
    merged = table.merge(meta, on="image_id", suffixes=("", "_true"))
    assert len(merged) == 21 and (merged["dx"] == merged["dx_true"]).all()
    assert (table["lesion_id"] == table["image_id"]).all()  # unknown lesions: one per image
    assert table["age"].isna().all()

    groupings = meta.rename(columns={"image_id": "image"})[["image", "lesion_id"]]
    groupings["diagnosis_confirm_type"] = "histopathology"
    groupings.to_csv(root / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    grouped = load_table(root).merge(meta, on="image_id", suffixes=("", "_true"))
    assert (grouped["lesion_id"] == grouped["lesion_id_true"]).all()
    assert set(grouped["dx_type"]) == {"histopathology"}


def test_missing_metadata_or_image_folder_names_the_layouts(tmp_path, small_synth):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SkinLesionError, match="no metadata CSV.*Kaggle.*one folder.*ISIC 2018"):
        load_table(tmp_path / "empty")
    no_images = tmp_path / "noimg"
    no_images.mkdir()
    shutil.copy(small_synth / "HAM10000_metadata.csv", no_images)
    with pytest.raises(SkinLesionError, match="no image folder found.*HAM10000_images_part_1"):
        load_table(no_images)
    with pytest.raises(SkinLesionError, match="does not exist"):
        load_table(tmp_path / "nowhere")


def test_duplicate_rows_are_reported_and_conflicts_refused(small_synth, tmp_path):
    root = _copy(small_synth, tmp_path / "dups")
    meta = pd.read_csv(root / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    pd.concat([meta, meta.iloc[[0]]]).to_csv(root / "HAM10000_metadata.csv", index=False)
    table = load_table(root)
    assert len(table) == 21 and table.attrs["duplicate_rows"] == [meta["image_id"][0]]

    clash = meta.iloc[[0]].assign(dx="nv" if meta["dx"][0] != "nv" else "mel")
    pd.concat([meta, clash]).to_csv(root / "HAM10000_metadata.csv", index=False)
    with pytest.raises(SkinLesionError, match=f"listed twice with different dx: {meta['image_id'][0]}"):
        load_table(root)


def test_quick_and_full_checks(small_synth, tmp_path):
    good = sorted((small_synth / "images").iterdir())[0]
    empty, text, truncated = tmp_path / "e.jpg", tmp_path / "t.jpg", tmp_path / "tr.jpg"
    empty.write_bytes(b"")
    text.write_text("not an image at all")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    paths = [str(good), str(empty), str(text), str(truncated), str(tmp_path / "gone.jpg")]
    assert check_files(paths, "quick") == [None, "empty file", "not a JPEG or PNG", None, "missing"]
    full = check_files(paths, "full")
    assert full[:3] == [None, "empty file", "not a JPEG or PNG"] and full[4] == "missing"
    assert full[3].startswith("corrupt")


def test_bundled_sample_is_class_balanced_real_data():
    table = load_table()
    assert table.attrs["data_dir"] == str(sample_dir().resolve())
    counts = table["dx"].value_counts()
    assert set(counts.index) == set(CLASSES) and counts.max() <= 100 and 600 <= len(table) <= 800
    real = read_metadata(REAL_METADATA).set_index("image_id")
    # Whole lesions only: every image of each sampled lesion is in the sample.
    sampled = set(table["lesion_id"])
    assert set(real.index[real["lesion_id"].isin(sampled)]) == set(table["image_id"])
    assert "CC BY-NC-SA 4.0" in (sample_dir() / "NOTICE.md").read_text()
    ages = table.set_index("image_id")["age"]
    assert all(
        math.isclose(a, b) or (math.isnan(a) and math.isnan(b))
        for a, b in zip(ages, real.loc[ages.index, "age"], strict=True)
    )
