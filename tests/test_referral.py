"""Referral: the risk-coverage table against a brute-force count, the fitted rule's thresholds (largest coverage
meeting the target, smallest melanoma band meeting the sensitivity), apply's reasons, and the figure."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from skinlesion.decision import referral
from skinlesion.errors import SkinLesionError
from skinlesion.reporting import clinical_plots

CLASSES = ["nv", "mel", "bkl", "bcc"]


def draw(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(4, n, p=[0.6, 0.15, 0.15, 0.1])
    z = rng.normal(0, 1, (n, 4))
    z[np.arange(n), y] += rng.uniform(0, 3.5, n)
    p = np.exp(z)
    p = np.round(p / p.sum(1, keepdims=True), 3)  # ties in the confidence
    p /= p.sum(1, keepdims=True)
    decided = (np.log(np.clip(p, 1e-9, None)) + np.array([0, 0.7, 0, 0])).argmax(1)  # an operating point on mel
    return y, p, decided


def test_risk_coverage_matches_a_brute_force_count():
    y, p, d = draw(0, 600)
    table = referral.risk_coverage(y, p, d, CLASSES, positive_class="mel")
    conf = p.max(1)
    assert len(table) == len(np.unique(conf)) and table["coverage"].is_monotonic_increasing
    assert table["coverage"].iloc[-1] == 1.0
    for _, row in table.iloc[::37].iterrows():
        kept = conf >= row["threshold"]
        assert row["n_kept"] == kept.sum()
        assert row["accuracy"] == pytest.approx((y[kept] == d[kept]).mean())
        with warnings.catch_warnings():  # sklearn warns when the kept decisions name a class absent from the truth
            warnings.simplefilter("ignore", UserWarning)
            assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[kept], d[kept]))
        mel = kept & (y == 1)
        if mel.any():
            assert row["mel_sensitivity"] == pytest.approx((d[mel] == 1).mean())
        caught = ((y == 1) & ~kept).sum() + ((d == 1) & mel).sum()
        assert row["mel_sensitivity_with_referral"] == pytest.approx(caught / (y == 1).sum())


def test_target_accuracy_keeps_the_most_images_that_reach_it():
    y, p, d = draw(1, 3000)
    rule = referral.fit(y, p, d, CLASSES, target_accuracy=0.9, fitted_on="val")
    table = referral.risk_coverage(y, p, d, CLASSES)
    assert rule["on_fit"]["accuracy"] >= 0.9
    larger = table[table["coverage"] > rule["on_fit"]["coverage"] + 1e-12]
    assert (larger["accuracy"] < 0.9).all()  # keeping any more images misses the target
    assert json.loads(json.dumps(rule)) == rule and rule["fitted_on"] == "val"
    # On new images from the same distribution the kept accuracy stays near the target.
    y2, p2, d2 = draw(2, 3000)
    held_out = referral.summary(rule, y2, p2, d2)
    assert abs(held_out["accuracy"] - 0.9) < 0.03 and abs(held_out["coverage"] - rule["on_fit"]["coverage"]) < 0.05


def test_target_coverage_and_reasons():
    y, p, d = draw(3, 1000)
    rule = referral.fit(y, p, d, CLASSES, target_coverage=0.7)
    assert 0.7 <= rule["on_fit"]["coverage"] < 0.72
    refer, why = referral.apply(rule, p)
    assert refer.mean() == pytest.approx(1 - rule["on_fit"]["coverage"])
    i = int(np.flatnonzero(refer)[0])
    assert why[i] == f"top probability {p[i].max():.2f} < {rule['min_confidence']:.2f}"
    assert all(w is None for w, r in zip(why, refer, strict=True) if not r)
    assert referral.describe(rule) == f"refer when top probability < {rule['min_confidence']:.2f}"
    assert referral.fit(y, p, d, CLASSES, target_coverage=1.0)["min_confidence"] == 0.0


def test_melanoma_band_is_the_smallest_that_reaches_the_sensitivity():
    y, p, d = draw(4, 2000)
    rule = referral.fit(y, p, d, CLASSES, target_coverage=0.9, positive_class="mel", positive_sensitivity=0.97)
    low, high = rule["positive_band"]
    assert high == 1.0 and rule["on_fit"]["mel_sensitivity_with_referral"] >= 0.97
    nudged = {**rule, "positive_band": [np.nextafter(low, 1.0), high]}
    assert referral.summary(nudged, y, p, d)["mel_sensitivity_with_referral"] < 0.97  # any higher low misses it
    refer, why = referral.apply(rule, p)
    band_only = np.flatnonzero(refer & (p.max(1) >= rule["min_confidence"]))
    assert band_only.size and why[band_only[0]].startswith("p_mel ") and "in [" in why[band_only[0]]
    given = referral.fit(y, p, d, CLASSES, positive_class="mel", positive_band=[0.2, 0.6])
    assert given["min_confidence"] == 0.0 and given["positive_band"] == [0.2, 0.6]
    refer, _ = referral.apply(given, p)
    assert (refer == ((p[:, 1] >= 0.2) & (p[:, 1] <= 0.6))).all()
    assert "p_mel in [0.20, 0.60]" in referral.describe(given)


def test_bad_requests_are_one_line_errors():
    y, p, d = draw(5, 200)
    with pytest.raises(SkinLesionError, match="not both"):
        referral.fit(y, p, d, CLASSES, target_accuracy=0.9, target_coverage=0.8)
    with pytest.raises(SkinLesionError, match="give a referral target"):
        referral.fit(y, p, d, CLASSES)
    wrong_when_sure = np.where(p.max(1) == p.max(), (y + 1) % 4, d)  # the most confident image is wrong
    with pytest.raises(SkinLesionError, match="no confidence threshold reaches accuracy 1 .*at most 0.9"):
        referral.fit(y, p, wrong_when_sure, CLASSES, target_accuracy=1.0)
    with pytest.raises(SkinLesionError, match="needs the positive class"):
        referral.fit(y, p, d, CLASSES, positive_band=[0.1, 0.5])
    with pytest.raises(SkinLesionError, match="'melanoma' is not one of"):
        referral.risk_coverage(y, p, d, CLASSES, positive_class="melanoma")
    with pytest.raises(SkinLesionError, match="fitted on 4 classes"):
        referral.apply(referral.fit(y, p, d, CLASSES, target_coverage=0.5), p[:, :3])


def test_risk_coverage_figure(tmp_path):
    y, p, d = draw(6, 800)
    table = referral.risk_coverage(y, p, d, CLASSES, positive_class="mel")
    rule = referral.fit(y, p, d, CLASSES, target_accuracy=0.9, positive_class="mel")
    out = clinical_plots.risk_coverage_plot(table, tmp_path / "risk_coverage.png", rule=rule)
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert image.format == "PNG" and pixels.shape[1] > 600
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80) & (pixels[..., 1] > 90) & (pixels[..., 1] < 140)
    assert blue.sum() > 200  # the accuracy curve (matplotlib's first colour) was drawn
    with pytest.raises(SkinLesionError, match="metric columns"):
        clinical_plots.risk_coverage_plot(table, tmp_path / "x.png", metrics=["auc"])
