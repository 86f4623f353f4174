"""The decision chain is the one place where logits become decisions: its steps in order, and every consumer
(evaluate, predict with both backends, the Python API, serve, Grad-CAM) giving the same probabilities and
decisions for the same images of a run with every step on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import skinlesion
from skinlesion.classes import CLASSES
from skinlesion.cli import main
from skinlesion.data.images import open_rgb
from skinlesion.data.run_folder import run_table
from skinlesion.decision import lesion_pooling, operating_point
from skinlesion.decision.chain import DecisionChain, softmax
from skinlesion.evaluation import fitting
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.model import checkpoint, logit_adjustment

P_COLS = [f"p_{c}" for c in CLASSES]
MEL = CLASSES.index("mel")


# ------------------------------------------------------------------------------------------------ the steps
def test_the_chain_applies_its_steps_in_order():
    rng = np.random.default_rng(0)
    views = rng.normal(0, 2, (8, 6, len(CLASSES)))
    offsets = rng.normal(0, 1, (6, len(CLASSES)))
    ids = ["a", "a", "b", "c", "c", "c"]
    bias = np.zeros(len(CLASSES))
    bias[MEL] = 1.5
    point = {"classes": list(CLASSES), "min_sensitivity": {"mel": 0.8}, "bias": (bias / 2).tolist(),
             "bias_tta": bias.tolist(), "fitted_on": "val"}  # fmt: skip
    chain = DecisionChain(tuple(CLASSES), temperature=1.7, operating_point=point, tta_views=8, pool_lesions=True)
    got = chain(views, offsets, ids)
    # By hand: mean over views, / T, + offsets, softmax, geometric mean per lesion, + TTA bias, argmax.
    p = softmax(views.mean(0) / 1.7 + offsets)
    pooled = lesion_pooling.pool(p, ids)
    np.testing.assert_allclose(got.probabilities, pooled, atol=1e-12)
    np.testing.assert_array_equal(got.labels, (np.log(pooled) + bias).argmax(1))
    assert got.names == [CLASSES[k] for k in got.labels]
    # One view: the single-view bias; no lesion ids: no pooling.
    single = chain(views[:1], offsets)
    np.testing.assert_allclose(single.probabilities, softmax(views[0] / 1.7 + offsets), atol=1e-12)
    np.testing.assert_array_equal(single.labels, (views[0] / 1.7 + offsets + bias / 2).argmax(1))
    # The temperature scales the image logits only, not the metadata offsets.
    assert not np.allclose(chain.logits(views, offsets), (views.mean(0) + offsets) / 1.7)


def test_steps_are_switched_off_by_replace_and_the_chain_stays_frozen():
    chain = DecisionChain(tuple(CLASSES), temperature=2.0, pool_lesions=True)
    plain = chain.replace(temperature=1.0, pool_lesions=False)
    assert (chain.temperature, chain.pool_lesions) == (2.0, True)
    z = np.random.default_rng(1).normal(size=(3, len(CLASSES)))
    np.testing.assert_allclose(plain(z, lesion_ids=["x", "x", "y"]).probabilities, softmax(z))
    with pytest.raises(AttributeError):
        chain.temperature = 3.0  # type: ignore[misc]


def test_a_class_order_mismatch_is_refused():
    point = {"classes": list(reversed(CLASSES)), "min_sensitivity": {"mel": 0.8}, "bias": [0.0] * 7}
    with pytest.raises(skinlesion.errors.SkinLesionError, match="class order"):
        DecisionChain(tuple(CLASSES), operating_point=point)


# ------------------------------------------------------------------------------------------------ consumers
@pytest.fixture(scope="module")
def full_run(tiny_run, tmp_path_factory) -> Path:
    """tiny_run with every step on: logit adjustment, T != 1, metadata prior, 8 TTA views, lesion pooling and an
    operating point raising melanoma; exported to ONNX after all of them."""
    run = tmp_path_factory.mktemp("chain") / "tiny"
    shutil.copytree(tiny_run, run)
    logit_adjustment.set_logit_adjustment(run, 1.0)
    checkpoint.set_temperature(run, 1.7)
    ckpt = checkpoint.read(run)
    checkpoint.set_entry(run, "config", {**ckpt["config"], "tta_views": 8, "pool_lesions": True})
    assert fitting.fit_metadata_prior(run) is not None
    point = fitting.set_operating_point(run, {"mel": 1.0})  # every val melanoma: a bias that moves decisions
    assert point["bias_tta"][MEL] > 0
    export_onnx(run)
    return run


def decisive(chain: DecisionChain, probabilities: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Images whose decision does not hang on less than ``margin`` (ONNX Runtime's parity tolerance): the operating
    point is set just above a tie (operating_point.MARGIN), so an image exactly at it may go either way."""
    from skinlesion.decision import operating_point

    bias = operating_point.vector(chain.operating_point, chain.classes, True)
    scores = np.sort(np.log(np.clip(probabilities, 1e-300, None)) + (0 if bias is None else bias), axis=1)
    return scores[:, -1] - scores[:, -2] > margin


