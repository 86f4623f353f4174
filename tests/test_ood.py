"""Out-of-distribution refusal: synthetic in- and out-of-distribution features and logits (AUROC high for shifted
data, the in-distribution refusal rate near its target), JSON-able detectors, and the offline non-dermoscopy
image collection."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from skinlesion.decision import ood
from skinlesion.errors import SkinLesionError

CLASSES = ["akiec", "bcc", "bkl", "df", "mel"]
D = 48


def in_distribution(rng: np.random.Generator, n: int, centres: np.ndarray, mix: np.ndarray):
    y = rng.integers(0, len(centres), n)
    return centres[y] + rng.normal(0, 1, (n, D)) @ mix, y


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2.0, (len(CLASSES), D))
    mix = np.eye(D) + 0.3 * rng.normal(0, 1, (D, D)) / np.sqrt(D)  # correlated, shared covariance
    train, y_train = in_distribution(rng, 1500, centres, mix)
    val, y_val = in_distribution(rng, 1000, centres, mix)
    test, _ = in_distribution(rng, 2000, centres, mix)
    shifted = in_distribution(rng, 1000, centres, mix)[0] + rng.normal(0, 1.0, D)  # a new acquisition: shifted
    head = np.linalg.lstsq(train, np.eye(len(CLASSES))[y_train] * 8.0, rcond=None)[0]  # a linear classifier
    return {"train": train, "y_train": y_train, "val": val, "y_val": y_val, "test": test, "shifted": shifted,
            "head": head}  # fmt: skip


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], np.r_[in_scores, out_scores])


def test_mahalanobis_separates_shifted_features_and_refuses_the_target_share(features):
    det = ood.fit_mahalanobis(features["train"], features["y_train"], CLASSES, val_features=features["val"],
                              refusal_rate=0.05, fitted_on="train+val")  # fmt: skip
    assert det["threshold_on"] == "held_out" and det["fitted_on"] == "train+val"
    in_scores, out_scores = ood.score(det, features=features["test"]), ood.score(det, features=features["shifted"])
    assert auroc(in_scores, out_scores) > 0.95
    assert abs(ood.is_out_of_distribution(det, features=features["test"]).mean() - 0.05) < 0.02
    assert ood.is_out_of_distribution(det, features=features["shifted"]).mean() > 0.8
    # The stored arrays give the textbook distance: min over classes of (f - mu)^T Sigma^-1 (f - mu).
    means, precision = ood.decode_array(det["means"]), ood.decode_array(det["precision"])
    f = features["test"][:5]
    direct = np.min([np.einsum("nd,de,ne->n", f - m, precision, f - m) for m in means], axis=0)
    assert ood.mahalanobis_score(f, det) == pytest.approx(direct, rel=1e-6)


def test_detectors_are_json_and_compact(features):
    det = ood.fit_mahalanobis(features["train"], features["y_train"], CLASSES, refusal_rate=0.05)
    back = json.loads(json.dumps(det))
    assert back == det and det["threshold_on"] == "fit"
    assert ood.score(back, features=features["test"]) == pytest.approx(ood.score(det, features=features["test"]))
    # float32 in base64: 4 bytes per value, * 4/3; a list of floats would take ~20 characters each.
    values = D * D + len(CLASSES) * D
    assert values * 4 * 4 / 3 < ood.json_size(det) < values * 4 * 4 / 3 + 2000
    assert ood.json_size(det) < len(json.dumps(ood.decode_array(det["precision"]).tolist())) / 3
    with pytest.raises(SkinLesionError, match="damaged"):
        ood.decode_array({**det["means"], "base64": "not base64!"})
    with pytest.raises(SkinLesionError, match="48-d features"):
        ood.score(det, features=features["test"][:, :10])


@pytest.mark.parametrize("kind", ood.LOGIT_KINDS)
def test_logit_scores_flag_far_away_inputs(features, kind):
    logits = {name: features[name] @ features["head"] for name in ("val", "test")}
    far = features["test"] * 0.15  # an input the network barely responds to: small, flat logits
    det = ood.fit_logits(logits["val"], kind, refusal_rate=0.05, temperature=1.5 if kind == "energy" else 1.0)
    assert auroc(ood.score(det, logits=logits["test"]), ood.score(det, logits=far @ features["head"])) > 0.9
    assert abs(ood.is_out_of_distribution(det, logits=logits["test"]).mean() - 0.05) < 0.02
    assert json.loads(json.dumps(det)) == det


def test_logit_score_definitions():
    z = np.array([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0], [300.0, 0.0, 0.0]])
    assert ood.logit_score(z, "energy", 2.0) == pytest.approx(-2.0 * logsumexp(z / 2.0, axis=1))
    assert ood.logit_score(z, "max_logit") == pytest.approx([-2.0, 0.0, -300.0])
    softmax = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    assert ood.logit_score(z, "max_softmax") == pytest.approx(-softmax.max(1))
    with pytest.raises(SkinLesionError, match="use one of"):
        ood.logit_score(z, "odin")
    with pytest.raises(SkinLesionError, match="needs the images' pooled features"):
        ood.score({"kind": "mahalanobis"}, logits=z)
    with pytest.raises(SkinLesionError, match="refusal rate"):
        ood.fit_logits(z, refusal_rate=0.0)


def test_offline_images_are_many_distinct_non_dermoscopy_pictures():
    from skinlesion.data import ood_images

    images = ood_images.offline_ood_images(seed=0)
    names = [n for n, _ in images]
    assert len(images) >= 16 and len(set(names)) == len(names)
    assert {"sklearn:china.jpg", "sklearn:flower.jpg", "generated:text_0", "generated:noise_uniform"} <= set(names)
    assert any(n.endswith("sample_data/grace_hopper.jpg") for n in names)  # matplotlib's photo
    assert not any("skinlesion" in n for n in names)
    digests = {hashlib.sha256(im.tobytes()).hexdigest() for _, im in images}
    assert len(digests) == len(images)
    assert all(im.mode == "RGB" and min(im.size) >= 64 for _, im in images)
    again = ood_images.generated_images(seed=0)
    assert [np.asarray(a).tobytes() == np.asarray(b).tobytes() for (_, a), (_, b) in zip(
        again, ood_images.generated_images(seed=0), strict=True)] == [True] * len(again)  # fmt: skip


def test_package_pictures_skip_dermoscopy_small_and_broken_files(tmp_path):
    from PIL import Image

    from skinlesion.data import ood_images

    (tmp_path / "skinlesion" / "data").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    Image.new("RGB", (100, 80), (200, 120, 100)).save(tmp_path / "skinlesion" / "data" / "lesion.jpg")
    Image.new("RGB", (100, 80), (10, 200, 10)).save(tmp_path / "other" / "photo.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "other" / "icon.png")
    (tmp_path / "other" / "broken.jpg").write_bytes(b"not a jpeg")
    found = ood_images.package_pictures([tmp_path])
    assert [n for n, _ in found] == ["other/photo.png"]
