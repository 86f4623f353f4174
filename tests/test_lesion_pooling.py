"""Lesion pooling: the images of one lesion scored together, in evaluate, predict (both backends), the ONNX
export, the recipes and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion import fileio
from skinlesion.classes import CLASSES
from skinlesion.cli import main
from skinlesion.decision import lesion_pooling
from skinlesion.decision.chain import softmax
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.model import checkpoint
from skinlesion.training import recipes

P_COLS = [f"p_{c}" for c in CLASSES]


def test_pool_gives_each_image_its_lesions_geometric_mean():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (5, len(CLASSES)))
    ids = ["a", "b", "a", "c", "a"]  # interleaved: the order of the rows is kept
    pooled = lesion_pooling.pool(softmax(z), ids)
    lesion_a = softmax(z[[0, 2, 4]].mean(0, keepdims=True))[0]  # = the mean logit: softmax's row constant cancels
    for i in (0, 2, 4):
        np.testing.assert_allclose(pooled[i], lesion_a, atol=1e-12)
    np.testing.assert_allclose(pooled[[1, 3]], softmax(z)[[1, 3]], atol=1e-12)  # alone in its lesion: unchanged
    np.testing.assert_allclose(pooled.sum(1), 1.0)
    # A probability that underflowed to 0 stays a (tiny) probability, not a NaN.
    hard = np.array([[1.0, 0, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0, 0]])
    out = lesion_pooling.pool(hard, ["x", "x"])
    assert np.isfinite(out).all() and out[0].argmax() == 0
    assert lesion_pooling.shared(ids) == 3 and lesion_pooling.shared(["a", "b"]) == 0
    # A missing id is a lesion of its own, not one shared "nan" lesion.
    unknown = [None, float("nan"), "", "a", "a"]
    np.testing.assert_allclose(lesion_pooling.pool(softmax(z), unknown)[:3], softmax(z)[:3], atol=1e-12)
    assert lesion_pooling.shared(unknown) == 2
    with pytest.raises(ValueError, match="3 lesion ids for 5 images"):
        lesion_pooling.pool(softmax(z), ids[:3])


def test_the_improved_recipe_pools_and_the_reference_does_not():
    assert recipes.IMPROVED.pool_lesions is True
    assert recipes.REFERENCE.pool_lesions is False
    assert recipes.IMPROVED.replace(pool_lesions=False).pool_lesions is False


def evaluate(run: Path, *flags: str) -> tuple[pd.DataFrame, dict]:
    assert main(["evaluate", "--run-dir", str(run), "--bootstrap", "20", *flags]) == 0
    return pd.read_csv(run / "predictions.csv"), json.loads((run / "metrics.json").read_text())


def set_config(run: Path, **values) -> None:
    """What `train --pool-lesions` records, without training again."""
    ckpt = checkpoint.read(run)
    ckpt["config"] = {**ckpt["config"], **values}
    fileio.torch_save(run / "best.pt", ckpt)


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    return run


def test_evaluate_pools_a_lesions_images_when_asked_or_when_the_run_says_so(run, capsys):
    plain, m_plain = evaluate(run)  # the reference recipe: per image
    assert m_plain["lesion_pooling"] == {"applied": False, "images_pooled": 0}
    sizes = plain["lesion_id"].map(plain["lesion_id"].value_counts())
    assert (sizes > 1).sum() > 0, "the synthetic val split has no lesion with two images"

    pooled, m = evaluate(run, "--pool-lesions")
    assert "lesion pooling:" in capsys.readouterr().out
    assert m["lesion_pooling"] == {"applied": True, "images_pooled": int((sizes > 1).sum())}
    expected = lesion_pooling.pool(plain[P_COLS].to_numpy(), plain["lesion_id"].astype(str))
    np.testing.assert_allclose(pooled[P_COLS].to_numpy(), expected, atol=1e-6)
    assert pooled.groupby("lesion_id")["y_pred"].nunique().max() == 1  # one lesion, one decision
    assert (pooled["y_pred"] == pooled[P_COLS].to_numpy().argmax(1).choose(np.array(CLASSES))).all()
    same = sizes == 1
    np.testing.assert_allclose(pooled.loc[same, P_COLS], plain.loc[same, P_COLS], atol=1e-6)
    assert m["n_images"] == m_plain["n_images"]  # still scored per image

    set_config(run, pool_lesions=True)  # a run trained with --recipe improved / --pool-lesions
    assert Classifier.load(run).chain.pool_lesions
    again, m_default = evaluate(run)
    np.testing.assert_allclose(again[P_COLS].to_numpy(), pooled[P_COLS].to_numpy(), atol=1e-6)
    off, m_off = evaluate(run, "--no-pool-lesions")
    np.testing.assert_allclose(off[P_COLS].to_numpy(), plain[P_COLS].to_numpy(), atol=1e-6)
    assert m_default["lesion_pooling"]["applied"] and not m_off["lesion_pooling"]["applied"]

    evaluate(run, "--tta")  # the TTA probabilities are pooled the same way
    tta = pd.read_csv(run / "predictions_tta.csv")
    assert tta.groupby("lesion_id")["p_nv"].nunique().max() == 1

    assert main(["report", "--run-dir", str(run)]) == 0  # Grad-CAM gallery captions name the pooled decision
    html = (run / "report.html").read_text()
    assert "· lesion pooling:" in html and ", with its lesion" in html
    assert "were made image by image" not in html
    evaluate(run, "--no-pool-lesions")  # the run pools, these predictions do not: the report says so
    assert main(["report", "--run-dir", str(run), "--no-gallery"]) == 0
    assert "were made image by image" in (run / "report.html").read_text()


def test_evaluate_on_images_without_lesion_ids_pools_nothing(run, synth_dir, tmp_path, capsys):
    csv = tmp_path / "no_lesions.csv"
    table = pd.read_csv(synth_dir / "HAM10000_metadata.csv").drop(columns="lesion_id")
    table.to_csv(csv, index=False)
    argv = ["evaluate", "--run-dir", str(run), "--metadata", str(csv), "--images", str(synth_dir / "images"),
            "--name", "ext", "--bootstrap", "0", "--pool-lesions"]  # fmt: skip
    assert main(argv) == 0
    assert "no two images share a lesion id" in capsys.readouterr().out
    assert json.loads((run / "eval_ext" / "metrics.json").read_text())["lesion_pooling"]["applied"] is False


@pytest.fixture(scope="module")
def lesion_inputs(synth_dir, tmp_path_factory) -> tuple[list[Path], Path]:
    """Every image of six synthetic lesions with two or more images, and the metadata CSV naming them."""
    table = pd.read_csv(synth_dir / "HAM10000_metadata.csv")
    multi = table[table["lesion_id"].map(table["lesion_id"].value_counts()) > 1]
    keep = multi[multi["lesion_id"].isin(multi["lesion_id"].unique()[::4][:6])]
    out = tmp_path_factory.mktemp("pool_in")
    files = []
    for image_id in keep["image_id"]:
        files.append(out / f"{image_id}.jpg")
        shutil.copy(synth_dir / "images" / f"{image_id}.jpg", files[-1])
    return files, synth_dir / "HAM10000_metadata.csv"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_pools_images_the_metadata_csv_groups(onnx_run, lesion_inputs, tmp_path, capsys, backend):
    files, csv = lesion_inputs
    base = ["predict", "--run-dir", str(onnx_run), "--backend", backend, *map(str, files), "--format", "json"]
    base += ["--batch-size", "4"]  # a lesion's images in different batches
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)  # the reference run: no pooling, no lesion ids needed
    assert plain["lesion_pooling"]["applied"] is False and "lesion_id" not in plain["predictions"][0]

    assert main([*base, "--metadata", str(csv), "--pool-lesions"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert "lesion pooling:" in captured.err
    assert doc["lesion_pooling"] == {"applied": True, "images_pooled": len(files)}
    lesion_of = pd.read_csv(csv).set_index("image_id")["lesion_id"]
    ids = [lesion_of[Path(r["image"]).stem] for r in doc["predictions"]]
    assert [r["lesion_id"] for r in doc["predictions"]] == ids
    probs = np.array([[r["probabilities"][c] for c in CLASSES] for r in plain["predictions"]])
    expected = lesion_pooling.pool(probs, ids)
    got = np.array([[r["probabilities"][c] for c in CLASSES] for r in doc["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r["prediction"] for r in doc["predictions"]] == [CLASSES[k] for k in expected.argmax(1)]


def test_predict_pools_what_it_can_and_names_what_it_could_not(onnx_run, lesion_inputs, tmp_path, capsys):
    """An unreadable input and inputs the CSV does not name: the rest of their lesions still pool."""
    files, csv = lesion_inputs
    lesion_of = pd.read_csv(csv).set_index("image_id")["lesion_id"]
    ids = pd.Series([lesion_of[f.stem] for f in files[1:]])
    pooled = ids.map(ids.value_counts()) > 1  # among the readable inputs
    broken = tmp_path / f"{files[0].stem}.jpg"  # in the CSV, but not an image
    broken.write_bytes(b"not a jpeg")
    twin = files[1:][int(np.flatnonzero(pooled)[0])]
    stranger = tmp_path / "not_in_csv.jpg"  # the same picture as twin, under a name the CSV does not know
    shutil.copy(twin, stranger)
    inputs = [str(broken), *map(str, files[1:]), str(stranger), str(stranger)]  # named twice: predicted once
    argv = ["predict", "--run-dir", str(onnx_run), *inputs, "--format", "json", "--metadata", str(csv)]
    assert main([*argv, "--pool-lesions"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["image"] for s in doc["skipped"]] == [str(broken)]
    rows = {Path(r["image"]).name: r for r in doc["predictions"]}
    assert len(doc["predictions"]) == len(files) and rows["not_in_csv.jpg"]["lesion_id"] is None
    assert doc["lesion_pooling"]["images_pooled"] == int(pooled.sum())
    # twin is pooled with its lesion; its copy, a lesion of its own, is not.
    assert rows["not_in_csv.jpg"]["probabilities"] != pytest.approx(rows[twin.name]["probabilities"], abs=1e-4)


def test_predict_pool_lesions_needs_lesion_ids(onnx_run, lesion_inputs, tmp_path, capsys):
    files, _ = lesion_inputs

    def refused(*flags: str) -> str:
        assert main(["predict", "--run-dir", str(onnx_run), str(files[0]), "--pool-lesions", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    assert "--pool-lesions needs --metadata CSV with image_id and lesion_id" in refused()
    no_ids = tmp_path / "ids.csv"
    pd.DataFrame({"image_id": [f.stem for f in files], "age": 50}).to_csv(no_ids, index=False)
    assert "lesion_id columns" in refused("--metadata", str(no_ids))
    others = tmp_path / "others.csv"
    pd.DataFrame({"image_id": ["someone_else"], "lesion_id": ["L1"]}).to_csv(others, index=False)
    assert "gives a lesion_id for none of the inputs" in refused("--metadata", str(others))


@pytest.mark.parametrize("pools", [True, False])
def test_the_onnx_export_carries_the_runs_pooling(run, lesion_inputs, capsys, pools):
    set_config(run, pool_lesions=pools)
    export_onnx(run)
    assert Classifier.load(run, "onnx").chain.pool_lesions is pools and Classifier.load(run).chain.pool_lesions is pools
    files, csv = lesion_inputs  # the run's default decides, with no --pool-lesions on the command line
    argv = ["predict", "--run-dir", str(run), "--backend", "onnx", *map(str, files), "--metadata", str(csv)]
    if pools:
        assert main([*argv, "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["lesion_pooling"]["applied"] is True
    else:  # a --metadata CSV is then only for a metadata prior, which this run lacks
        assert main(argv) == 2 and "need a run with a metadata prior" in capsys.readouterr().err


def test_resume_can_switch_pooling_and_best_pt_follows(tiny_run, tmp_path):
    """pool_lesions changes no training step, so --resume may change it; evaluate / predict read it from best.pt."""
    shutil.copytree(tiny_run, tmp_path / "tiny")
    run = tmp_path / "tiny"
    assert not Classifier.load(run).chain.pool_lesions
    argv = ["train", "--out", str(tmp_path), "--run-name", "tiny", "--resume", "--workers", "0", "--pool-lesions"]
    assert main(argv) == 0
    assert Classifier.load(run).chain.pool_lesions and json.loads((run / "config.json").read_text())["pool_lesions"]
    assert main([*argv[:-1], "--no-pool-lesions"]) == 0
    assert not Classifier.load(run).chain.pool_lesions
