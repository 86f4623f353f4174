"""Metrics equal scikit-learn's; the bootstrap resamples lesions; ECE by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from skinlesion import metrics
from skinlesion.classes import CLASSES

K = len(CLASSES)


def _fake_predictions(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    logits = rng.normal(size=(n, K)) + 2.0 * np.eye(K)[y]
    logits[:10] = np.round(logits[:10])  # some tied scores for the AUC tie handling
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    lesions = np.array([f"L{i // 2}" for i in range(n)])  # two images per lesion
    return y, probs, lesions


def test_point_metrics_equal_sklearn():
    y, p, _ = _fake_predictions()
    pred = p.argmax(1)
    m = metrics.point_metrics(y, p)["overall"]
    labels = list(range(K))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p, labels=labels))
    assert m["brier"] == pytest.approx(np.mean(((p - np.eye(K)[y]) ** 2).sum(1)))
    pc = metrics.point_metrics(y, p)["per_class"]
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels)
    np.testing.assert_allclose(pc["precision"], prec)
    np.testing.assert_allclose(pc["recall"], rec)
    np.testing.assert_allclose(pc["f1"], f1)
    np.testing.assert_array_equal(pc["support"], sup)
    np.testing.assert_allclose(pc["auc"], [skm.roc_auc_score(y == c, p[:, c]) for c in labels])


def test_weighted_metrics_equal_sklearn_with_sample_weight():
    y, p, lesions = _fake_predictions()
    w = metrics.lesion_weights(lesions, n_boot=3, seed=1)
    got = metrics.weighted_metrics(y, p, w)
    pred = p.argmax(1)
    for b in range(3):
        sw = w[b]
        assert got["accuracy"][b] == pytest.approx(skm.accuracy_score(y, pred, sample_weight=sw))
        assert got["weighted_f1"][b] == pytest.approx(skm.f1_score(y, pred, average="weighted", sample_weight=sw))
        assert got["log_loss"][b] == pytest.approx(skm.log_loss(y, p, sample_weight=sw, labels=list(range(K))))
        assert got["brier"][b] == pytest.approx(skm.brier_score_loss(y, p, sample_weight=sw, labels=list(range(K))))
        for c in range(K):
            assert got["auc"][b, c] == pytest.approx(skm.roc_auc_score(y == c, p[:, c], sample_weight=sw))
        # The same resample materialised as repeated rows gives the same ECE.
        idx = np.repeat(np.arange(len(y)), sw.astype(int))
        assert got["ece"][b] == pytest.approx(metrics.ece(y[idx], p[idx]))
        assert got["balanced_accuracy"][b] == pytest.approx(skm.balanced_accuracy_score(y[idx], pred[idx]))


def test_ece_by_hand():
    # Confidences 0.9, 0.9 (one right), 0.5 (right), 0.3 -> top class 0.4 after renormalising (wrong).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.4, 0.6]])
    y = np.array([0, 1, 0, 0])
    # bins: {0.9,0.9}: acc 0.5, conf 0.9 -> 0.4 * 2/4; {0.5}: acc 1 conf .5 -> .5 * 1/4; {0.6}: acc 0 -> .6/4
    assert metrics.ece(y, probs) == pytest.approx(0.4 * 0.5 + 0.5 * 0.25 + 0.6 * 0.25)


def test_bootstrap_resamples_lesions_not_images():
    y, p, lesions = _fake_predictions(n=200)
    w = metrics.lesion_weights(lesions, n_boot=50, seed=0)
    # Both images of a lesion always carry the same weight, and each resample has as many lesions as the data.
    np.testing.assert_array_equal(w[:, 0::2], w[:, 1::2])
    assert np.all(w.sum(1) == len(y))

    m = metrics.evaluate(y, p, lesions, CLASSES, n_boot=400, seed=0)
    lo, hi = m["accuracy"]["ci95"]
    assert lo <= m["accuracy"]["value"] <= hi
    assert m["n_lesions"] == 100

    # Duplicating every image (same lesion id) adds no information: the interval width must not shrink,
    # whereas treating the copies as separate lesions would narrow it by about 1/sqrt(2).
    dup = metrics.evaluate(np.repeat(y, 2), np.repeat(p, 2, axis=0), np.repeat(lesions, 2), CLASSES, n_boot=400)
    as_images = metrics.evaluate(np.repeat(y, 2), np.repeat(p, 2, axis=0), np.arange(2 * len(y)), CLASSES, n_boot=400)

    def width(x):
        return x["accuracy"]["ci95"][1] - x["accuracy"]["ci95"][0]

    assert width(dup) == pytest.approx(width(m), rel=1e-9)
    assert width(as_images) < 0.85 * width(m)


def test_absent_class_gives_null_auc_not_crash():
    y, p, lesions = _fake_predictions()
    keep = y != 3
    m = metrics.evaluate(y[keep], p[keep], lesions[keep], CLASSES, n_boot=20)
    assert m["per_class"]["df"]["auc"]["value"] is None
    assert m["per_class"]["df"]["support"] == 0
    assert m["macro_auc"]["value"] == pytest.approx(
        np.mean([skm.roc_auc_score(y[keep] == c, p[keep][:, c]) for c in range(K) if c != 3])
    )
