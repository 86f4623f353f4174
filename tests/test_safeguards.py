"""The evidence a clinical reviewer asks for, from the command line: clinical per-class metrics, subgroups.csv and
risk_coverage.csv from evaluate; conformal sets, a referral rule and an out-of-distribution detector fitted by
calibrate / operating-point, returned by predict (both backends), serve and the Python API through one owner
(decision/safeguards.py); the model card from report and /api/model-card."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import skinlesion
from skinlesion.cli import main
from skinlesion.model import checkpoint


@pytest.fixture(scope="module")
def guarded_run(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("guarded") / "tiny"
    shutil.copytree(tiny_run, run)
    assert main(["calibrate", "--run-dir", str(run), "--conformal", "0.9", "--ood", "energy"]) == 0
    assert main(["operating-point", "--run-dir", str(run), "--referral", "0.8"]) == 0
    return run


def val_images(run: Path, n: int = 6) -> list[Path]:
    from skinlesion.data.run_folder import split_part

    return [Path(p) for p in split_part(run, "val")["path"].head(n)]


def test_the_fitted_safeguards_are_stored(guarded_run):
    meta = checkpoint.read(guarded_run)
    assert meta["conformal"]["method"] == "aps" and meta["conformal"]["alpha"] == pytest.approx(0.1)
    assert meta["ood"]["kind"] == "energy" and meta["ood"]["fitted_on"] == "val"
    assert meta["referral"]["target"]["accuracy"] == 0.8 and 0 <= meta["referral"]["min_confidence"] <= 1


def test_evaluate_writes_clinical_metrics_subgroups_and_risk_coverage(guarded_run, capsys):
    assert main(["evaluate", "--run-dir", str(guarded_run), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    m = json.loads((guarded_run / "metrics.json").read_text())
    predictions = pd.read_csv(guarded_run / "predictions.csv")
    for c, entry in m["clinical"]["per_class"].items():
        truth, decided = predictions["y_true"] == c, predictions["y_pred"] == c
        if truth.any():
            assert entry["sensitivity"]["value"] == pytest.approx((truth & decided).sum() / truth.sum())
            assert entry["sensitivity"]["value"] == pytest.approx(m["per_class"][c]["recall"]["value"])
        if (~truth).any():
            assert entry["specificity"]["value"] == pytest.approx((~truth & ~decided).sum() / (~truth).sum())
        assert {"ppv", "npv", "auc", "auc_80", "average_precision"} <= set(entry)
    assert set(m["clinical"]["melanoma"]["sensitivity_at_specificity"]) == {"0.8", "0.9", "0.95"}
    subgroups = pd.read_csv(guarded_run / "subgroups.csv")
    assert subgroups.loc[0, "attribute"] == "overall" and {"sex", "age", "body_site"} <= set(subgroups["attribute"])
    assert subgroups["small"].any()  # tiny groups are marked, not hidden
    risk = pd.read_csv(guarded_run / "risk_coverage.csv")
    assert risk["coverage"].is_monotonic_increasing or risk["coverage"].is_monotonic_decreasing
    found = m["safeguards"]
    assert found["conformal"]["coverage"] >= 0.5 and found["conformal"]["mean_size"] >= 1
    assert 0 <= found["ood"]["rate"] <= 1 and found["referred"]["images"] >= found["ood"]["refused"]
    assert "sensitivity" in out and "conformal sets" in out and "referred to a dermatologist" in out


def test_predict_api_serve_and_onnx_return_the_same_safeguards(guarded_run, capsys):
    files = val_images(guarded_run)
    model = skinlesion.load(guarded_run)
    frame = model.predict_files(files)
    decisions, guarded = model.assess(files)
    assert frame["refer"].tolist() == guarded.refer.tolist()
    assert frame["prediction_set"].tolist() == [";".join(guarded.set_of(i, tuple(model.classes))) for i in range(6)]
    assert all(frame.loc[i, "prediction"] in frame.loc[i, "prediction_set"].split(";") for i in range(6)
               if not frame.loc[i, "out_of_distribution"])  # fmt: skip
    assert main(["export", "--run-dir", str(guarded_run)]) == 0
    for backend in ("torch", "onnx"):
        capsys.readouterr()
        assert main(["predict", "--run-dir", str(guarded_run), "--backend", backend, "--format", "json",
                     *map(str, files)]) == 0  # fmt: skip
        rows = json.loads(capsys.readouterr().out)["predictions"]
        assert [r["refer"] for r in rows] == guarded.refer.tolist(), backend
        assert [r["prediction_set"] for r in rows] == [guarded.set_of(i, tuple(model.classes)) for i in range(6)]
    from fastapi.testclient import TestClient

    from skinlesion.serve.app import create_app

    client = TestClient(create_app(guarded_run, backend="torch"))
    with open(files[0], "rb") as f:
        body = client.post("/api/predict", files={"file": ("x.jpg", f, "image/jpeg")}).json()
    assert body["refer"] == bool(guarded.refer[0]) and body["prediction_set"] == guarded.set_of(0, tuple(model.classes))
    card = client.get("/api/model-card").json()
    assert card["safeguards"]["conformal"].startswith("APS") and card["intended_use"] and card["licences"]


def test_an_out_of_distribution_image_gets_no_diagnosis(guarded_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(guarded_run, run)
    detector = {**checkpoint.read(run)["ood"], "threshold": -1e9}  # everything is out of distribution
    checkpoint.set_entry(run, "ood", detector)
    files = val_images(run, 2)
    frame = skinlesion.load(run).predict_files(files)
    assert frame["out_of_distribution"].all() and frame["prediction"].isna().all() and frame["refer"].all()
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["predict", "--run-dir", str(run), *map(str, files)]) == 0
    assert all(" ood " in line or line.rstrip().endswith("ood") or " ood  " in line for line in
               out.getvalue().splitlines()[1:3])  # fmt: skip


def test_report_writes_the_model_card(guarded_run, capsys):
    assert main(["evaluate", "--run-dir", str(guarded_run), "--bootstrap", "20"]) == 0
    assert main(["report", "--run-dir", str(guarded_run), "--no-gallery", "--grid-per-class", "1"]) == 0
    card = json.loads((guarded_run / "model_card.json").read_text())
    text = (guarded_run / "model_card.md").read_text()
    assert card["training_data"]["n_images"] == len(pd.read_csv(guarded_run / "splits.csv"))
    assert "Intended use" in text and "Known limitations" in text and "CC BY-NC-SA 4.0" in text
    html = (guarded_run / "report.html").read_text()
    assert "Clinical metrics" in html and "Safeguards" in html and "subgroups.png" in str(
        list((guarded_run / "figures").glob("*.png")))  # fmt: skip
    assert np.isfinite(card["metrics"]["balanced_accuracy"]["value"])


def test_auto_backend_keeps_to_torch_when_the_detector_reads_features(guarded_run, tmp_path, capsys):
    """A Mahalanobis detector needs pooled features, which the ONNX file does not give: `auto` passes the ONNX
    export over (with a note) instead of failing at start; energy-only runs still get ONNX Runtime."""
    from skinlesion.inference import selection

    run = tmp_path / "maha"
    shutil.copytree(guarded_run, run)
    assert main(["export", "--run-dir", str(run)]) == 0
    assert selection.choose(run, "auto").backend == "onnx"  # energy: logits suffice
    assert main(["calibrate", "--run-dir", str(run), "--ood", "mahalanobis"]) == 0
    assert main(["export", "--run-dir", str(run)]) == 0
    choice = selection.choose(run, "auto")
    assert choice.backend == "torch" and any("pooled features" in n for n in choice.notes)
    capsys.readouterr()
    assert main(["predict", "--run-dir", str(run), "--format", "json", *map(str, val_images(run, 2))]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "torch" and all(isinstance(r["out_of_distribution"], bool) for r in doc["predictions"])
