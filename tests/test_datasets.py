"""Beyond HAM10000 from the command line: the class set belongs to the run, sources are recognised per folder,
several sources train together (each image once, grouped by patient where known, a source column throughout),
other label sets are mapped, and an external set that knows only melanoma yes / no is scored melanoma vs rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import skinlesion
from skinlesion.cli import main
from skinlesion.data.datasets import DataSpec, load_dataset
from skinlesion.data.split import make_split
from skinlesion.data.synth import write_synthetic
from skinlesion.data.synth_sources import CSV_OPTIONS, write_layout
from skinlesion.model import checkpoint

TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--epochs", "1", "--batch-size",
        "16", "--workers", "0", "--logger", "none"]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    out = {"ham": write_synthetic(root / "ham", n_per_class=8, size=(80, 60), seed=1)}
    for layout in ("isic2020", "isic2019", "pad-ufes-20", "csv"):
        out[layout] = write_layout(root / layout, layout, n_per_class=6, size=(80, 60), seed=2)
    return out


@pytest.fixture(scope="module")
def multi_run(folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi")
    argv = ["train", "--data-dir", str(folders["ham"]), "--data-dir", str(folders["isic2020"]), "--data-dir",
            str(folders["pad-ufes-20"]), "--out", str(out), "--run-name", "multi", *TINY]  # fmt: skip
    assert main(argv) == 0
    return out / "multi"


def test_several_sources_train_together_with_a_source_column(multi_run, capsys):
    splits = pd.read_csv(multi_run / "splits.csv")
    assert set(splits["source"]) == {"ham10000", "isic2020", "pad-ufes-20"}
    for column in ("group_id", "lesion_id"):  # no patient, lesion or image in two parts
        assert (splits.groupby(column)["split"].nunique() == 1).all(), column
    assert splits.loc[splits["source"] == "isic2020", "group_id"].str.startswith("patient:").all()
    config = json.loads((multi_run / "config.json").read_text())
    assert len(config["data_dir"]) == 3 and config["classes"] == "ham7"
    assert config["class_codes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert main(["evaluate", "--run-dir", str(multi_run), "--bootstrap", "10"]) == 0
    metrics = json.loads((multi_run / "metrics.json").read_text())
    predictions = pd.read_csv(multi_run / "predictions.csv")
    assert set(metrics["per_source"]) == set(predictions["source"]) and len(metrics["per_source"]) >= 2
    for name, scored in metrics["per_source"].items():
        assert scored["n_images"] == int((predictions["source"] == name).sum())
    assert "isic2020" in capsys.readouterr().out
    # patients are the bootstrap's units where a source knows them: predictions.csv says which
    patients = predictions.loc[predictions["source"] != "ham10000", "group_id"]
    assert len(patients) and patients.str.startswith("patient:").all()


def test_pad_ufes_labels_map_into_ham7(folders):
    table = load_dataset(DataSpec((str(folders["pad-ufes-20"]),)))
    mapped = table.groupby("source_label")["dx"].unique().map(list).to_dict()
    assert mapped == {"ACK": ["akiec"], "BCC": ["bcc"], "MEL": ["mel"], "NEV": ["nv"], "SCC": ["akiec"],
                      "SEK": ["bkl"]}  # fmt: skip
    assert table["group_id"].str.startswith("patient:").all()


def test_another_label_set_belongs_to_the_run(folders, tmp_path, capsys):
    argv = ["train", "--data-dir", str(folders["isic2019"]), "--classes", "isic2019", "--out", str(tmp_path),
            "--run-name", "i19", *TINY]  # fmt: skip
    assert main(argv) == 0
    run = tmp_path / "i19"
    meta = checkpoint.read(run)
    assert meta["classes"] == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]  # UNK has no image: no class
    assert meta["class_names"]["AK"] == "Actinic keratosis"
    model = skinlesion.load(run)
    assert model.classes == meta["classes"] and model.class_names["SCC"] == "Squamous cell carcinoma"
    image = next((folders["isic2019"] / "ISIC_2019_Training_Input").glob("*.jpg"))
    assert main(["export", "--run-dir", str(run)]) == 0
    onnx = skinlesion.load(run / "model.onnx")
    assert onnx.classes == meta["classes"] and onnx.class_names == model.class_names
    capsys.readouterr()
    assert main(["predict", "--run-dir", str(run), str(image), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["classes"] == meta["classes"] and doc["predictions"][0]["prediction"] in meta["classes"]
    assert doc["predictions"][0]["prediction_name"] == meta["class_names"][doc["predictions"][0]["prediction"]]
    from fastapi.testclient import TestClient

    from skinlesion.serve.app import create_app

    info = TestClient(create_app(run, backend="torch")).get("/api/model").json()
    assert info["classes"] == meta["classes"] and info["full_names"]["BKL"].startswith("Benign keratosis")


def test_the_generic_csv_and_an_unknown_label_set_are_one_line_errors(folders, tmp_path, capsys):
    csv = [f"--{k.replace('_', '-')}={v}" for k, v in CSV_OPTIONS.items()]
    assert main(["split", "--data-dir", str(folders["csv"]), *csv, "--out", str(tmp_path / "s.csv")]) == 0
    assert set(pd.read_csv(tmp_path / "s.csv")["dx"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    capsys.readouterr()
    assert main(["split", "--data-dir", str(tmp_path), "--out", str(tmp_path / "t.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no known data layout" in err[0]


def test_patients_never_cross_parts_on_real_isic_2020(shared_data):
    table = load_dataset(DataSpec((str(shared_data / "isic2020_subset"),), classes="melanoma-binary",
                                  label_field="target"))  # fmt: skip
    assert table["patient_id"].nunique() == 34 and (table["dx"] == "mel").sum() == 16
    for folds in (None, 5):
        for fold in range(folds or 1):
            split = make_split(table, folds=folds, fold=fold, seed=0) if folds else make_split(table, seed=0)
            assert (split.groupby("group_id")["split"].nunique() == 1).all()
            assert split["group_id"].str.startswith("patient:").all()


def test_a_ham_run_is_scored_melanoma_vs_rest_on_real_isic_2020(tiny_run, shared_data, tmp_path, capsys):
    """ISIC 2020's images are 96 % 'unknown' benign lesions no HAM10000 class names: auto scores melanoma vs the
    rest (the task the challenge set), with patient-level intervals."""
    assert main(["evaluate", "--run-dir", str(tiny_run), "--data-dir", str(shared_data / "isic2020_subset"),
                 "--name", "isic2020", "--bootstrap", "50"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    metrics = json.loads((tiny_run / "eval_isic2020" / "metrics.json").read_text())
    overlap = metrics["overlap_with_training"]["images"]  # synthetic ids ISIC_9xxxxxx may meet a real one
    assert metrics["task"] == "melanoma" and metrics["n_images"] == 826 - overlap and overlap <= 2
    assert metrics["n_melanomas"] >= 15
    assert metrics["n_groups"] in (33, 34)  # patients: the bootstrap unit
    for key in ("auc", "auc_80", "sensitivity", "specificity", "average_precision"):
        assert key in metrics["melanoma"] and key in out
    auc = metrics["melanoma"]["auc"]["value"]
    predictions = pd.read_csv(tiny_run / "eval_isic2020" / "predictions.csv")
    from sklearn.metrics import roc_auc_score

    assert auc == pytest.approx(roc_auc_score(predictions["y_true"] == "mel", predictions["p_mel"]))
    assert np.isin(predictions["y_true"], ["mel", "other"]).all()


def test_a_run_folder_from_before_label_sets_still_reads(tmp_path):
    """config.json of runs made before the class set was an option lists the class codes under ``classes``."""
    import json

    from skinlesion.data.run_folder import read_config
    from skinlesion.errors import SkinLesionError

    codes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    (tmp_path / "config.json").write_text(json.dumps({"classes": codes, "data_dir": None}))
    assert read_config(tmp_path)["classes"] == codes
    (tmp_path / "config.json").write_text(json.dumps({"classes": [1, 2]}))
    with pytest.raises(SkinLesionError, match="classes must be text or null"):
        read_config(tmp_path)
