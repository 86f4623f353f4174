"""Conformal label sets: coverage on held-out draws from a known distribution, lesions as calibration units,
RAPS smaller than APS where its rank penalty bites, and a JSON-able, seeded fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skinlesion.decision import conformal as cf
from skinlesion.errors import SkinLesionError

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def draw(rng: np.random.Generator, n: int, k: int = 7, temperature: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Each image's true class distribution from a Dirichlet, its label drawn from it; the model sees a
    tempered version (a miscalibrated but informative model)."""
    truth = rng.dirichlet(np.full(k, 0.3), n)
    y = (truth.cumsum(1) > rng.random((n, 1))).argmax(1)
    z = np.log(truth + 1e-12) / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


@pytest.mark.parametrize("method", cf.METHODS)
@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_coverage_is_the_asked_level_on_held_out_images(method, alpha):
    coverage, sizes = [], []
    for trial in range(30):
        rng = np.random.default_rng(trial)
        p, y = draw(rng, 2500)
        fitted = cf.fit(p[:500], y[:500], CLASSES, alpha=alpha, method=method, seed=trial)
        report = cf.coverage_report(y[500:], cf.prediction_sets(p[500:], fitted), CLASSES)
        coverage.append(report["coverage"])
        sizes.append(report["mean_size"])
    # Split conformal: E[coverage] in [1 - alpha, 1 - alpha + 1/(n + 1)]; 30 trials leave a sampling error ~0.003.
    assert 1 - alpha - 0.01 <= np.mean(coverage) <= 1 - alpha + 0.02
    assert min(coverage) > 1 - alpha - 0.06
    assert 1.0 < np.mean(sizes) < len(CLASSES) - 1  # informative sets, not every class


def test_lesions_are_the_calibration_units():
    rng = np.random.default_rng(7)
    per_lesion = rng.integers(1, 5, 600)
    lesion = np.repeat(np.arange(600), per_lesion)
    p_lesion, y_lesion = draw(rng, 600)
    p = p_lesion[lesion] * rng.uniform(0.9, 1.1, (len(lesion), 7))  # a lesion's images look alike
    p /= p.sum(1, keepdims=True)
    fitted = cf.fit(p[:800], y_lesion[lesion][:800], CLASSES, groups=lesion[:800].astype(str), seed=3)
    assert fitted["unit"] == "lesion" and fitted["n_calibration"] == len(np.unique(lesion[:800]))
    by_image = cf.fit(p[:800], y_lesion[lesion][:800], CLASSES, seed=3)
    assert by_image["unit"] == "image" and by_image["n_calibration"] == 800
    # Held-out lesions: one image each, as the guarantee is stated.
    rest = np.flatnonzero(lesion >= lesion[799] + 1)
    _, first = np.unique(lesion[rest], return_index=True)
    test = rest[first]
    report = cf.coverage_report(y_lesion[lesion][test], cf.prediction_sets(p[test], fitted), CLASSES)
    assert report["coverage"] >= 0.9 - 0.05


def test_raps_sets_are_smaller_than_aps_where_the_penalty_bites():
    """Half the images near certain, half with flat probabilities over 30 classes: APS's tau is ~1, so a flat
    image's set takes most classes; RAPS' rank penalty stops it after a few, at the same coverage level."""
    k = 30
    classes = [f"c{i}" for i in range(k)]
    rng = np.random.default_rng(0)
    n = 6000
    y = rng.integers(0, k, n)
    z = rng.normal(0, 1, (n, k))
    z[np.arange(n), y] += 3
    z /= np.where(rng.random(n) < 0.5, 0.3, 8.0)[:, None]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    aps = cf.fit(p[:2000], y[:2000], classes, alpha=0.1)
    raps = cf.fit(p[:2000], y[:2000], classes, alpha=0.1, method="raps")
    assert raps["n_tune"] == 400 and raps["n_calibration"] == 1600 and raps["lam"] > 0 and raps["k_reg"] >= 1
    a, r = (cf.coverage_report(y[2000:], cf.prediction_sets(p[2000:], m), classes) for m in (aps, raps))
    assert r["mean_size"] < 0.5 * a["mean_size"]
    assert a["coverage"] >= 0.89 and r["coverage"] >= 0.89
    given = cf.fit(p[:2000], y[:2000], classes, alpha=0.1, method="raps", lam=0.2, k_reg=1)
    assert given["n_tune"] == 0 and given["n_calibration"] == 2000
    assert cf.coverage_report(y[2000:], cf.prediction_sets(p[2000:], given), classes)["mean_size"] < a["mean_size"]


