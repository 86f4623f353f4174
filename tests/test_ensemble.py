"""Ensembles as models (skinlesion ensemble), K-fold cross-validation (train --folds), ISIC submission files."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from skinlesion.cli import main
from skinlesion.data.split import read_splits
from skinlesion.decision import temperature
from skinlesion.decision.chain import DecisionChain
from skinlesion.evaluation.isic import ISIC_COLUMNS
from skinlesion.inference.classifier import Classifier
from skinlesion.model import checkpoint
from skinlesion.model.ensemble import Ensemble
from skinlesion.model.ensemble_run import combined_splits
from skinlesion.serve.app import create_app

TINY = ["--no-pretrained", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--max-train-batches", "2"]


def images(synth_dir: Path, n: int = 6) -> list[str]:
    return [str(p) for p in sorted((synth_dir / "images").glob("*.jpg"))[:n]]


@pytest.fixture(scope="module")
def members(synth_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two runs of one split (same size) and one of another backbone, size and normalisation."""
    out = tmp_path_factory.mktemp("members")
    common = ["train", "--data-dir", str(synth_dir), "--out", str(out), *TINY]
    assert main([*common, "--run-name", "a", "--backbone", "efficientnet_b0", "--img-size", "64", "--seed", "1"]) == 0
    assert main([*common, "--run-name", "b", "--backbone", "efficientnet_b0", "--img-size", "64", "--seed", "1",
                 "--lr", "1e-2"]) == 0  # fmt: skip
    assert main([*common, "--run-name", "c", "--backbone", "mobilenetv3_small_050", "--img-size", "96", "--seed", "1",
                 "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]) == 0  # fmt: skip
    return out / "a", out / "b", out / "c"


@pytest.fixture(scope="module")
def ensemble_dir(members, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "ens"
    assert main(["ensemble", *map(str, members), "--out", str(out)]) == 0
    return out


def test_the_ensemble_averages_member_logits_before_the_chain(members, synth_dir, tmp_path):
    a, b, _ = members
    out = tmp_path / "ab"
    assert main(["ensemble", str(a), str(b), "--out", str(out)]) == 0
    ens = Classifier.load(out)
    assert isinstance(ens.backend.model, Ensemble)
    files = images(synth_dir)
    expected = (Classifier.load(a).view_logits(files, tta=True) + Classifier.load(b).view_logits(files, tta=True)) / 2
    np.testing.assert_allclose(ens.view_logits(files, tta=True), expected, atol=1e-5)
    # The chain comes after the average: with a temperature it is softmax(mean / T), not a mean of softmaxes.
    checkpoint.set_temperature(out, 2.0)
    ens = Classifier.load(out)
    np.testing.assert_allclose(ens.predict(files).probabilities, DecisionChain(ens.chain.classes, 2.0)(expected[:1]).
                               probabilities, atol=1e-6)  # fmt: skip


def test_members_of_another_size_and_normalisation_see_the_same_field_of_view(members, ensemble_dir, synth_dir):
    _, _, c = members
    ens = Classifier.load(ensemble_dir).backend
    assert ens.preprocessing.img_size == 96 and ens.model.sizes == [64, 64, 96]
    x = ens.normalize(ens.preprocessing.batch(images(synth_dir, 3)))
    own = Classifier.load(c).view_logits(images(synth_dir, 3))[0]
    with torch.inference_mode():
        inside = ens.model.members[2](ens.model.member_input(2, x)).numpy()
    np.testing.assert_allclose(inside, own, atol=1e-4)  # the largest member is fed exactly its own input
    small = ens.model.member_input(0, x)
    assert small.shape[-2:] == (64, 64) and ens.model.renormalise == [True, True, False]


def test_every_command_takes_an_ensemble(ensemble_dir, synth_dir, capsys):
    run = str(ensemble_dir)
    assert main(["evaluate", "--run-dir", run, "--bootstrap", "10", "--tta"]) == 0
    metrics = json.loads((ensemble_dir / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["n_images"] == (read_splits(ensemble_dir / "splits.csv")["split"]
                                                                == "val").sum()  # fmt: skip
    assert main(["export", "--run-dir", run]) == 0
    capsys.readouterr()
    files = images(synth_dir, 4)
    docs = []
    for backend in ("torch", "onnx"):
        assert main(["predict", "--run-dir", run, *files, "--format", "json", "--backend", backend, "--tta"]) == 0
        docs.append(json.loads(capsys.readouterr().out))
    for t, o in zip(docs[0]["predictions"], docs[1]["predictions"], strict=True):
        assert t["prediction"] == o["prediction"]
        np.testing.assert_allclose(list(t["probabilities"].values()), list(o["probabilities"].values()), atol=1e-5)
    assert main(["gradcam", "--run-dir", run, "--image", files[0]]) == 0
    assert (ensemble_dir / "figures" / f"gradcam_{Path(files[0]).stem}.png").stat().st_size > 1000
    assert main(["report", "--run-dir", run, "--no-gallery"]) == 0
    assert "ensemble" in (ensemble_dir / "report.html").read_text()
    info = TestClient(create_app(ensemble_dir, backend="onnx")).get("/api/model").json()
    assert info["backbone"] == "ensemble" and [m["backbone"] for m in info["members"]] == [
        "efficientnet_b0", "efficientnet_b0", "mobilenetv3_small_050"]  # fmt: skip


def test_an_ensemble_quantizes_as_one_graph(ensemble_dir, synth_dir, capsys):
    """export --int8 on a 3-member ensemble (two backbones, two input sizes): one INT8 graph in which each member's
    stem, first convolution and classifier stay fp32, scored through the same chain as fp32."""
    import onnx

    from skinlesion.inference import quantize

    run = str(ensemble_dir)
    assert main(["export", "--run-dir", run, "--int8", "--calibration-images", "20"]) == 0
    assert "INT8 vs fp32 on val" in capsys.readouterr().out
    kept = quantize.kept_in_fp32(ensemble_dir / "model.onnx")
    graph = onnx.load(str(ensemble_dir / "model.int8.onnx")).graph
    plain = {t.name for t in graph.initializer}
    fp32 = [n for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in plain]
    assert {n.name for n in fp32} == set(kept)
    assert sum(n.op_type == "Gemm" for n in fp32) == 3 and sum(n.op_type == "Conv" for n in fp32) == 6
    files = images(synth_dir, 4)
    assert main(["predict", "--run-dir", run, *files, "--format", "json", "--backend", "onnx-int8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "onnx-int8" and len(doc["predictions"]) == 4


def test_ensemble_refusals(members, ensemble_dir, tmp_path, capsys):
    a, _, _ = members
    assert main(["ensemble", str(a), str(ensemble_dir), "--out", str(a.parent / "x")]) == 2
    assert "is itself an ensemble" in capsys.readouterr().err
    assert main(["ensemble", str(a), "--out", str(ensemble_dir)]) == 2  # holds a model already
    assert "--overwrite" in capsys.readouterr().err
    assert main(["ensemble", str(a), "--out", str(a), "--overwrite"]) == 2
    assert "holds a trained run" in capsys.readouterr().err  # --overwrite never replaces a trained run
    again = Path(shutil.copytree(ensemble_dir, tmp_path / "again"))
    assert main(["ensemble", str(a), "--out", str(again), "--overwrite"]) == 0
    assert len(checkpoint.read(again)["members"]) == 1


def test_combined_splits_never_call_a_trained_image_held_out():
    def frame(parts: dict[str, str]) -> pd.DataFrame:
        return pd.DataFrame({"image_id": list(parts), "lesion_id": [f"L{i[-1]}" for i in parts], "dx": "nv",
                             "split": list(parts.values())})  # fmt: skip

    one = frame({"i1": "train", "i2": "val", "i3": "test", "i4": "val", "i5": "val"})
    two = frame({"i1": "val", "i2": "val", "i3": "test", "i4": "test", "i5": "train"})
    got = combined_splits([one, two]).set_index("image_id")["split"].to_dict()
    assert got == {"i1": "train", "i2": "val", "i3": "test", "i4": "val", "i5": "train"}


# ------------------------------------------------------------------------------------------ train --folds
@pytest.fixture(scope="module")
def cv_run(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv")
    argv = ["train", "--data-dir", str(synth_dir), "--out", str(out), "--run-name", "cv", "--folds", "3",
            "--test-frac", "0.25", "--recipe", "improved", "--backbone", "efficientnet_b0", "--img-size", "32",
            "--min-sensitivity", "mel=0.6", *TINY]  # fmt: skip
    assert main(argv) == 0
    return out / "cv"


def test_folds_are_run_folders_and_the_parent_their_ensemble(cv_run):
    splits = read_splits(cv_run / "splits.csv")
    assert set(splits["split"]) == {"train", "test"}  # every non-test image trained some fold
    test = set(splits.loc[splits["split"] == "test", "image_id"])
    vals = []
    for fold in range(3):
        part = read_splits(cv_run / f"fold_{fold}" / "splits.csv")
        assert set(part.loc[part["split"] == "test", "image_id"]) == test  # the same test part, never trained on
        vals.append(set(part.loc[part["split"] == "val", "image_id"]))
        assert (cv_run / f"fold_{fold}" / "best.pt").is_file()
    assert sum(map(len, vals)) == len(set().union(*vals)) == len(splits) - len(test)  # folds partition the rest
    oof = pd.read_csv(cv_run / "oof_predictions.csv", dtype={"image_id": str})
    assert sorted(oof["image_id"]) == sorted(set().union(*vals))
    for fold in range(3):  # each image scored by the fold that held it out
        assert set(oof.loc[oof["fold"] == fold, "image_id"]) == vals[fold]
    cv = json.loads((cv_run / "cv.json").read_text())
    assert len(cv["per_fold"]) == 3
    per_fold = [f["balanced_accuracy"] for f in cv["per_fold"]]
    assert min(per_fold) <= cv["mean"]["balanced_accuracy"] <= max(per_fold)
    assert cv["out_of_fold"]["n_images"] == len(oof)
    assert cv["out_of_fold"]["balanced_accuracy"]["ci95"] is not None


def test_post_hoc_steps_are_fitted_out_of_fold(cv_run):
    best = checkpoint.read(cv_run)
    views, labels = [], []
    for fold in range(3):
        with np.load(cv_run / f"fold_{fold}" / "oof_logits.npz") as z:
            views.append(z["logits"])
            part = read_splits(cv_run / f"fold_{fold}" / "splits.csv").set_index("image_id").loc[z["image_id"]]
            labels.append(part["dx"].map({c: i for i, c in enumerate(best["classes"])}).to_numpy())
    logits, y = np.concatenate(views, axis=1), np.concatenate(labels)
    assert best["temperature"] == pytest.approx(temperature.fit_temperature(logits[0], y), rel=1e-6)
    assert best["operating_point"]["fitted_on"] == "out-of-fold"
    assert best["operating_point"]["n_images"] == len(y)
    assert best["metadata_prior"] is not None  # the improved recipe's
    assert json.loads((cv_run / "calibration.json").read_text())["n_fit"] == len(y)


def test_evaluate_scores_the_cv_ensemble_on_the_untouched_test_part(cv_run, capsys):
    run = cv_run.parent / "cv_eval"
    shutil.copytree(cv_run, run)
    isic = run / "isic.csv"
    assert main(["evaluate", "--run-dir", str(run), "--tta", "--bootstrap", "10", "--isic-csv", str(isic)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test"
    preds = pd.read_csv(run / "predictions_tta.csv", dtype={"image_id": str})
    sub = pd.read_csv(isic, dtype={"image": str})
    assert list(sub.columns) == ["image", *ISIC_COLUMNS.values()]
    assert list(sub["image"]) == list(preds["image_id"])
    values = sub[list(ISIC_COLUMNS.values())].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    np.testing.assert_allclose(values.sum(1), 1, atol=1e-9)
    to_label = {v: k for k, v in ISIC_COLUMNS.items()}
    assert [to_label[c] for c in sub[list(ISIC_COLUMNS.values())].idxmax(axis=1)] == list(preds["y_pred"])


def run_benchmark(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(bench), *args], capture_output=True, text=True, timeout=600)
    assert not ok or done.returncode == 0, done.stderr[-2000:]
    return done


def test_benchmarks_score_the_models_evaluate_scores(cv_run, tmp_path):
    """cv_ensemble.py and paired_runs.py report the numbers `skinlesion evaluate` writes for the same models."""
    run = tmp_path / "cv"
    shutil.copytree(cv_run, run)
    for fold in ("fold_0", "fold_1"):  # plain runs with their own chain (no post-hoc steps in a fold)
        assert main(["evaluate", "--run-dir", str(run / fold), "--split", "test", "--tta", "--bootstrap", "10"]) == 0
    assert main(["evaluate", "--run-dir", str(run), "--tta", "--bootstrap", "10"]) == 0
    evaluated = {name: json.loads((run / name / "metrics.json").read_text())["with_tta"]
                 for name in ("fold_0", "fold_1", ".")}  # fmt: skip

    run_benchmark("cv_ensemble.py", str(run), "--tta", "--bootstrap", "20", "--json", str(tmp_path / "cv.json"))
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert cv["logit_gap"] < 1e-4 and cv["n_test"] == evaluated["."]["n_images"]
    for key in ("balanced_accuracy", "macro_auc", "log_loss", "ece"):
        row = cv["rows"][key]
        assert row["candidate"] == pytest.approx(evaluated["."][key]["value"], abs=1e-6)
        assert len(row["references"]) == 3
        assert row["diff"] == pytest.approx(row["candidate"] - np.mean(row["references"]))
        assert row["diff_ci95"][0] <= row["diff_ci95"][1]

    run_benchmark("paired_runs.py", str(run / "fold_0"), str(run / "fold_1"), "--tta", "--bootstrap", "20",
                  "--json", str(tmp_path / "pair.json"))  # fmt: skip
    pair = json.loads((tmp_path / "pair.json").read_text())
    for key in ("balanced_accuracy", "macro_auc", "log_loss"):
        row = pair["rows"][key]
        assert row["reference_mean"] == pytest.approx(evaluated["fold_0"][key]["value"], abs=1e-6)
        assert row["candidate"] == pytest.approx(evaluated["fold_1"][key]["value"], abs=1e-6)
        assert row["diff"] == pytest.approx(row["candidate"] - row["reference_mean"])


def test_paired_runs_refuses_runs_scored_on_different_images(cv_run, members):
    done = run_benchmark("paired_runs.py", str(cv_run / "fold_0"), str(members[0]), "--split", "val", ok=False)
    assert done.returncode != 0 and "hold different images" in done.stderr and "--splits" in done.stderr


def test_isic_file_encodes_an_operating_point_that_moves_decisions(cv_run, synth_dir, tmp_path, capsys):
    run = tmp_path / "cv"
    shutil.copytree(cv_run, run)
    point = checkpoint.read(run)["operating_point"]
    point["bias"] = point["bias_tta"] = [3.0 if c == "mel" else 0.0 for c in point["classes"]]
    checkpoint.set_entry(run, "operating_point", point)
    files = images(synth_dir, 12)
    assert main(["predict", "--run-dir", str(run), *files, "--format", "json", "--isic-csv", str(tmp_path / "s.csv"),
                 "--no-pool-lesions"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    sub = pd.read_csv(tmp_path / "s.csv", dtype={"image": str})
    decided = [r["prediction"] for r in doc["predictions"]]
    argmax_p = [max(r["probabilities"], key=r["probabilities"].get) for r in doc["predictions"]]
    assert decided != argmax_p  # the bias moves some decisions, so the file must differ from p
    to_label = {v: k for k, v in ISIC_COLUMNS.items()}
    assert [to_label[c] for c in sub[list(ISIC_COLUMNS.values())].idxmax(axis=1)] == decided


def test_a_finished_cv_resumes_only_what_is_missing(cv_run, capsys):
    run = cv_run.parent / "cv_resume"
    shutil.copytree(cv_run, run)
    untouched = (run / "fold_0" / "best.pt").stat().st_mtime_ns
    (run / "fold_2" / "oof_logits.npz").unlink()
    (run / "cv.json").unlink()
    argv = ["train", "--out", str(run.parent), "--run-name", run.name, "--folds", "3", "--resume"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fold 1/3: done" in out and "fold 3/3: training" in out
    assert (run / "fold_0" / "best.pt").stat().st_mtime_ns == untouched
    assert json.loads((run / "cv.json").read_text())["temperature"] == pytest.approx(
        checkpoint.read(cv_run)["temperature"], rel=1e-6)  # fmt: skip
    assert main(argv[:-1]) == 2  # without --resume a finished CV is not overwritten
    assert "already holds a cross-validation run" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--fold", "1"], "--fold needs --folds"),
    (["--folds", "3", "--fold", "3"], "--fold must be in 0..2"),
    (["--folds", "3", "--splits", "x.csv"], "drop --splits"),
    (["--folds", "1"], "expected an integer >= 2"),
])  # fmt: skip
def test_fold_flags_are_checked_before_any_work(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) if message.startswith("expected") else contextlib.nullcontext():
        assert main(["train", "--out", str(tmp_path), "--run-name", "r", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_isic_file_that_cannot_be_written_is_one_line(ensemble_dir, synth_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["predict", "--run-dir", str(ensemble_dir), images(synth_dir, 1)[0], "--isic-csv", str(blocker / "s.csv")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "--isic-csv" in err[-1] and "Traceback" not in "".join(err)
