"""``skinlesion evaluate`` on the tiny synthetic run: files, contents equal to scikit-learn, external sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from skinlesion.classes import CLASS_INDEX, CLASSES
from skinlesion.cli import main
from skinlesion.data.images import open_rgb
from skinlesion.data.run_folder import run_table
from skinlesion.inference.classifier import Classifier

P_COLS = [f"p_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(tiny_run, run)
    rc = main(
        [
            "evaluate",
            "--run-dir",
            str(run),
            "--device",
            "cpu",
            "--tta",
            "--lesion-level",
            "--bootstrap",
            "200",
            "--no-cache",
        ]
    )
    assert rc == 0
    return run


def test_predictions_csv(evaluated):
    preds = pd.read_csv(evaluated / "predictions.csv", dtype=str)
    assert list(preds.columns) == ["image_id", "lesion_id", "source", "y_true", "y_pred", *P_COLS]
    splits = pd.read_csv(evaluated / "splits.csv", dtype=str)
    val = splits[splits["split"] == "val"]
    assert sorted(preds["image_id"]) == sorted(val["image_id"])
    probs = preds[P_COLS].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (np.asarray(CLASSES)[probs.argmax(1)] == preds["y_pred"]).all()

    # Same probabilities as the classifier on the decoded files.
    table = run_table(evaluated).set_index("image_id")
    first = preds.head(3)
    direct = Classifier.load(evaluated).predict([open_rgb(table.loc[i, "path"]) for i in first["image_id"]])
    np.testing.assert_allclose(direct.probabilities, first[P_COLS].astype(float).to_numpy(), atol=1e-4)


def test_metrics_json_equals_sklearn(evaluated):
    m = json.loads((evaluated / "metrics.json").read_text())
    preds = pd.read_csv(evaluated / "predictions.csv")
    y = preds["y_true"].map(CLASS_INDEX).to_numpy()
    probs = preds[P_COLS].to_numpy()
    pred = probs.argmax(1)
    assert m["n_images"] == len(preds) and m["n_lesions"] == preds["lesion_id"].nunique()
    assert m["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["weighted_f1"]["value"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["log_loss"]["value"] == pytest.approx(skm.log_loss(y, probs, labels=list(range(7))), rel=1e-4)
    # (ECE is left out: its resamples are biased upward, so its percentile interval may sit above the value.)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss", "brier"):
        lo, hi = m[name]["ci95"]
        assert lo <= m[name]["value"] + 1e-9 and m[name]["value"] <= hi + 1e-9, name
    for c in CLASSES:
        assert m["per_class"][c]["support"] == int((preds["y_true"] == c).sum())
    tta = pd.read_csv(evaluated / "predictions_tta.csv")
    assert m["with_tta"]["accuracy"]["value"] == pytest.approx((tta["y_true"] == tta["y_pred"]).mean())
    assert m["tta_views"] == 4  # the tiny run's recipe (reference) averages the 4 flips
    lesions = preds.groupby("lesion_id").agg({**dict.fromkeys(P_COLS, "mean"), "y_true": "first"})
    lesion_pred = np.asarray(CLASSES)[lesions[P_COLS].to_numpy().argmax(1)]
    assert m["lesion_level"]["n_images"] == len(lesions)
    assert m["lesion_level"]["accuracy"]["value"] == pytest.approx((lesion_pred == lesions["y_true"]).mean())
    report = (evaluated / "classification_report.txt").read_text()
    assert (
        skm.classification_report(y, pred, labels=list(range(7)), target_names=list(CLASSES), digits=3, zero_division=0)
        in report
    )


def test_external_folder_is_scored_without_what_the_run_trained_on(evaluated, synth_dir, tmp_path, capsys):
    """The synthetic folder the run was trained on, as an "external" set, with two training images renamed (new
    image ids, same lesions): scored without every trained image; --keep-overlap keeps them, with a warning."""
    data = Path(shutil.copytree(synth_dir, tmp_path / "ext"))
    meta = pd.read_csv(data / "HAM10000_metadata.csv", dtype=str)
    splits = pd.read_csv(evaluated / "splits.csv", dtype=str)
    trained = set(splits.loc[splits["split"] == "train", "image_id"])
    renamed = sorted(trained)[:2]
    for old in renamed:
        (data / "images" / f"{old}.jpg").rename(data / "images" / f"NEW_{old}.jpg")
    meta["image_id"] = [f"NEW_{i}" if i in renamed else i for i in meta["image_id"]]
    meta.to_csv(data / "HAM10000_metadata.csv", index=False)
    argv = ["evaluate", "--run-dir", str(evaluated), "--data-dir", str(data), "--name", "synth ext", "--device", "cpu",
            "--bootstrap", "20"]  # fmt: skip
    assert main(argv) == 0
    out = evaluated / "eval_synth_ext"
    m = json.loads((out / "metrics.json").read_text())
    n_trained = len(trained)
    assert m["overlap_with_training"] == {"images": n_trained, "by_image_id": n_trained - 2, "by_lesion_id": 2,
                                          "kept": False}  # fmt: skip
    assert m["n_images"] == len(meta) - n_trained and m["external"] == "synth_ext"
    scored = set(pd.read_csv(out / "predictions.csv", dtype=str)["image_id"])
    assert not scored & (trained | {f"NEW_{i}" for i in renamed})
    assert f"{n_trained} of {len(meta)} images were trained on by this run" in capsys.readouterr().err
    assert main([*argv, "--keep-overlap"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == len(meta) and "optimistic" in m["overlap_with_training"]["warning"]


def test_missing_split_is_a_one_line_error(evaluated, capsys):
    assert main(["evaluate", "--run-dir", str(evaluated), "--split", "test", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--split" in err
