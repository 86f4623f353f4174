"""Temperature scaling (one scalar T, LBFGS on the NLL) and its honest before/after scores.

T is always fitted on images it is not scored on:

* ``crossfit`` (default): val lesions are split into folds (stratified by diagnosis, grouped by
  lesion); T fitted on the other folds scores each fold, which gives an honest before/after on all
  of val. The T stored is the one fitted on all of val.
* ``train-slice``: T is fitted on a lesion-grouped slice of *train* and scored on val. Those images
  were trained on, so the network is more confident on them than on new data and T comes out too
  small; it is offered for comparison and for runs whose val set is tiny.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from skinlesion import metrics
from skinlesion.data.split import lesion_folds
from skinlesion.decision.chain import DecisionChain
from skinlesion.errors import SkinLesionError


def fit_temperature(logits: np.ndarray, y: np.ndarray, max_iter: int = 100) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T)."""
    # Fresh float64 tensors: logits from Predictor are inference tensors, which autograd refuses.
    z = torch.from_numpy(np.array(logits, dtype=np.float64))
    target = torch.tensor(np.asarray(y), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.inference_mode(False), torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


def crossfit(
    chain: DecisionChain,
    logits: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_folds: int = 2,
    seed: int = 0,
    offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold calibrated probabilities (``chain`` with the T fitted on the other folds) and the T of each
    fold. T is fitted on the image logits alone; ``chain`` adds the offsets (a metadata prior's) after it."""
    fold = lesion_folds(y, groups, n_folds, seed)
    probs = np.empty(logits.shape, dtype=np.float64)
    temps = []
    for f in range(n_folds):
        held = fold == f
        t = fit_temperature(logits[~held], y[~held])
        probs[held] = chain.replace(temperature=t).probabilities(logits[held], _rows(offsets, held))
        temps.append(t)
    return probs, temps


def _rows(offsets: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if offsets is None else offsets[rows]


def scores(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    m = metrics.point_metrics(y, probs)["overall"]
    return {k: m[k] for k in ("ece", "log_loss", "brier", "accuracy")}


def _bins(y: np.ndarray, probs: np.ndarray) -> dict[str, list]:
    return {
        k: [None if not np.isfinite(v) else float(v) for v in a] for k, a in metrics.reliability_bins(y, probs).items()
    }


def calibrate(
    classes: Sequence[str],
    logits_fit: np.ndarray,
    y_fit: np.ndarray,
    *,
    lesions: np.ndarray,
    method: str = "crossfit",
    folds: int = 2,
    seed: int = 0,
    offsets: np.ndarray | None = None,
    logits_eval: np.ndarray | None = None,
    y_eval: np.ndarray | None = None,
) -> dict[str, Any]:
    """calibration.json content. crossfit: fit set == scored set (out of fold, ``folds`` lesion folds of
    ``lesions``); train-slice: fit, then score ``logits_eval`` / ``y_eval``.

    T is fitted on the image logits alone; ``offsets`` (the metadata prior's, for the scored images) are added
    after it when scoring, by the decision chain, as evaluate / predict / serve do. "before" is T = 1."""
    uncalibrated = DecisionChain(tuple(classes))  # T = 1, the scores before calibration
    if method == "crossfit":
        after, fold_t = crossfit(uncalibrated, logits_fit, y_fit, lesions, folds, seed, offsets=offsets)
        y_scored, before = y_fit, uncalibrated.probabilities(logits_fit, offsets)
        temperature = fit_temperature(logits_fit, y_fit)
        extra: dict[str, Any] = {"folds": folds, "fold_temperatures": fold_t}
    elif method == "train-slice":
        temperature = fit_temperature(logits_fit, y_fit)
        y_scored, before = y_eval, uncalibrated.probabilities(logits_eval, offsets)
        after = uncalibrated.replace(temperature=temperature).probabilities(logits_eval, offsets)
        extra = {}
    else:
        raise SkinLesionError(f"unknown calibration method {method!r}; use crossfit or train-slice")
    return {
        "method": method,
        "temperature": temperature,
        **extra,
        "n_fit": int(len(y_fit)),
        "n_scored": int(len(y_scored)),
        "before": scores(y_scored, before),
        "after": scores(y_scored, after),
        "reliability": {"before": _bins(y_scored, before), "after": _bins(y_scored, after)},
    }
