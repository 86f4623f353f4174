"""What a classifier says beside its decision, owned once for every consumer (the decision chain's sibling):

    decision chain -> probabilities, decided class
    safeguards     -> out of distribution?  (ood.py: energy / max-logit from the raw logits, or Mahalanobis on the
                                             pooled features; threshold fitted on in-distribution val)
                   -> prediction set        (conformal.py: APS / RAPS label set at the fitted coverage)
                   -> refer to a dermatologist? (referral.py: low confidence or a melanoma in the uncertain band;
                                             always for an out-of-distribution image, which gets no diagnosis)

``Safeguards.from_meta`` reads best.pt's entries (``referral``, ``conformal``, ``ood``) or model.onnx's metadata;
``Classifier.predict_files``, ``predict``, ``serve`` and the Python API call it, and ``evaluate`` scores it (set
coverage, referral rate, refusals). A step missing from the run is simply not applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from skinlesion.decision import conformal, ood, referral
from skinlesion.decision.chain import Decisions

OOD_REASON = "out of distribution: unlike the dermoscopic images the model was trained on (no diagnosis)"


@dataclass(frozen=True)
class Guarded:
    """Per image: refer (bool), why (None when not referred), the conformal label set (a bool row per image, None
    without a conformal step), out of distribution (bool) and its score (None without a detector)."""

    refer: np.ndarray
    reasons: list[str | None]
    sets: np.ndarray | None
    out_of_distribution: np.ndarray
    ood_scores: np.ndarray | None

    def set_of(self, i: int, classes: tuple[str, ...]) -> list[str] | None:
        return None if self.sets is None else [c for c, inside in zip(classes, self.sets[i], strict=True) if inside]


@dataclass(frozen=True)
class Safeguards:
    classes: tuple[str, ...]
    referral: Mapping[str, Any] | None = None
    conformal: Mapping[str, Any] | None = None
    ood: Mapping[str, Any] | None = None

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Safeguards:
        return cls(tuple(meta["classes"]), meta.get("referral"), meta.get("conformal"), meta.get("ood"))

    def replace(self, **changes: Any) -> Safeguards:
        return dataclasses.replace(self, **changes)

    @property
    def any(self) -> bool:
        return any(x is not None for x in (self.referral, self.conformal, self.ood))

    @property
    def needs_features(self) -> bool:
        """The OOD detector reads pooled features (Mahalanobis), not logits."""
        return self.ood is not None and self.ood.get("kind") == "mahalanobis"

    def __call__(self, decisions: Decisions, logits: np.ndarray | None = None,
                 features: np.ndarray | None = None) -> Guarded:  # fmt: skip
        """``logits``: the network's raw single-view logits (N, C) (before temperature and prior: what the OOD
        threshold was fitted on); ``features``: the pooled features (N, D) for a Mahalanobis detector."""
        p = decisions.probabilities
        n = len(p)
        refer, reasons = referral.apply(dict(self.referral), p) if self.referral else (np.zeros(n, bool), [None] * n)
        sets = conformal.prediction_sets(p, dict(self.conformal)) if self.conformal else None
        scores = ood.score(dict(self.ood), logits, features) if self.ood else None
        outside = scores > self.ood["threshold"] if scores is not None else np.zeros(n, bool)
        reasons = [OOD_REASON if outside[i] else reasons[i] for i in range(n)]
        return Guarded(np.asarray(refer) | outside, reasons, sets, outside, scores)

    def summary(self) -> dict[str, Any]:
        """The settings, for /api/model, metrics.json and the model card."""
        return {
            "referral": None if self.referral is None else referral.describe(dict(self.referral)),
            "conformal": None if self.conformal is None else conformal.describe(dict(self.conformal)),
            "ood": None if self.ood is None else {k: self.ood.get(k) for k in ("kind", "threshold", "refusal_rate",
                                                                                 "fitted_on")},  # fmt: skip
        }
