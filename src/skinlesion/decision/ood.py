"""Out-of-distribution refusal: is this image something the classifier was trained for (a dermoscopic lesion)?

Scores, higher = more out of distribution:
- from the logits (N, C) of the network (before the temperature and the metadata prior):
  ``energy`` = -T logsumexp(z / T) (Liu et al. 2020), ``max_logit`` = -max z (Hendrycks et al. 2022),
  ``max_softmax`` = -max softmax(z) (Hendrycks & Gimpel 2017);
- from pooled features (N, D) (the penultimate layer): ``mahalanobis`` = min over classes of
  (f - mu_c)^T P (f - mu_c) (Lee et al. 2018), with class means and one shared covariance, shrunk by Ledoit-Wolf
  (D can exceed the images per class), P its inverse.

A detector is a JSON-able dict: its kind, parameters and a ``threshold`` set on in-distribution held-out images
(val) as their ``1 - refusal_rate`` quantile, so about ``refusal_rate`` of in-distribution images are refused;
``is_out_of_distribution(detector, logits=..., features=...)`` applies it. The Mahalanobis means and precision are
stored compactly (``encode_array``: float32 bytes, base64): D = 1280 (EfficientNet-Lite0) takes 8.8 MB as JSON,
against 39 MB as lists of floats (measured); ``json_size`` reports it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from skinlesion.errors import SkinLesionError

LOGIT_KINDS = ("energy", "max_logit", "max_softmax")
KINDS = (*LOGIT_KINDS, "mahalanobis")


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """A float array as JSON: ``{"dtype": "float32", "shape": [...], "base64": ...}`` (little-endian)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(entry: dict[str, Any]) -> np.ndarray:
    """``encode_array``'s array back, as float64; a clear error for a damaged entry."""
    try:
        raw = base64.b64decode(entry["base64"], validate=True)
        return np.frombuffer(raw, dtype="<f4").reshape(entry["shape"]).astype(np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise SkinLesionError(f"a stored out-of-distribution array is damaged ({e})") from e


def json_size(detector: dict[str, Any]) -> int:
    """Bytes of the detector as JSON (what it adds to best.pt or model.onnx's metadata)."""
    return len(json.dumps(detector).encode("utf-8"))


def logit_score(logits: np.ndarray, kind: str = "energy", temperature: float = 1.0) -> np.ndarray:
    """One of LOGIT_KINDS per row of logits (N, C); higher = more out of distribution."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise SkinLesionError(f"out-of-distribution scores need logits (N, C), got shape {z.shape}")
    top = z.max(1)
    if kind == "energy":
        t = float(temperature)
        return -t * (top / t + np.log(np.exp(z / t - (top / t)[:, None]).sum(1)))
    if kind == "max_logit":
        return -top
    if kind == "max_softmax":
        return -1.0 / np.exp(z - top[:, None]).sum(1)
    raise SkinLesionError(f"out-of-distribution score {kind!r}: use one of {', '.join(KINDS)}")


def _threshold(in_scores: np.ndarray, refusal_rate: float) -> float:
    if not 0.0 < refusal_rate < 1.0:
        raise SkinLesionError(f"the refusal rate must be in (0, 1), got {refusal_rate}")
    if len(in_scores) == 0:
        raise SkinLesionError("no in-distribution images to set the out-of-distribution threshold on")
    return float(np.quantile(in_scores, 1.0 - refusal_rate))


def fit_logits(
    val_logits: np.ndarray, kind: str = "energy", refusal_rate: float = 0.05, temperature: float = 1.0, **about: Any
) -> dict[str, Any]:
    """A logit-score detector with its threshold on in-distribution val logits (N, C)."""
    if kind not in LOGIT_KINDS:
        raise SkinLesionError(f"logit out-of-distribution score {kind!r}: use one of {', '.join(LOGIT_KINDS)}")
    scores = logit_score(val_logits, kind, temperature)
    return {"kind": kind, "temperature": float(temperature), "refusal_rate": float(refusal_rate),
            "threshold": _threshold(scores, refusal_rate), "n_fit": int(len(scores)), **about}  # fmt: skip


def fit_mahalanobis(
    features: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    val_features: np.ndarray | None = None,
    refusal_rate: float = 0.05,
    **about: Any,
) -> dict[str, Any]:
    """Class means and a Ledoit-Wolf shared precision from in-distribution (train) features (N, D) with their
    class indices; the threshold from ``val_features`` (held out: the fit images score closer than new ones),
    else from the fit features themselves."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise SkinLesionError(f"need features (N, D) and N class indices, N >= 2; got {f.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= len(classes):
        raise SkinLesionError(f"class indices must lie in 0..{len(classes) - 1} for {len(classes)} classes")
    present = np.unique(y)
    means = np.stack([f[y == c].mean(0) for c in present])
    centred = f - means[np.searchsorted(present, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    detector: dict[str, Any] = {
        "kind": "mahalanobis", "classes": list(classes), "fitted_classes": [classes[c] for c in present],
        "dim": int(f.shape[1]), "means": encode_array(means), "precision": encode_array(precision),
        "refusal_rate": float(refusal_rate), "n_fit": int(len(f)),
    }  # fmt: skip
    held_out = f if val_features is None else np.asarray(val_features, dtype=np.float64)
    detector["threshold_on"] = "fit" if val_features is None else "held_out"
    detector["threshold"] = _threshold(mahalanobis_score(held_out, detector), refusal_rate)
    return {**detector, **about}


def mahalanobis_score(features: np.ndarray, detector: dict[str, Any]) -> np.ndarray:
    """min_c (f - mu_c)^T P (f - mu_c) per row of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != detector["dim"]:
        raise SkinLesionError(f"the detector was fitted on {detector['dim']}-d features; got shape {f.shape}")
    means, precision = decode_array(detector["means"]), decode_array(detector["precision"])
    fp = f @ precision
    quad = (fp * f).sum(1)[:, None] - 2 * fp @ means.T + ((means @ precision) * means).sum(1)[None, :]
    return quad.min(1)


def score(detector: dict[str, Any], logits: np.ndarray | None = None, features: np.ndarray | None = None) -> np.ndarray:
    """The detector's score of each image, from the input its kind reads (logits or features)."""
    kind = detector.get("kind")
    if kind == "mahalanobis":
        if features is None:
            raise SkinLesionError("a Mahalanobis detector needs the images' pooled features")
        return mahalanobis_score(features, detector)
    if logits is None:
        raise SkinLesionError(f"the {kind} detector needs the images' logits")
    return logit_score(logits, kind, detector.get("temperature", 1.0))


def is_out_of_distribution(
    detector: dict[str, Any], logits: np.ndarray | None = None, features: np.ndarray | None = None
) -> np.ndarray:
    """(N,) bool: the image's score is above the threshold set on in-distribution images."""
    return score(detector, logits, features) > detector["threshold"]
