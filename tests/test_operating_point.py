"""The operating point: fit / decide, and every stage that decides with it from the CLI (operating-point,
train, evaluate, calibrate, predict with both backends, serve, report)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import recall_score

from skinlesion import metrics
from skinlesion.classes import CLASS_INDEX, CLASSES
from skinlesion.cli import main
from skinlesion.decision import operating_point
from skinlesion.decision.chain import softmax
from skinlesion.errors import SkinLesionError
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.model import checkpoint

MEL = CLASS_INDEX["mel"]


def noisy_logits(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits that know the class only weakly, with melanoma under-called (nevus-heavy, as on HAM10000)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(CLASSES), n, p=[0.04, 0.05, 0.11, 0.02, 0.12, 0.62, 0.04])
    z = rng.normal(0, 1.0, (n, len(CLASSES)))
    z[np.arange(n), y] += 1.2
    z[:, CLASS_INDEX["nv"]] += 0.8
    return z, y


def test_parse_targets_reads_class_fraction_pairs_and_refuses_the_rest():
    assert operating_point.parse_targets("mel=0.75", CLASSES) == {"mel": 0.75}
    both = {"mel": 0.8, "bcc": 0.6, "vasc": 1.0}
    assert operating_point.parse_targets(["mel=0.8,bcc=0.6", "vasc=1"], CLASSES) == both
    assert operating_point.parse_targets(None, CLASSES) == {}
    bad = {"melanoma=0.7": "CLASS one of akiec", "mel": "CLASS=FRACTION", "mel=1.5": "a fraction in (0, 1]",
           "mel=abc": "a fraction", "mel=0": "a fraction"}  # fmt: skip
    for spec, message in bad.items():
        with pytest.raises(SkinLesionError, match=re.escape(message)):
            operating_point.parse_targets(spec, CLASSES)


def test_fit_finds_the_smallest_bias_that_reaches_the_sensitivity():
    z, y = noisy_logits()
    before = operating_point.recall(z, y, MEL)
    assert before < 0.6
    bias = operating_point.fit(z, y, CLASSES, {"mel": 0.8})
    assert bias[MEL] > 0 and np.count_nonzero(bias) == 1  # only melanoma is raised
    assert operating_point.recall(z + bias, y, MEL) >= 0.8
    # Smallest: a hair less and the target is missed; a brute-force scan agrees.
    assert operating_point.recall(z + bias - 2e-6 * np.eye(len(CLASSES))[MEL], y, MEL) < 0.8
    grid = np.linspace(0, 5, 5001)
    first = next(b for b in grid if operating_point.recall(z + b * np.eye(len(CLASSES))[MEL], y, MEL) >= 0.8)
    assert bias[MEL] == pytest.approx(first, abs=1.1e-3)
    # Already met: no bias (the operating point never lowers a class).
    assert np.array_equal(operating_point.fit(z, y, CLASSES, {"mel": before / 2}), np.zeros(len(CLASSES)))


def test_fit_meets_several_targets_at_once():
    z, y = noisy_logits(seed=1)
    bias = operating_point.fit(z, y, CLASSES, {"mel": 0.8, "bkl": 0.7})
    assert operating_point.recall(z + bias, y, MEL) >= 0.8
    assert operating_point.recall(z + bias, y, CLASS_INDEX["bkl"]) >= 0.7
    with pytest.raises(SkinLesionError, match="no df image"):
        operating_point.fit(z[y != CLASS_INDEX["df"]], y[y != CLASS_INDEX["df"]], CLASSES, {"df": 0.5})


def test_decide_is_the_argmax_of_log_probabilities_plus_bias():
    z, _ = noisy_logits()
    probs = softmax(z)
    bias = np.eye(len(CLASSES))[MEL] * 0.7
    assert np.array_equal(operating_point.decide(probs, None), probs.argmax(1))
    assert np.array_equal(operating_point.decide(probs, bias), (z + bias).argmax(1))
    per_image = np.where(np.arange(len(z))[:, None] % 2 == 0, bias, 0.0)  # (N, C): the ablation's out-of-fold bias
    expected = np.where(np.arange(len(z)) % 2 == 0, (z + bias).argmax(1), z.argmax(1))
    assert np.array_equal(operating_point.decide(probs, per_image), expected)


def test_metrics_score_decisions_but_leave_probability_scores_alone():
    z, y = noisy_logits()
    probs = softmax(z)
    decided = operating_point.decide(probs, np.eye(len(CLASSES))[MEL] * 1.0)
    groups = np.arange(len(y)) // 2
    plain = metrics.evaluate(y, probs, groups, list(CLASSES), n_boot=50, seed=0)
    moved = metrics.evaluate(y, probs, groups, list(CLASSES), n_boot=50, seed=0, y_pred=decided)
    assert moved["per_class"]["mel"]["recall"]["value"] == pytest.approx(recall_score(y == MEL, decided == MEL))
    assert moved["per_class"]["mel"]["recall"]["value"] > plain["per_class"]["mel"]["recall"]["value"]
    for name in ("macro_auc", "ece", "log_loss", "brier"):  # properties of the probabilities, not of the decision
        assert moved[name] == plain[name]
    assert moved["accuracy"]["value"] == pytest.approx(float((decided == y).mean()))


# ------------------------------------------------------------------------------------------------ CLI
def evaluate(run: Path, *flags: str) -> tuple[pd.DataFrame, dict]:
    assert main(["evaluate", "--run-dir", str(run), "--bootstrap", "20", *flags]) == 0
    return pd.read_csv(run / "predictions.csv"), json.loads((run / "metrics.json").read_text())



def exit_code(argv: list[str]) -> int:
    """main's exit code; a value refused while parsing is argparse's SystemExit(2)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def assert_one_error_line(err: str, message: str) -> None:
    """One error line naming the problem: ours alone, or argparse's usage lines then its one error line."""
    lines = err.strip().splitlines()
    assert message in lines[-1] and "error:" in lines[-1] and "Traceback" not in err
    assert len(lines) == 1 or lines[0].startswith("usage:")