def test_every_consumer_gives_the_same_probabilities_and_decisions(full_run, tmp_path, capsys):
    chain = DecisionChain.from_meta(checkpoint.read(full_run))
    assert chain.tta_views == 8 and chain.pool_lesions and chain.metadata_prior and chain.operating_point
    assert chain.temperature == pytest.approx(1.7)

    assert main(["evaluate", "--run-dir", str(full_run), "--tta", "--bootstrap", "0"]) == 0
    evaluated = pd.read_csv(full_run / "predictions_tta.csv", dtype={"image_id": str, "lesion_id": str})
    assert json.loads((full_run / "metrics.json").read_text())["lesion_pooling"]["applied"]
    table = run_table(full_run).set_index("image_id").loc[evaluated["image_id"]].reset_index()
    files = [Path(p) for p in table["path"]]
    meta_csv = tmp_path / "meta.csv"
    table.assign(image_id=[f.stem for f in files])[["image_id", "lesion_id", "age", "sex", "localization"]].to_csv(
        meta_csv, index=False
    )
    expected, decided = evaluated[P_COLS].to_numpy(float), evaluated["y_pred"].tolist()
    # The operating point moves some decisions away from the most probable class: the check has teeth.
    assert (np.asarray(CLASSES)[expected.argmax(1)] != np.asarray(decided)).any()

    capsys.readouterr()
    for backend in ("torch", "onnx"):
        argv = ["predict", "--run-dir", str(full_run), "--backend", backend, "--tta", "--format", "json",
                "--metadata", str(meta_csv), *map(str, files)]  # fmt: skip
        assert main(argv) == 0
        rows = json.loads(capsys.readouterr().out)["predictions"]
        got = np.array([[r["probabilities"][c] for c in CLASSES] for r in rows])
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=backend)
        # evaluate reads the image cache, predict the files: one preprocessing, equal within 1e-5, so an image
        # within that of the operating point's tie may go either way on either backend.
        firm = decisive(chain, expected)
        assert firm.mean() > 0.9
        assert [r["prediction"] for r, f in zip(rows, firm, strict=True) if f] == np.asarray(decided)[firm].tolist()

    for source in (full_run, full_run / "model.onnx"):
        api = skinlesion.load(source).predict(files, tta=True, clinical=table, lesion_ids=table["lesion_id"].tolist())
        np.testing.assert_allclose(api.probabilities, expected, atol=1e-5, err_msg=str(source))
        firm = decisive(chain, expected)
        assert np.asarray(api.names)[firm].tolist() == np.asarray(decided)[firm].tolist()


def test_single_image_consumers_agree_with_predict(full_run, capsys):
    """serve and Grad-CAM see one image (no TTA, no pooling): they match predict on that image."""
    from fastapi.testclient import TestClient

    from skinlesion.reporting.explain import explain
    from skinlesion.serve.app import create_app

    image = Path(run_table(full_run).query("split == 'val'")["path"].iloc[0])
    clinical = {"age": 70.0, "sex": "male", "localization": "back"}
    assert main(["predict", "--run-dir", str(full_run), "--format", "json", "--age", "70", "--sex", "male",
                 "--site", "back", str(image)]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out)["predictions"][0]
    expected = np.array([row["probabilities"][c] for c in CLASSES])

    client = TestClient(create_app(full_run, backend="onnx"))
    with open(image, "rb") as f:
        served = client.post("/api/predict", files={"file": ("x.jpg", f, "image/jpeg")},
                             data={k: str(v) for k, v in {**clinical, "site": "back"}.items() if k != "localization"})
    assert served.status_code == 200, served.text
    body = served.json()
    np.testing.assert_allclose([body["probabilities"][c] for c in CLASSES], expected, atol=1e-5)
    assert body["prediction"] == row["prediction"]

    exp = explain(skinlesion.load(full_run), open_rgb(image), clinical=pd.DataFrame([clinical]))
    np.testing.assert_allclose(exp.probs, expected, atol=1e-5)
    assert exp.predicted == row["prediction"]
    # The decision is the operating point's, not the argmax, wherever they differ.
    bias = operating_point.vector(DecisionChain.from_meta(checkpoint.read(full_run)).operating_point, CLASSES)
    assert row["prediction"] == CLASSES[int(operating_point.decide(expected[None], bias)[0])]


def test_the_command_line_switches_change_only_what_they_name():
    point = {"classes": list(CLASSES), "min_sensitivity": {"mel": 0.8}, "bias": [0.0] * 7, "fitted_on": "val"}
    chain = DecisionChain(tuple(CLASSES), 1.3, {"categories": {}}, point, tta_views=4, pool_lesions=True)
    assert chain.switched() == chain
    off = chain.switched(8, metadata_prior=False, operating_point=False, pool_lesions=False)
    assert (off.tta_views, off.metadata_prior, off.operating_point, off.pool_lesions) == (8, None, None, False)
    assert off.temperature == 1.3 and chain.switched(pool_lesions=None).pool_lesions