def test_sets_by_hand_and_the_report():
    p = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.98, 0.01, 0.01], [0.1, 0.2, 0.7]])
    fitted = {"method": "aps", "alpha": 0.1, "tau": 0.9, "lam": 0.0, "k_reg": 0, "classes": ["a", "b", "c"]}
    sets = cf.prediction_sets(p, fitted)
    # cumulative mass by rank: 0.6, 0.9 | 0.4, 0.75, 1.0 | 0.98 (> tau: the top class alone) | 0.7, 0.9
    assert sets.tolist() == [[True, True, False], [True, True, False], [True, False, False], [False, True, True]]
    assert cf.scores(p, np.array([1, 2, 0, 0])) == pytest.approx([0.9, 1.0, 0.98, 1.0])
    raps = {**fitted, "method": "raps", "lam": 0.5, "k_reg": 1}
    assert cf.prediction_sets(p, raps).sum(1).tolist() == [1, 1, 1, 1]  # 0.6 + 0.3 + 0.5 > 0.9
    report = cf.coverage_report(np.array([1, 2, 0, 0]), sets, ["a", "b", "c"])
    assert report["coverage"] == 0.5 and report["mean_size"] == 1.75
    assert report["size_counts"] == {"1": 1, "2": 3}
    assert report["per_class"]["a"] == {"n": 2, "coverage": 0.5, "mean_size": 1.5}
    assert report["per_class"]["c"] == {"n": 1, "coverage": 0.0, "mean_size": 2.0}


def test_fit_is_json_and_seeded():
    p, y = draw(np.random.default_rng(1), 400)
    lesions = np.arange(400) // 2
    a = cf.fit(p, y, CLASSES, alpha=0.1, method="raps", groups=lesions, seed=4, fitted_on="val")
    assert json.loads(json.dumps(a)) == a and a["fitted_on"] == "val" and a["randomized"] is False
    assert a == cf.fit(p, y, CLASSES, alpha=0.1, method="raps", groups=lesions, seed=4, fitted_on="val")
    assert a["tau"] != cf.fit(p, y, CLASSES, alpha=0.1, method="raps", groups=lesions, seed=5)["tau"]
    assert "RAPS label sets at 90% coverage" in cf.describe(a)


def test_quantile_and_errors():
    values = np.arange(1, 20, dtype=float)  # n = 19: ceil(0.9 * 20) = 18th smallest
    assert cf.quantile(values, 0.1) == 18.0
    with pytest.raises(SkinLesionError, match="too few for alpha 0.05: at least 19"):
        cf.quantile(values[:10], 0.05)
    p, y = draw(np.random.default_rng(0), 50)
    with pytest.raises(SkinLesionError, match="conformal method"):
        cf.fit(p, y, CLASSES, method="lac")
    with pytest.raises(SkinLesionError, match="fitted on 7 classes"):
        cf.prediction_sets(p[:, :3], cf.fit(p, y, CLASSES))


def test_images_without_a_lesion_id_are_units_of_their_own():
    p, y = draw(np.random.default_rng(2), 60)
    groups = np.array([f"L{i // 3}" for i in range(30)] + [None] * 20 + [float("nan")] * 5 + [""] * 5, dtype=object)
    fitted = cf.fit(p, y, CLASSES, groups=groups, seed=0)
    assert fitted["n_calibration"] == 10 + 30
