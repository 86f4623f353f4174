"""Post-hoc logit adjustment (prior correction) for balanced accuracy, baked into best.pt.

A network trained with plain cross-entropy on a 67 %-nevus set estimates p(y|x) under the *training*
prior. Subtracting tau * log(prior) from its logits (Menon et al. 2021, "Long-tail learning via logit
adjustment") turns that into a classifier for a uniform prior, the one balanced accuracy scores.
tau = 1 is the Bayes-consistent value and is used fixed, not tuned on val (tuning on the scored split
would overfit it). Do not combine with a balanced sampler: that model already targets a uniform prior.

The offset is a constant per class, so it is added to the classifier's bias: every consumer of best.pt
(evaluate, calibrate, predict, serve, Grad-CAM, TTA, the ONNX export) then applies it with no change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skinlesion import fileio
from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint, factory


def offset(class_counts: Sequence[float], tau: float = 1.0) -> np.ndarray:
    """-tau * log(prior) per class; a class absent from train counts as one image (finite offset)."""
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    return -tau * np.log(counts / counts.sum())


def adjust(logits: np.ndarray, class_counts: Sequence[float], tau: float = 1.0) -> np.ndarray:
    """Logits with the prior correction added (what a checkpoint adjusted with the same tau outputs)."""
    return np.asarray(logits, dtype=np.float64) + offset(class_counts, tau)


def train_counts(ckpt: Mapping[str, Any]) -> list[float]:
    """Train images per class, in the checkpoint's class order, from the training config it carries."""
    counts = (ckpt.get("config") or {}).get("train_class_counts")
    if not counts:
        raise SkinLesionError("checkpoint has no train_class_counts in its config; retrain with this skinlesion")
    return [float(counts.get(c, 0)) for c in ckpt["classes"]]


def classifier_bias_key(ckpt: Mapping[str, Any]) -> str:
    """State-dict key of the classifier's bias (found through timm's get_classifier, not by name)."""
    model = factory.architecture(ckpt)
    head = model.get_classifier()
    names = {id(p): n for n, p in model.named_parameters()}
    bias = getattr(head, "bias", None)
    if bias is None or id(bias) not in names:
        raise SkinLesionError(f"{ckpt['backbone']}'s classifier has no bias to carry the logit adjustment")
    return names[id(bias)]


def set_logit_adjustment(path: str | Path, tau: float = 1.0) -> np.ndarray:
    """Store -tau*log(train prior) in best.pt's classifier bias (atomic rewrite); tau = 0 removes it.

    Idempotent: a previous adjustment is taken out first. Returns the offset now applied."""
    path = Path(path)
    file = path / "best.pt" if path.is_dir() else path
    ckpt = checkpoint.read(file)
    key = classifier_bias_key(ckpt)
    new = offset(train_counts(ckpt), tau) if tau else np.zeros(len(ckpt["classes"]))
    old = np.asarray((ckpt.get("logit_adjustment") or {}).get("offset", np.zeros_like(new)), dtype=np.float64)
    bias = ckpt["model"][key]
    ckpt["model"][key] = (bias.double() + torch.from_numpy(new - old)).to(bias.dtype)
    ckpt["logit_adjustment"] = {
        "tau": float(tau),
        "offset": new.tolist(),
        "parameter": key,
        "note": "added to the classifier bias; best.pt 'metrics' were measured before the adjustment",
    }
    fileio.torch_save(file, ckpt)
    return new
