"""Temperature scaling: finds T > 1 for an over-confident model and lowers ECE on held-out data;
``skinlesion calibrate`` stores T in best.pt and the decision chain / evaluate use it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from skinlesion import metrics
from skinlesion.classes import CLASSES
from skinlesion.cli import main
from skinlesion.data.split import lesion_folds
from skinlesion.decision import temperature as calibration
from skinlesion.decision.chain import DecisionChain, softmax
from skinlesion.inference.classifier import Classifier
from skinlesion.model import checkpoint


def _calibrated_logits(n: int, seed: int):
    """Logits whose softmax is calibrated by construction: labels are drawn from softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 7))
    p = softmax(z)
    y = np.array([rng.choice(7, p=row) for row in p])
    return z, y


def test_overconfident_model_gets_t_above_one_and_lower_ece():
    z_fit, y_fit = _calibrated_logits(3000, seed=0)
    z_held, y_held = _calibrated_logits(3000, seed=1)
    over_fit, over_held = 5 * z_fit, 5 * z_held  # deliberately over-confident
    t = calibration.fit_temperature(over_fit, y_fit)
    assert t == pytest.approx(5.0, rel=0.15)
    before, after = softmax(over_held), softmax(over_held / t)
    assert metrics.ece(y_held, after) < 0.5 * metrics.ece(y_held, before)
    assert (
        metrics.point_metrics(y_held, after)["overall"]["log_loss"]
        < metrics.point_metrics(y_held, before)["overall"]["log_loss"]
    )


def test_fit_accepts_inference_mode_tensors():
    z, y = _calibrated_logits(500, seed=2)
    with torch.inference_mode():
        logits = torch.from_numpy(3 * z).float()
    assert calibration.fit_temperature(logits.numpy(), y) > 1.5


def test_crossfit_scores_out_of_fold_by_lesion():
    z, y = _calibrated_logits(800, seed=3)
    groups = np.repeat(np.arange(400), 2)
    folds = lesion_folds(y, groups, 2, seed=0)
    # Both images of a lesion are in the same fold.
    assert np.all(folds[0::2] == folds[1::2])
    result = calibration.calibrate(CLASSES, 4 * z, y, lesions=groups, method="crossfit", folds=2, seed=0)
    assert all(t > 2 for t in result["fold_temperatures"])
    assert result["after"]["ece"] < result["before"]["ece"]
    assert result["n_scored"] == 800


def test_calibrate_cli_stores_temperature_used_by_predictor_and_evaluate(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["calibrate", "--run-dir", str(run), "--device", "cpu"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    stored = checkpoint.read(run)["temperature"]
    assert stored == pytest.approx(cal["temperature"]) and stored != 1.0
    assert {"ece", "log_loss"} <= set(cal["before"]) and len(cal["reliability"]["after"]["count"]) == 15
    assert "ECE" in capsys.readouterr().out

    chain = Classifier.load(run).chain
    assert chain.temperature == pytest.approx(stored)
    assert chain == DecisionChain.from_meta(checkpoint.read(run))
    z = torch.randn(4, 7)
    np.testing.assert_allclose(chain.probabilities(z.numpy()), torch.softmax(z / stored, 1).numpy(), rtol=1e-5)

    assert main(["evaluate", "--run-dir", str(run), "--device", "cpu", "--bootstrap", "50", "--no-cache"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["temperature"] == pytest.approx(stored)