@pytest.fixture(scope="module")
def weakest(tiny_run, tmp_path_factory) -> tuple[Path, str]:
    """A copy of tiny_run at temperature 1.5 and the class it recalls worst on val (below 1)."""
    run = tmp_path_factory.mktemp("op") / "tiny"
    shutil.copytree(tiny_run, run)
    checkpoint.set_temperature(run, 1.5)
    _, m = evaluate(run)
    recalls = {c: m["per_class"][c]["recall"]["value"] for c in CLASSES}
    name = min(recalls, key=recalls.get)
    assert recalls[name] < 1.0, "the tiny model is perfect on val: nothing for an operating point to move"
    return run, name


def copy_of(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_operating_point_cli_sets_the_bias_and_evaluate_decides_with_it(weakest, tmp_path, capsys):
    name = weakest[1]
    run = copy_of(weakest[0], tmp_path / "tiny")
    plain, m_plain = evaluate(run)
    argv = ["operating-point", "--run-dir", str(run), "--min-sensitivity", f"{name}=1.0", "--no-tta"]
    assert main(argv) == 0
    assert f"operating point {name} >= 1" in capsys.readouterr().out
    point = checkpoint.read(run)["operating_point"]
    assert point["min_sensitivity"] == {name: 1.0} and point["fitted_on"] == "val"
    assert point["tta_views"] is None and point["bias_tta"] is None  # --no-tta: the single-view bias only
    assert point["sensitivity_after"][name] == 1.0 > point["sensitivity_before"][name]
    assert point["temperature"] == 1.5

    decided, m = evaluate(run)
    assert "in-sample" in capsys.readouterr().out
    assert m["operating_point"]["min_sensitivity"] == {name: 1.0}
    assert m["per_class"][name]["recall"]["value"] == 1.0  # scored on the images it was set on: exactly met
    cols = [f"p_{c}" for c in CLASSES]
    pd.testing.assert_frame_equal(decided[cols], plain[cols])  # the probabilities do not move ...
    for key in ("macro_auc", "ece", "log_loss"):
        assert m[key] == m_plain[key]
    bias = np.asarray(point["bias"])
    expected = np.asarray(CLASSES)[operating_point.decide(decided[cols].to_numpy(), bias)]
    assert decided["y_pred"].tolist() == expected.tolist()  # ... the decisions do
    assert (decided["y_pred"] != plain["y_pred"]).any()
    # --no-operating-point scores the argmax again; --remove takes it out of best.pt.
    again, m_off = evaluate(run, "--no-operating-point")
    assert again["y_pred"].tolist() == plain["y_pred"].tolist() and m_off["operating_point"] is None
    assert main(["operating-point", "--run-dir", str(run), "--remove"]) == 0
    assert "operating_point" not in checkpoint.read(run) and Classifier.load(run).chain.operating_point is None


def test_one_pass_sets_a_bias_for_single_views_and_one_for_the_tta_views(weakest, tmp_path):
    """TTA moves the logits, so each kind of decision gets its own threshold, both met on val."""
    run = copy_of(weakest[0], tmp_path / "tta")
    assert main(["operating-point", "--run-dir", str(run), "--min-sensitivity", f"{weakest[1]}=1"]) == 0
    point = checkpoint.read(run)["operating_point"]
    assert point["tta_views"] == 4 and point["bias_tta"] is not None
    assert point["sensitivity_after"][weakest[1]] == 1.0 == point["sensitivity_after_tta"][weakest[1]]
    plain, m = evaluate(run, "--tta")
    assert m["per_class"][weakest[1]]["recall"]["value"] == 1.0
    assert m["with_tta"]["per_class"][weakest[1]]["recall"]["value"] == 1.0
    tta = pd.read_csv(run / "predictions_tta.csv")
    cols = [f"p_{c}" for c in CLASSES]
    expected = operating_point.decide(tta[cols].to_numpy(), np.asarray(point["bias_tta"]))
    assert tta["y_pred"].tolist() == np.asarray(CLASSES)[expected].tolist()
    assert plain["y_pred"].tolist() == np.asarray(CLASSES)[
        operating_point.decide(plain[cols].to_numpy(), np.asarray(point["bias"]))
    ].tolist()


def test_refusals_that_need_no_model_pass(weakest, tmp_path, capsys):
    """A split without the class, or without images, is refused before the model runs over it."""
    run = copy_of(weakest[0], tmp_path / "noclass")
    splits = pd.read_csv(run / "splits.csv")
    splits.loc[(splits["split"] == "val") & (splits["dx"] == weakest[1]), "split"] = "train"
    splits.to_csv(run / "splits.csv", index=False)
    for argv, message in [
        (["--min-sensitivity", f"{weakest[1]}=0.8"], f"the val split has no {weakest[1]} image"),
        (["--min-sensitivity", "mel=0.8", "--split", "test"], "has no 'test' images"),
        (["--min-sensitivity", "mel=0.8", "--remove"], "leave --min-sensitivity off"),
        (["--min-sensitivity", "mel=0.8,mel=0.9"], "names mel twice"),
    ]:
        assert exit_code(["operating-point", "--run-dir", str(run), *argv]) == 2
        assert_one_error_line(capsys.readouterr().err, message)
    assert "operating_point" not in checkpoint.read(run)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-sensitivity", "melanoma=0.7"], "CLASS one of akiec"),
        (["--min-sensitivity", "mel=2"], "a fraction in (0, 1]"),
        ([], "say which class needs which sensitivity"),
    ],
)
def test_operating_point_refuses_bad_targets_in_one_line(tiny_run, capsys, argv, message):
    before = (tiny_run / "best.pt").read_bytes()
    assert exit_code(["operating-point", "--run-dir", str(tiny_run), *argv]) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert (tiny_run / "best.pt").read_bytes() == before  # nothing written


