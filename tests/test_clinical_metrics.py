"""Per-class clinical metrics: a hand-computed fixture, ISIC's partial AUC definition, and the bootstrap rows
equal to the point metrics on the images a resample repeats."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import sklearn.metrics

from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import clinical_metrics as cm

CLASSES = ["nv", "mel", "bcc"]
# Melanomas score p_mel 0.9, 0.7, 0.4, 0.2; the others 0.8, 0.5, 0.2 (a tie with a melanoma), 0.1, 0.05, 0.02.
P_MEL = np.array([0.9, 0.7, 0.4, 0.2, 0.8, 0.5, 0.2, 0.1, 0.05, 0.02])
Y = np.array([1, 1, 1, 1, 0, 0, 0, 2, 2, 0])
DECIDED = np.array([1, 1, 0, 0, 1, 1, 0, 0, 0, 0])  # melanoma called at p_mel >= 0.5 (an operating point)


def fixture_probs() -> np.ndarray:
    rest = 1.0 - P_MEL
    return np.stack([rest * 0.6, P_MEL, rest * 0.4], axis=1)


def isic_auc_above_sensitivity(truth, prediction, weights, sensitivity_threshold):
    """isic-challenge-scoring 5.6.0, isic_challenge_scoring/metrics.py, auc_above_sensitivity (Apache-2.0),
    transcribed with its _roc_curve helper (zero weights dropped, then roc_curve(drop_intermediate=False))."""
    keep = weights != 0
    truth, prediction, weights = truth[keep], prediction[keep], weights[keep]
    fp_rates, tp_rates, _ = sklearn.metrics.roc_curve(
        truth, prediction, sample_weight=None if (weights == 1.0).all() else weights, drop_intermediate=False
    )
    threshold_index = tp_rates.searchsorted(sensitivity_threshold, side="left")
    tp_rates_segment = tp_rates[threshold_index:]
    fp_rates_segment = fp_rates[threshold_index:]
    fp_rate_threshold = np.interp(
        sensitivity_threshold,
        tp_rates[threshold_index - 1 : threshold_index + 1],
        fp_rates[threshold_index - 1 : threshold_index + 1],
    )
    tp_rates_segment = np.insert(tp_rates_segment, 0, sensitivity_threshold)
    fp_rates_segment = np.insert(fp_rates_segment, 0, fp_rate_threshold)
    return sklearn.metrics.auc(fp_rates_segment, tp_rates_segment)


def test_hand_computed_fixture():
    r = cm.evaluate(Y, DECIDED, fixture_probs(), np.arange(10), CLASSES, positive_class="mel", n_boot=0,
                    levels=(0.5, 0.75, 0.8, 0.9))  # fmt: skip
    mel = {k: v["value"] for k, v in r["per_class"]["mel"].items() if isinstance(v, dict)}
    # Decisions: TP 2 (0.9, 0.7), FN 2 (0.4, 0.2), FP 2 (0.8, 0.5), TN 4.
    assert mel["sensitivity"] == pytest.approx(0.5) and mel["ppv"] == pytest.approx(0.5)
    assert mel["specificity"] == pytest.approx(4 / 6) and mel["npv"] == pytest.approx(4 / 6)
    # Pairs ranked right: 6 + 5 + 4 + 3 and the tie at 0.2 half: 18.5 / 24.
    assert mel["auc"] == pytest.approx(18.5 / 24)
    # ROC reaches TPR 0.8 between (2/6, 0.75) and (3/6, 1.0): FPR there 1/3 + 0.2 * 1/6 = 11/30; the area from
    # 11/30 to 1/2 is (2/15) * (0.8 + 1) / 2 = 0.12, then 0.5 at TPR 1.
    assert mel["auc_80"] == pytest.approx(0.62)
    # Precision at each melanoma's threshold: 1, 2/3, 3/5, 4/7 (the tie group), a quarter of the recall each.
    assert mel["average_precision"] == pytest.approx(0.25 * (1 + 2 / 3 + 3 / 5 + 4 / 7))
    at = r["positive_class"]
    sens = {k: (v["value"], v["threshold"]) for k, v in at["sensitivity_at_specificity"].items()}
    spec = {k: (v["value"], v["threshold"]) for k, v in at["specificity_at_sensitivity"].items()}
    assert sens == {"0.5": (1.0, 0.2), "0.75": (0.5, 0.7), "0.8": (0.5, 0.7), "0.9": (0.25, 0.9)}
    assert spec["0.75"] == pytest.approx((4 / 6, 0.4)) and spec["0.8"] == spec["0.9"] == pytest.approx((0.5, 0.2))
    bcc = r["per_class"]["bcc"]
    assert bcc["ppv"]["value"] is None and bcc["sensitivity"]["value"] == 0.0  # nothing decided bcc: undefined
    assert r["per_class"]["nv"]["positives"] == 4 and json.loads(json.dumps(r)) == r


def test_specificity_level_is_met_exactly_despite_rounding():
    # 10 negatives and one false positive: specificity exactly 0.9, although 1 - 0.9 < 0.1 in floating point.
    positive = np.r_[np.ones(4, bool), np.zeros(10, bool)]
    score = np.r_[0.95, 0.9, 0.5, 0.3, 0.92, np.linspace(0.0, 0.2, 9)]
    assert cm.sensitivity_at_specificity(positive, score, 0.9) == (1.0, 0.3)  # without a tolerance: (0.25, 0.95)
    assert cm.specificity_at_sensitivity(positive, score, 0.5) == (0.9, 0.9)


@pytest.mark.parametrize("seed", range(6))
def test_partial_auc_is_isics_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(12, 300))
    positive = rng.random(n) < rng.uniform(0.1, 0.6)
    positive[:2] = [True, False]
    score = np.round(rng.random(n) * 0.5 + positive * rng.uniform(0, 0.5), int(rng.integers(1, 3)))  # many ties
    weights = rng.integers(0, 4, n).astype(float)
    weights[:2] = 1.0
    ones = np.ones(n)
    for level in (0.8, 0.5, 0.95):
        assert cm.partial_auc_above_sensitivity(positive, score, level) == pytest.approx(
            isic_auc_above_sensitivity(positive, score, ones, level), abs=1e-12)  # fmt: skip
        assert cm.partial_auc_above_sensitivity(positive, score, level, weights) == pytest.approx(
            isic_auc_above_sensitivity(positive, score, weights, level), abs=1e-12)  # fmt: skip
        fpr, tpr, *_ = cm.weighted_roc(positive, score, np.stack([ones, weights]))
        rows = cm._rows_partial_auc(fpr, tpr, level)
        assert rows == pytest.approx([isic_auc_above_sensitivity(positive, score, w, level) for w in (ones, weights)])


def test_partial_auc_matches_the_installed_isic_scorer():
    isic = pytest.importorskip("isic_challenge_scoring.metrics")  # not a dependency: checked where installed
    rng = np.random.default_rng(3)
    positive = rng.random(400) < 0.2
    score = np.round(rng.random(400) * 0.6 + positive * 0.3, 2)
    weights = pd.Series(rng.integers(1, 3, 400).astype(float))
    expected = isic.auc_above_sensitivity(pd.Series(positive.astype(float)), pd.Series(score), weights, 0.8)
    assert cm.partial_auc_above_sensitivity(positive, score, 0.8, weights.to_numpy()) == pytest.approx(expected)


def test_bootstrap_rows_equal_point_metrics_on_repeated_images():
    """A resample weight w means the image counted w times: each weighted row equals one_vs_rest (and the
    ROC operating points) on the data with every image repeated w times."""
    rng = np.random.default_rng(1)
    n, k = 150, 4
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n)
    probs[np.arange(n), y] += rng.uniform(0, 0.6, n)
    probs = np.round(probs / probs.sum(1, keepdims=True), 2)  # ties within a class's scores
    pred = (np.log(probs + 1e-9) + rng.normal(0, 0.3, (n, k))).argmax(1)
    w = rng.integers(0, 3, (3, n)).astype(float)
    rows = cm.weighted_one_vs_rest(y, pred, probs, w)
    for b in range(len(w)):
        rep = np.repeat(np.arange(n), w[b].astype(int))
        point = cm.one_vs_rest(y[rep], pred[rep], probs[rep])
        for name in cm.PER_CLASS:
            np.testing.assert_allclose(rows[name][b], point[name], atol=1e-12, err_msg=name)
        fpr, tpr, *_ = cm.weighted_roc(y == 2, probs[:, 2], w[b : b + 1])
        for level in cm.LEVELS:
            sens = cm.sensitivity_at_specificity(y[rep] == 2, probs[rep, 2], level)[0]
            spec = cm.specificity_at_sensitivity(y[rep] == 2, probs[rep, 2], level)[0]
            assert cm._rows_at(fpr, tpr, level, "specificity")[0] == pytest.approx(sens)
            assert cm._rows_at(fpr, tpr, level, "sensitivity")[0] == pytest.approx(spec)


def test_intervals_resample_lesions_and_are_seeded():
    rng = np.random.default_rng(2)
    n = 240
    lesions = np.repeat(np.arange(80), 3)
    y = np.repeat(rng.integers(0, 3, 80), 3)
    probs = np.repeat(rng.dirichlet(np.ones(3), 80), 3, axis=0) + rng.uniform(0, 0.05, (n, 3))  # a lesion's
    probs[np.arange(n), y] += 0.4  # images look alike
    probs /= probs.sum(1, keepdims=True)
    a = cm.evaluate(y, probs.argmax(1), probs, lesions, CLASSES, positive_class="mel", n_boot=300, seed=5)
    b = cm.evaluate(y, probs.argmax(1), probs, lesions, CLASSES, positive_class="mel", n_boot=300, seed=5)
    assert a == b and a["n_lesions"] == 80 and a["bootstrap"]["unit"] == "lesion"
    for entry in a["per_class"]["mel"].values():
        if isinstance(entry, dict):
            lo, hi = entry["ci95"]
            assert lo <= entry["value"] <= hi and hi - lo > 0.01
    for entry in a["positive_class"]["specificity_at_sensitivity"].values():
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    # Treating every image as its own unit narrows the intervals (images of a lesion are not independent here).
    c = cm.evaluate(y, probs.argmax(1), probs, np.arange(n), CLASSES, positive_class="mel", n_boot=300, seed=5)
    width = [e["auc"]["ci95"][1] - e["auc"]["ci95"][0] for e in (a["per_class"]["mel"], c["per_class"]["mel"])]
    assert width[1] < width[0]
    table = cm.per_class_table(a)
    assert list(table["class"]) == CLASSES and table.loc[1, "auc_lo"] == a["per_class"]["mel"]["auc"]["ci95"][0]


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(SkinLesionError, match="positive class 'mel' is not one of"):
        cm.evaluate(Y, DECIDED, fixture_probs(), np.arange(10), ["a", "b", "c"], positive_class="mel", n_boot=0)
    with pytest.raises(SkinLesionError, match=r"probabilities \(N, 4\)"):
        cm.evaluate(Y, DECIDED, fixture_probs(), np.arange(10), [*CLASSES, "x"], n_boot=0)
