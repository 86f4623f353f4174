"""The metadata prior: fit / offsets, and every stage that uses it from the CLI (train, fit-metadata-prior,
evaluate, predict with both backends, serve)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from skinlesion.classes import CLASS_INDEX, CLASSES
from skinlesion.cli import main
from skinlesion.data.images import open_rgb
from skinlesion.data.run_folder import run_table
from skinlesion.decision import metadata_prior
from skinlesion.decision.chain import softmax
from skinlesion.errors import SkinLesionError
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.model import checkpoint


def site_table(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """bcc on the face of the old, nv on the back of the young; a few fields missing."""
    rng = np.random.default_rng(seed)
    dx = rng.choice(["bcc", "nv", "mel"], n, p=[0.3, 0.5, 0.2])
    site = np.where(dx == "bcc", "face", np.where(dx == "nv", "back", rng.choice(["back", "face", "trunk"], n)))
    age = np.where(dx == "bcc", 75.0, np.where(dx == "nv", 25.0, 55.0)) + rng.normal(0, 5, n)
    table = pd.DataFrame({"dx": dx, "age": age, "sex": rng.choice(["male", "female"], n), "localization": site})
    table.loc[:9, "localization"] = "unknown"
    table.loc[10:19, "age"] = np.nan
    return table


def test_features_treat_every_spelling_of_unknown_as_missing():
    table = pd.DataFrame(
        {"age": [47.0, np.nan, 0.0, 85.0], "sex": ["Male", "unknown", None, ""],
         "localization": ["Back ", "UNKNOWN", "face", np.nan]}  # fmt: skip
    )
    feats = metadata_prior.features(table)
    assert feats["age_decade"].tolist() == ["40", "", "0", "80"]
    assert feats["sex"].tolist() == ["male", "", "", ""]
    assert feats["localization"].tolist() == ["back", "", "face", ""]
    x = metadata_prior.encode(table, {"age_decade": ["40", "80"], "sex": ["female", "male"], "localization": ["back"]})
    # Row 3: '0' and 'face' were never fitted -> all zeros for those fields, like a missing value.
    assert x.tolist() == [[1, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]
    assert metadata_prior.known(table).tolist() == [True, False, True, True]
    assert metadata_prior.known(pd.DataFrame({"image_id": ["a"]})).tolist() == [False]


def test_offsets_favour_the_class_the_metadata_points_to():
    model = metadata_prior.fit(site_table(), CLASSES)
    json.dumps(model)  # stored in best.pt and in model.onnx's metadata: plain JSON values only
    assert model["fitted_classes"] == ["bcc", "mel", "nv"] and model["n_fit"] == 400
    query = pd.DataFrame(
        {"age": [78.0, 22.0, np.nan, 50.0], "sex": ["male", "female", "unknown", "other"],
         "localization": ["face", "back", "unknown", "nowhere"]}  # fmt: skip
    )
    off = metadata_prior.offsets(model, query)
    assert off.shape == (4, len(CLASSES))
    bcc, nv = CLASS_INDEX["bcc"], CLASS_INDEX["nv"]
    assert off[0, bcc] > 1.0 > -1.0 > off[0, nv]
    assert off[1, nv] > 0.3 and off[1, bcc] < -1.0
    # Nothing known (row 2) or only unseen values (row 3, apart from the age): the image model unchanged.
    assert np.array_equal(off[2], np.zeros(len(CLASSES)))
    assert np.count_nonzero(off[3]) > 0
    # Classes absent from the fit rows get no opinion.
    absent = [CLASS_INDEX[c] for c in CLASSES if c not in model["fitted_classes"]]
    assert np.array_equal(off[:, absent], np.zeros((4, len(absent))))
    # log prior + offset is scikit-learn's own predict_proba of the same fit (the stored model is complete).
    from sklearn.linear_model import LogisticRegression

    train = site_table()
    x = metadata_prior.encode(train, model["categories"])
    reference = LogisticRegression(max_iter=2000).fit(x, train["dx"].map(CLASS_INDEX))
    fitted = [CLASS_INDEX[c] for c in model["fitted_classes"]]
    expected = reference.predict_proba(metadata_prior.encode(query.iloc[:2], model["categories"]))
    np.testing.assert_allclose(np.exp(np.asarray(model["log_prior"])[fitted] + off[:2, fitted]), expected, atol=1e-6)


def test_two_classes_and_values_the_prior_never_saw():
    table = site_table()
    two = table[table["dx"] != "mel"]
    model = metadata_prior.fit(two, CLASSES)
    off = metadata_prior.offsets(model, pd.DataFrame({"age": [80.0, 20.0], "localization": ["face", "back"]}))
    bcc, nv = CLASS_INDEX["bcc"], CLASS_INDEX["nv"]
    assert off[0, bcc] > 0 > off[0, nv] and off[1, nv] > 0 > off[1, bcc]
    unseen = pd.DataFrame({"sex": ["m"], "localization": ["moon"], "age": [-3.0]})
    assert metadata_prior.known(unseen).tolist() == [True]  # recorded ...
    assert metadata_prior.known(unseen, model).tolist() == [False]  # ... but nothing the prior can use
    assert np.array_equal(metadata_prior.offsets(model, unseen), np.zeros((1, len(CLASSES))))


def test_fit_refuses_a_table_without_metadata():
    table = pd.DataFrame({"dx": ["nv", "mel"], "age": [np.nan, np.nan], "sex": ["unknown"] * 2,
                          "localization": ["unknown"] * 2})  # fmt: skip
    with pytest.raises(SkinLesionError, match="no age, sex or localization"):
        metadata_prior.fit(table, CLASSES)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def prior_run(tiny_run, tmp_path_factory) -> Path:
    """tiny_run with temperature 1.5, a fitted metadata prior and an ONNX export made after both."""
    run = tmp_path_factory.mktemp("prior") / "tiny"
    shutil.copytree(tiny_run, run)
    checkpoint.set_temperature(run, 1.5)
    assert main(["fit-metadata-prior", "--run-dir", str(run)]) == 0
    export_onnx(run)
    return run


def test_fit_metadata_prior_stores_the_model_fitted_on_the_train_split(prior_run):
    stored = checkpoint.read(prior_run)["metadata_prior"]
    table = run_table(prior_run)
    expected = metadata_prior.fit(table[table["split"] == "train"], CLASSES)
    assert stored["n_fit"] == int((table["split"] == "train").sum())
    np.testing.assert_allclose(stored["coef"], expected["coef"])
    # --remove takes it out again (on a copy: the fixture stays as it is).
    copy = prior_run.parent / "removed"
    shutil.copytree(prior_run, copy)
    assert main(["fit-metadata-prior", "--run-dir", str(copy), "--remove"]) == 0
    assert "metadata_prior" not in checkpoint.read(copy)
    assert Classifier.load(copy).chain.metadata_prior is None


def test_evaluate_adds_the_offsets_to_the_tempered_logits(prior_run, capsys):
    assert main(["evaluate", "--run-dir", str(prior_run), "--bootstrap", "20", "--no-metadata-prior"]) == 0
    image_only = pd.read_csv(prior_run / "predictions.csv")
    assert json.loads((prior_run / "metrics.json").read_text())["metadata_prior"]["applied"] is False
    assert main(["evaluate", "--run-dir", str(prior_run), "--bootstrap", "20"]) == 0
    fused = pd.read_csv(prior_run / "predictions.csv")
    doc = json.loads((prior_run / "metrics.json").read_text())
    assert "metadata prior added for" in capsys.readouterr().out
    assert doc["metadata_prior"]["applied"] is True and doc["metadata_prior"]["images_with_metadata"] == len(fused)

    cols = [f"p_{c}" for c in CLASSES]
    table = pd.DataFrame({"image_id": fused["image_id"]}).merge(run_table(prior_run), on="image_id")
    offsets = metadata_prior.offsets(checkpoint.read(prior_run)["metadata_prior"], table)
    # softmax(z / T + offset) == normalise(p_image * exp(offset)): check on the written probabilities.
    expected = image_only[cols].to_numpy() * np.exp(offsets)
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(fused[cols].to_numpy(), expected, atol=1e-5)
    assert not np.allclose(fused[cols].to_numpy(), image_only[cols].to_numpy(), atol=1e-3)


def predict_json(capsys, *argv: str) -> dict:
    assert main(["predict", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def images(synth_dir, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("prior_in")
    files = []
    for src in sorted((synth_dir / "images").glob("*.jpg"))[::50][:3]:
        files.append(out / src.name)
        shutil.copy(src, files[-1])
    return files


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_uses_age_sex_site_in_both_backends(prior_run, images, capsys, backend):
    run = ["--run-dir", str(prior_run), "--backend", backend, *map(str, images)]
    plain = predict_json(capsys, *run)
    old = predict_json(capsys, *run, "--age", "80", "--sex", "male", "--site", "face")
    assert plain["metadata_prior"]["applied"] is False
    assert old["metadata_prior"] == {"applied": True, "images_with_metadata": 3}
    prior = checkpoint.read(prior_run)["metadata_prior"]
    offset = metadata_prior.offsets(prior, pd.DataFrame({"age": [80.0], "sex": ["male"], "localization": ["face"]}))
    logits = Classifier.load(prior_run).view_logits([open_rgb(images[0])])[0]
    expected = softmax(logits / 1.5 + offset)[0]
    got = np.array([old["predictions"][0]["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(got, expected, atol=1e-4)  # ONNX Runtime vs PyTorch logits: 1e-4
    assert not np.allclose(got, [plain["predictions"][0]["probabilities"][c] for c in CLASSES], atol=1e-3)
    # --no-metadata-prior: the image model alone, whatever was passed.
    off = predict_json(capsys, *run, "--age", "80", "--no-metadata-prior")
    assert off["predictions"][0]["probabilities"] == pytest.approx(plain["predictions"][0]["probabilities"])


def test_predict_reads_per_image_metadata_from_a_csv(prior_run, images, tmp_path, capsys):
    csv = tmp_path / "meta.csv"
    pd.DataFrame({"image_id": [images[0].stem, images[1].stem], "age": [80, 20],
                  "localization": ["face", "back"]}).to_csv(csv, index=False)  # fmt: skip
    doc = predict_json(capsys, "--run-dir", str(prior_run), *map(str, images), "--metadata", str(csv))
    assert doc["metadata_prior"] == {"applied": True, "images_with_metadata": 2}
    plain = predict_json(capsys, "--run-dir", str(prior_run), *map(str, images))
    moved = [r["probabilities"] != pytest.approx(p["probabilities"], abs=1e-4)
             for r, p in zip(doc["predictions"], plain["predictions"], strict=True)]  # fmt: skip
    assert moved == [True, True, False]  # the third image is not in the CSV


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--site", "nowhere"], "not a body site the prior knows; use one of: "),
        (["--metadata", "missing.csv"], "does not exist"),
        (["--metadata", "BAD"], "is not a readable CSV"),
        (["--metadata", "NOCOLS"], "needs at least one of age, sex, localization"),
        (["--metadata", "NOID"], "needs an image_id column"),
    ],
)
def test_predict_refuses_bad_metadata_in_one_line(prior_run, images, tmp_path, capsys, argv, message):
    (tmp_path / "bad.csv").write_text("image_id,age\na,1\nb,2,3,4\n")
    (tmp_path / "nocols.csv").write_text("image_id,dx\na,nv\n")
    (tmp_path / "noid.csv").write_text("name,age\na,50\n")
    files = {"BAD": "bad.csv", "NOCOLS": "nocols.csv", "NOID": "noid.csv"}
    argv = [str(tmp_path / files[a]) if a in files else a for a in argv]
    assert main(["predict", "--run-dir", str(prior_run), str(images[0]), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_predict_age_is_checked_when_parsed(prior_run, images, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--run-dir", str(prior_run), str(images[0]), "--age", "300"])
    assert stop.value.code == 2
    assert "argument --age: expected a finite number >= 0 and <= 120, got 300" in capsys.readouterr().err


def test_predict_sex_is_checked_when_parsed(prior_run, images, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--run-dir", str(prior_run), str(images[0]), "--sex", "x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.replace("'", "")  # Python 3.12 stopped quoting the choices
    assert "argument --sex: invalid choice: x (choose from male, female)" in err


def test_predict_metadata_needs_a_run_with_a_prior(tiny_run, images, capsys):
    assert main(["predict", "--run-dir", str(tiny_run), str(images[0]), "--age", "50"]) == 2
    assert "skinlesion fit-metadata-prior --run-dir" in capsys.readouterr().err


def test_onnx_export_carries_the_prior(prior_run):
    assert Classifier.load(prior_run, "onnx").chain.metadata_prior == checkpoint.read(prior_run)["metadata_prior"]


def test_serve_takes_optional_age_sex_site(prior_run, images):
    from skinlesion.serve.app import create_app

    client = TestClient(create_app(prior_run, backend="torch"))
    info = client.get("/api/model").json()
    assert info["metadata_prior"]["sites"] == checkpoint.read(prior_run)["metadata_prior"]["categories"]["localization"]
    data = images[0].read_bytes()
    files = {"file": ("x.jpg", data, "image/jpeg")}
    plain = client.post("/api/predict", files=files).json()
    assert plain["metadata"] is None
    site = info["metadata_prior"]["sites"][0]
    fused = client.post("/api/predict", files=files, data={"age": "80", "sex": "male", "site": site}).json()
    assert fused["metadata"] == {"age": 80.0, "sex": "male", "localization": site}
    assert fused["probabilities"] != pytest.approx(plain["probabilities"], abs=1e-4)
    empty = client.post("/api/predict", files=files, data={"age": "", "sex": "", "site": ""})
    assert empty.status_code == 200 and empty.json()["probabilities"] == pytest.approx(plain["probabilities"])
    bad = client.post("/api/predict", files=files, data={"site": "moon"})
    assert bad.status_code == 422 and "not a body site" in bad.json()["detail"]


def test_serve_refuses_metadata_for_a_run_without_a_prior(tiny_run, images):
    from skinlesion.serve.app import create_app

    client = TestClient(create_app(tiny_run, backend="torch"))
    assert client.get("/api/model").json()["metadata_prior"] is None
    answer = client.post("/api/predict", files={"file": ("x.jpg", images[0].read_bytes(), "image/jpeg")},
                         data={"age": "50"})  # fmt: skip
    assert answer.status_code == 422 and "no metadata prior" in answer.json()["detail"]


def test_external_images_without_metadata_get_the_image_model(prior_run, synth_dir, tmp_path, capsys):
    """An ISIC-2018-style or metadata-less external set: offsets 0, the same probabilities as without the prior."""
    ext = tmp_path / "ext"
    shutil.copytree(synth_dir, ext)
    meta = pd.read_csv(ext / "HAM10000_metadata.csv").head(40)
    meta.assign(age="", sex="unknown", localization="unknown").to_csv(ext / "HAM10000_metadata.csv", index=False)
    for flag in ([], ["--no-metadata-prior"]):
        name = "with" if not flag else "without"
        assert main(["evaluate", "--run-dir", str(prior_run), "--data-dir", str(ext), "--name", name,
                     "--bootstrap", "0", *flag]) == 0  # fmt: skip
    doc = json.loads((prior_run / "eval_with" / "metrics.json").read_text())
    assert doc["metadata_prior"] == {"applied": False, "images_with_metadata": 0}
    a, b = (pd.read_csv(prior_run / f"eval_{n}" / "predictions.csv") for n in ("with", "without"))
    pd.testing.assert_frame_equal(a, b)


def test_calibrate_scores_what_evaluate_will_use(prior_run, tmp_path):
    run = tmp_path / "cal"
    shutil.copytree(prior_run, run)
    assert main(["calibrate", "--run-dir", str(run)]) == 0
    with_prior = json.loads((run / "calibration.json").read_text())
    assert with_prior["metadata_prior_images"] > 0
    assert main(["fit-metadata-prior", "--run-dir", str(run), "--remove"]) == 0
    assert main(["calibrate", "--run-dir", str(run)]) == 0
    alone = json.loads((run / "calibration.json").read_text())
    # Same T (fitted on the image logits either way); the scores differ because the prior is added before scoring.
    assert with_prior["temperature"] == pytest.approx(alone["temperature"])
    assert with_prior["before"]["log_loss"] != pytest.approx(alone["before"]["log_loss"])


def test_train_with_metadata_prior_stores_it(synth_dir, tmp_path, capsys):
    rc = main(
        ["train", "--data-dir", str(synth_dir), "--out", str(tmp_path), "--run-name", "meta", "--backbone",
         "efficientnet_b0", "--no-pretrained", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
         "--max-train-batches", "2", "--workers", "0", "--metadata-prior"]  # fmt: skip
    )
    assert rc == 0
    assert "metadata prior fit on" in capsys.readouterr().out
    ckpt = checkpoint.read(tmp_path / "meta")
    assert ckpt["metadata_prior"]["n_fit"] == ckpt["config"]["n_train"]
    assert ckpt["config"]["metadata_prior"] is True
    assert torch.is_tensor(next(iter(ckpt["model"].values())))


def test_train_skips_the_prior_without_metadata(synth_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    meta = pd.read_csv(data / "HAM10000_metadata.csv")
    meta.assign(age="", sex="unknown", localization="unknown").to_csv(data / "HAM10000_metadata.csv", index=False)
    rc = main(
        ["train", "--data-dir", str(data), "--out", str(tmp_path), "--run-name", "nometa", "--backbone",
         "efficientnet_b0", "--no-pretrained", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
         "--max-train-batches", "1", "--workers", "0", "--metadata-prior",
         "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    )
    assert rc == 0
    assert "metadata prior skipped" in capsys.readouterr().out
    assert "metadata_prior" not in checkpoint.read(tmp_path / "nometa")


def test_report_says_when_the_prior_was_used(prior_run, capsys):
    assert main(["evaluate", "--run-dir", str(prior_run), "--bootstrap", "20", "--no-metadata-prior"]) == 0
    assert main(["report", "--run-dir", str(prior_run), "--no-gallery", "--grid-per-class", "1"]) == 0
    html = (prior_run / "report.html").read_text()
    assert "holds a metadata prior that these predictions do not use" in html
    assert main(["evaluate", "--run-dir", str(prior_run), "--bootstrap", "20"]) == 0
    assert main(["report", "--run-dir", str(prior_run), "--grid-per-class", "1"]) == 0  # gallery: fused titles
    html = (prior_run / "report.html").read_text()
    assert len(list((prior_run / "figures").glob("cam_*.png"))) >= len(CLASSES)
    n = json.loads((prior_run / "metrics.json").read_text())["metadata_prior"]["images_with_metadata"]
    assert f"metadata prior (age, sex, site) added for\n  {n} images" in html
    assert "do not use" not in html


def test_gradcam_titles_use_the_fused_prediction(prior_run):
    from skinlesion.reporting.explain import explain

    assert main(["evaluate", "--run-dir", str(prior_run), "--bootstrap", "0"]) == 0
    preds = pd.read_csv(prior_run / "predictions.csv").head(12)
    table = run_table(prior_run).set_index("image_id").loc[preds["image_id"]].reset_index()
    classifier = Classifier.load(prior_run)
    for i, row in preds.iterrows():
        exp = explain(classifier, open_rgb(table.loc[i, "path"]), clinical=table.iloc[[i]])
        assert exp.predicted == row["y_pred"]
        np.testing.assert_allclose(exp.probs, row[[f"p_{c}" for c in CLASSES]].to_numpy(float), atol=1e-5)
