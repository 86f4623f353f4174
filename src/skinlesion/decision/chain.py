"""The decision chain: the one place where a network's raw logits become probabilities and a decision.

    mean over the TTA views -> / temperature -> + metadata-prior offsets -> softmax -> lesion pooling
    -> + operating-point bias -> argmax

Every consumer (evaluate, predict with either backend, serve, Grad-CAM, report, calibrate, the operating-point
fit, the ablation) builds a ``DecisionChain`` from the settings a checkpoint or model.onnx stores and calls
it; none applies a step itself. A step is switched off by ``dataclasses.replace`` (``chain.replace(...)``),
never by setting attributes from outside. The logit adjustment (a prior correction) is not a step here: it
lives in the classifier's bias, so the network's logits already carry it. Plain numpy, no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.decision import lesion_pooling, metadata_prior, operating_point


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (rows sum to 1 for log-loss)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@dataclass(frozen=True)
class Decisions:
    """What the chain returns for N images: calibrated probabilities (N, C) and the decided class indices (N,)."""

    probabilities: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [self.classes[k] for k in self.labels]


@dataclass(frozen=True)
class DecisionChain:
    classes: tuple[str, ...]
    temperature: float = 1.0
    metadata_prior: Mapping[str, Any] | None = None
    operating_point: Mapping[str, Any] | None = None
    tta_views: int = 4  # how many views --tta averages for this run (4 flips or the 8 dihedral symmetries)
    pool_lesions: bool = False  # score images that share a lesion id together, where the ids are given

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        operating_point.vector(self.operating_point, self.classes)  # a class-order mismatch fails here

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> DecisionChain:
        """From best.pt's entries (settings in its ``config``) or model.onnx's metadata (settings at the top)."""
        config = meta.get("config") or {}
        return cls(
            classes=tuple(meta["classes"]),
            temperature=float(meta.get("temperature", 1.0)),
            metadata_prior=meta.get("metadata_prior"),
            operating_point=meta.get("operating_point"),
            tta_views=int(meta.get("tta_views", config.get("tta_views", 4))),
            pool_lesions=bool(meta.get("pool_lesions", config.get("pool_lesions", False))),
        )

    def replace(self, **changes: Any) -> DecisionChain:
        return dataclasses.replace(self, **changes)

    def switched(
        self,
        tta_views: int | None = None,
        metadata_prior: bool = True,
        operating_point: bool = True,
        pool_lesions: bool | None = None,
    ) -> DecisionChain:
        """The chain with the command line's switches: --tta-views N, --no-metadata-prior, --no-operating-point,
        --pool-lesions / --no-pool-lesions (None: the run's own setting)."""
        changes: dict[str, Any] = {}
        if tta_views:
            changes["tta_views"] = tta_views
        if not metadata_prior:
            changes["metadata_prior"] = None
        if not operating_point:
            changes["operating_point"] = None
        if pool_lesions is not None:
            changes["pool_lesions"] = pool_lesions
        return self.replace(**changes)

    # ---------------------------------------------------------------------------------------------- steps
    def offsets(self, table: pd.DataFrame | None) -> np.ndarray | None:
        """The metadata prior's offsets for rows of age / sex / localization (None: no prior or no table)."""
        if self.metadata_prior is None or table is None:
            return None
        return metadata_prior.offsets(self.metadata_prior, table)

    def images_with_metadata(self, table: pd.DataFrame | None) -> int:
        """Rows whose offset is not 0 (a field known with a value the prior was fitted on)."""
        if self.metadata_prior is None or table is None:
            return 0
        return int(metadata_prior.known(table, self.metadata_prior).sum())

    def logits(self, view_logits: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
        """Fused logits (N, C): the mean over views (axis 0 of a (V, N, C) array), divided by the temperature
        (it calibrates the image model alone), plus the metadata offsets."""
        z = np.asarray(view_logits, dtype=np.float64)
        if z.ndim == 3:
            z = z.mean(0)
        z = z / self.temperature
        return z if offsets is None else z + offsets

    def probabilities(
        self,
        view_logits: np.ndarray,
        offsets: np.ndarray | None = None,
        lesion_ids: Sequence[str | None] | np.ndarray | None = None,
    ) -> np.ndarray:
        """softmax of the fused logits; each image of a lesion gets its lesion's pooled probabilities when the
        chain pools and ``lesion_ids`` are given."""
        p = softmax(self.logits(view_logits, offsets))
        return lesion_pooling.pool(p, lesion_ids) if self.pools(lesion_ids) else p

    def pools(self, lesion_ids: Sequence[str | None] | np.ndarray | None) -> bool:
        return self.pool_lesions and lesion_ids is not None

    def decide(self, probabilities: np.ndarray, tta: bool = False) -> np.ndarray:
        """Class index per row: argmax(log p + the operating point's bias for single views or, ``tta``, for the
        run's TTA views); the plain argmax without an operating point."""
        return operating_point.decide(probabilities, operating_point.vector(self.operating_point, self.classes, tta))

    def decision_probabilities(self, probabilities: np.ndarray, tta: bool = False) -> np.ndarray:
        """Probabilities whose argmax is ``decide``'s class (what an ISIC submission must hold): p itself without
        an operating point, else softmax(log p + bias)."""
        bias = operating_point.vector(self.operating_point, self.classes, tta)
        if bias is None:
            return np.asarray(probabilities, dtype=np.float64)
        return softmax(np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, None)) + bias)

    def __call__(
        self,
        view_logits: np.ndarray,
        offsets: np.ndarray | None = None,
        lesion_ids: Sequence[str | None] | np.ndarray | None = None,
    ) -> Decisions:
        """Probabilities and decisions of N images from their raw logits: (N, C) for one view, (V, N, C) for V."""
        view_logits = np.asarray(view_logits)
        tta = view_logits.ndim == 3 and view_logits.shape[0] > 1
        p = self.probabilities(view_logits, offsets, lesion_ids)
        return Decisions(p, self.decide(p, tta), self.classes)

    # ------------------------------------------------------------------------------------------- describe
    def summary(self) -> dict[str, Any]:
        """The settings, JSON-able (what /api/model and metrics.json say of the chain)."""
        point = self.operating_point
        return {
            "temperature": self.temperature,
            "metadata_prior": self.metadata_prior is not None,
            "operating_point": None if point is None else {k: point.get(k) for k in operating_point.SUMMARY_KEYS},
            "tta_views": self.tta_views,
            "pool_lesions": self.pool_lesions,
        }