@pytest.fixture(scope="module")
def strong_run(weakest, tmp_path_factory) -> tuple[Path, str]:
    """A run whose operating point raises the weakest class by a wide margin (bias 4), exported afterwards:
    predict / serve / ONNX must decide that class for images whose argmax is something else."""
    src, name = weakest
    run = tmp_path_factory.mktemp("strong") / "tiny"
    shutil.copytree(src, run)
    bias = np.zeros(len(CLASSES))
    bias[CLASS_INDEX[name]] = 4.0
    point = {"classes": list(CLASSES), "min_sensitivity": {name: 1.0}, "bias": bias.tolist(), "bias_tta": None,
             "fitted_on": "val", "tta_views": None, "temperature": 1.5}  # fmt: skip
    checkpoint.set_entry(run, "operating_point", point)
    export_onnx(run)
    return run, name


@pytest.fixture(scope="module")
def images(synth_dir, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("op_in")
    files = []
    for src in sorted((synth_dir / "images").glob("*.jpg"))[::12][:16]:
        files.append(out / src.name)
        shutil.copy(src, files[-1])
    return files


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_decides_with_the_operating_point_in_both_backends(strong_run, images, capsys, backend):
    run, name = strong_run
    argv = ["predict", "--run-dir", str(run), "--backend", backend, *map(str, images), "--format", "json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert main([*argv, "--no-operating-point"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert doc["operating_point"]["min_sensitivity"] == {name: 1.0} and plain["operating_point"] is None
    bias = np.asarray(doc["operating_point"]["bias"])
    moved = 0
    for row, ref in zip(doc["predictions"], plain["predictions"], strict=True):
        probs = np.array([row["probabilities"][c] for c in CLASSES])
        assert row["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-6)
        assert ref["prediction"] == CLASSES[int(probs.argmax())]
        assert row["prediction"] == CLASSES[int(operating_point.decide(probs[None], bias)[0])]
        assert row["top_k"][0]["class"] == ref["prediction"]  # top-k stays ordered by probability
        moved += row["prediction"] != ref["prediction"]
    assert moved > 0


def test_onnx_export_carries_the_operating_point(strong_run):
    onnx = Classifier.load(strong_run[0], "onnx")
    assert onnx.chain.operating_point == Classifier.load(strong_run[0]).chain.operating_point is not None


def test_serve_reports_and_decides_with_the_operating_point(strong_run, images):
    from skinlesion.serve.app import create_app

    run, name = strong_run
    client = TestClient(create_app(run, backend="torch"))
    info = client.get("/api/model").json()["operating_point"]
    assert info["min_sensitivity"] == {name: 1.0} and f"{name} >= 1" in info["text"]
    bias = np.asarray(checkpoint.read(run)["operating_point"]["bias"])
    overruled = 0
    for path in images[:6]:
        out = client.post("/api/predict", files={"file": ("x.jpg", path.read_bytes(), "image/jpeg")}).json()
        probs = np.array([out["probabilities"][c] for c in CLASSES])
        assert out["prediction"] == CLASSES[int(operating_point.decide(probs[None], bias)[0])]
        overruled += out["prediction"] == name != CLASSES[int(probs.argmax())]
    assert overruled > 0


def test_serve_without_an_operating_point_says_so(tiny_run):
    from skinlesion.serve.app import create_app

    assert TestClient(create_app(tiny_run, backend="torch")).get("/api/model").json()["operating_point"] is None


def test_calibrate_and_the_metadata_prior_set_the_operating_point_again(weakest, tmp_path, capsys):
    """Both change the probabilities the bias was set on; each sets it again with the same targets."""
    run = copy_of(weakest[0], tmp_path / "cal")
    assert main(["operating-point", "--run-dir", str(run), "--min-sensitivity", f"{weakest[1]}=1", "--no-tta"]) == 0
    assert main(["calibrate", "--run-dir", str(run)]) == 0
    assert "the new temperature: re-set the operating point" in capsys.readouterr().out
    ckpt = checkpoint.read(run)
    assert ckpt["operating_point"]["temperature"] == pytest.approx(ckpt["temperature"]) != 1.5
    assert ckpt["operating_point"]["bias_tta"] is None  # set again as it was: single views only
    _, m = evaluate(run)
    assert m["per_class"][weakest[1]]["recall"]["value"] == 1.0
    assert main(["fit-metadata-prior", "--run-dir", str(run)]) == 0
    assert "the metadata prior: re-set the operating point" in capsys.readouterr().out
    assert checkpoint.read(run)["operating_point"]["metadata_prior"] is True
    _, m = evaluate(run)
    assert m["metadata_prior"]["applied"] and m["per_class"][weakest[1]]["recall"]["value"] == 1.0


def test_report_says_which_decisions_it_shows(strong_run, tmp_path, capsys):
    run, name = copy_of(strong_run[0], tmp_path / "report"), strong_run[1]
    decided, _ = evaluate(run)
    assert main(["report", "--run-dir", str(run)]) == 0  # with the Grad-CAM gallery, titled by the decisions
    html = (run / "report.html").read_text()
    assert "· operating point" in html and f"{name} &gt;= 1 (bias +4.00) (decisions only" in html
    assert f"predicted {name} (" in html and "holds an operating point" not in html
    assert (decided["y_pred"] == name).sum() > (decided["y_true"] == name).sum()  # bias 4 calls it often
    evaluate(run, "--no-operating-point")
    assert main(["report", "--run-dir", str(run), "--no-gallery"]) == 0
    assert "holds an operating point that these predictions do not use" in (run / "report.html").read_text()
    evaluate(run)
    zero = {**checkpoint.read(run)["operating_point"], "bias": [0.0] * len(CLASSES)}
    checkpoint.set_entry(run, "operating_point", zero)
    assert main(["report", "--run-dir", str(run), "--no-gallery"]) == 0
    assert "decided with an operating point best.pt no longer holds" in (run / "report.html").read_text()


def test_train_sets_the_operating_point_last_and_refuses_a_typo_first(synth_dir, tmp_path, capsys):
    base = ["train", "--data-dir", str(synth_dir), "--out", str(tmp_path), "--backbone", "efficientnet_b0",
            "--no-pretrained", "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--max-train-batches", "2",
            "--workers", "0"]  # fmt: skip
    assert exit_code([*base, "--run-name", "typo", "--min-sensitivity", "mel=70"]) == 2
    assert_one_error_line(capsys.readouterr().err, "a fraction in (0, 1]") and not (tmp_path / "typo").exists()
    assert main([*base, "--run-name", "op", "--min-sensitivity", "mel=0.9"]) == 0
    assert "operating point mel >= 0.9" in capsys.readouterr().out
    ckpt = checkpoint.read(tmp_path / "op")
    assert ckpt["config"]["min_sensitivity"] == "mel=0.9"
    point = ckpt["operating_point"]
    assert point["tta_views"] == 4 and point["sensitivity_after"]["mel"] >= 0.9 <= point["sensitivity_after_tta"]["mel"]
