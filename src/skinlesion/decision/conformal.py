"""Conformal label sets: split-conformal APS and RAPS (Angelopoulos, Bates, Malik, Jordan, "Uncertainty sets for
image classifiers using conformal prediction", ICLR 2021).

Sort an image's probabilities in decreasing order, p_(1) >= p_(2) >= ... (ties: lower class index first). The
score of class y at rank o(y) is its penalised cumulative mass

    E(x, y) = sum_{j <= o(y)} p_(j) + lam * max(0, o(y) - k_reg)      (APS: lam = 0)

Fitting takes the true classes' scores on n held-out calibration units and sets tau to the ceil((1 - alpha)(n + 1))-th
smallest; the label set of a new image is {y : E(x, y) <= tau}, to which its top class is always added. By
exchangeability the true class is in the set with probability >= 1 - alpha (the top class only adds coverage).

Choices, and why:
- **Not randomised.** The randomised version (a uniform U per image) has exactly 1 - alpha coverage and slightly
  smaller sets, but the same image could get a different set on each request; a clinician must see one set per
  image. The cost is over-coverage where it cannot interpolate: none to speak of when the probabilities spread
  smoothly (tested: mean coverage 0.899 at alpha 0.1 over 40 synthetic draws), a lot when many images are near
  certain and the others flat (APS then covers 0.99 with large sets; RAPS' rank penalty keeps them small).
- **Never empty.** The exact set is empty when p_(1) > tau (a very confident image); it then holds the top class.
- **Units are lesions** when lesion ids are given: images of one lesion are near-duplicates with one diagnosis,
  so they are not exchangeable with a new lesion's image, and counting them as n units would shrink the finite-sample
  correction. One image per lesion is drawn (seeded), and n is the number of lesions; the guarantee is for an image
  of a new lesion. Without lesion ids every image is a unit. With lesion pooling on, a lesion's images carry equal
  probabilities, so nothing is lost by the draw.
- **RAPS' k_reg and lam** are set as in the paper when not given: on a tuning part of the units (``tune_fraction``,
  seeded; tau is then fitted on the rest only, keeping the guarantee), k_reg is the (1 - alpha) "higher" quantile of
  the true class's rank and lam the value of ``LAMBDAS`` with the smallest mean set size there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from skinlesion.decision import lesion_pooling
from skinlesion.errors import SkinLesionError

METHODS = ("aps", "raps")
LAMBDAS = (0.001, 0.01, 0.1, 0.2, 0.5)


def _ranked(probabilities: np.ndarray, lam: float, k_reg: int) -> tuple[np.ndarray, np.ndarray]:
    """(order (N, C): class at each rank, cumulative penalised mass (N, C) by rank)."""
    p = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=1)
    penalty = lam * (np.arange(1, p.shape[1] + 1) > k_reg)
    return order, np.cumsum(ranked + penalty, axis=1)


def scores(probabilities: np.ndarray, labels: np.ndarray, lam: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """E(x, y) of each row's ``labels`` class (the conformity score; APS with lam 0)."""
    order, cum = _ranked(probabilities, lam, k_reg)
    rank = np.argmax(order == np.asarray(labels, dtype=int)[:, None], axis=1)
    return cum[np.arange(len(cum)), rank]


def true_ranks(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of each row's true class among its probabilities (ties: lower class index first)."""
    order = np.argsort(-np.asarray(probabilities, dtype=np.float64), axis=1, kind="stable")
    return np.argmax(order == np.asarray(labels, dtype=int)[:, None], axis=1) + 1


def quantile(values: np.ndarray, alpha: float) -> float:
    """The ceil((1 - alpha)(n + 1))-th smallest of n values (split conformal's finite-sample quantile)."""
    n = len(values)
    k = int(np.ceil((1.0 - alpha) * (n + 1) - 1e-9))
    if k > n:
        raise SkinLesionError(f"{n} calibration units are too few for alpha {alpha:g}: at least "
                              f"{int(np.ceil(1 / alpha - 1 - 1e-9))} are needed")  # fmt: skip
    return float(np.sort(values)[k - 1])


def units(n: int, groups: Sequence[Any] | np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of the calibration units: one image per lesion, drawn with ``rng`` (every image without groups; an
    image without a lesion id is a lesion of its own)."""
    if groups is None:
        return np.arange(n)
    ids = lesion_pooling._ids(groups)  # the chain's reading of lesion ids: a missing one is never shared
    if len(ids) != n:
        raise SkinLesionError(f"{len(ids)} lesion ids for {n} images")
    perm = rng.permutation(n)
    _, first = np.unique(ids[perm], return_index=True)
    return np.sort(perm[first])


def _set_sizes(probabilities: np.ndarray, tau: float, lam: float, k_reg: int) -> np.ndarray:
    _, cum = _ranked(probabilities, lam, k_reg)
    return np.maximum((cum <= tau).sum(1), 1)  # E is increasing in the rank: a set is a top-L prefix


def _tune(p: np.ndarray, y: np.ndarray, alpha: float, lam: float | None, k_reg: int | None,
          lambdas: Sequence[float]) -> tuple[float, int]:  # fmt: skip
    if k_reg is None:
        k_reg = int(np.quantile(true_ranks(p, y), 1.0 - alpha, method="higher"))
    if lam is None:
        sizes = [_set_sizes(p, quantile(scores(p, y, c, k_reg), alpha), c, k_reg).mean() for c in lambdas]
        lam = float(lambdas[int(np.argmin(sizes))])
    return float(lam), int(k_reg)


def fit(
    probabilities: np.ndarray,
    y_true: np.ndarray,
    classes: Sequence[str],
    alpha: float = 0.1,
    method: str = "aps",
    groups: Sequence[Any] | np.ndarray | None = None,
    lam: float | None = None,
    k_reg: int | None = None,
    seed: int = 0,
    tune_fraction: float = 0.2,
    lambdas: Sequence[float] = LAMBDAS,
    **about: Any,
) -> dict[str, Any]:
    """The conformal predictor as a JSON-able dict (``method``, ``alpha``, ``tau``, ``lam``, ``k_reg``, ``classes``,
    ``unit``, ``n_calibration``, ``n_tune``, ``seed``, ``randomized`` False) from calibration probabilities (N, C)
    and true class indices; ``groups``: lesion ids (one unit per lesion). ``about``: extra keys to record."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y_true, dtype=int)
    if method not in METHODS:
        raise SkinLesionError(f"conformal method {method!r}: use one of {', '.join(METHODS)}")
    if not 0.0 < alpha < 1.0:
        raise SkinLesionError(f"alpha must be in (0, 1), got {alpha}")
    if p.ndim != 2 or p.shape[1] != len(classes) or len(y) != len(p):
        raise SkinLesionError(f"need probabilities (N, {len(classes)}) and N true classes")
    rng = np.random.default_rng(seed)
    picked = units(len(p), groups, rng)
    n_tune = 0
    if method == "aps":
        lam, k_reg = 0.0, 0
    elif lam is None or k_reg is None:
        picked = rng.permutation(picked)
        n_tune = int(round(tune_fraction * len(picked)))
        tune, picked = picked[:n_tune], np.sort(picked[n_tune:])
        if n_tune < 10:
            raise SkinLesionError(f"{n_tune} tuning units are too few to set RAPS' k_reg and lam; give them")
        lam, k_reg = _tune(p[tune], y[tune], alpha, lam, k_reg, lambdas)
    tau = quantile(scores(p[picked], y[picked], lam, k_reg), alpha)
    return {
        "method": method, "alpha": float(alpha), "tau": tau, "lam": float(lam), "k_reg": int(k_reg),
        "classes": list(classes), "unit": "image" if groups is None else "lesion",
        "n_calibration": int(len(picked)), "n_tune": n_tune, "seed": int(seed), "randomized": False,
        **about,
    }  # fmt: skip


def prediction_sets(probabilities: np.ndarray, conformal: dict[str, Any]) -> np.ndarray:
    """(N, C) bool: class c is in image i's label set."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(conformal["classes"]):
        raise SkinLesionError(f"the conformal sets were fitted on {len(conformal['classes'])} classes; "
                              f"got probabilities of shape {p.shape}")  # fmt: skip
    order, _ = _ranked(p, conformal["lam"], conformal["k_reg"])
    size = _set_sizes(p, conformal["tau"], conformal["lam"], conformal["k_reg"])
    inside = np.arange(p.shape[1])[None, :] < size[:, None]  # by rank
    sets = np.zeros_like(inside)
    np.put_along_axis(sets, order, inside, axis=1)
    return sets


def coverage_report(y_true: np.ndarray, sets: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Coverage (true class in the set), mean set size, how many sets of each size, and per class (by true class)
    the number of images, coverage and mean set size; JSON-able."""
    y = np.asarray(y_true, dtype=int)
    sets = np.asarray(sets, dtype=bool)
    covered = sets[np.arange(len(y)), y]
    size = sets.sum(1)
    per_class = {}
    for i, c in enumerate(classes):
        rows = y == i
        per_class[c] = {
            "n": int(rows.sum()),
            "coverage": float(covered[rows].mean()) if rows.any() else None,
            "mean_size": float(size[rows].mean()) if rows.any() else None,
        }
    return {
        "n": int(len(y)),
        "coverage": float(covered.mean()) if len(y) else None,
        "mean_size": float(size.mean()) if len(y) else None,
        "size_counts": {str(k): int((size == k).sum()) for k in range(sets.shape[1] + 1) if (size == k).any()},
        "per_class": per_class,
    }


def describe(conformal: dict[str, Any]) -> str:
    extra = f", lam {conformal['lam']:g}, k_reg {conformal['k_reg']}" if conformal["method"] == "raps" else ""
    level = f"{1 - conformal['alpha']:.0%}"
    return (f"{conformal['method'].upper()} label sets at {level} coverage (tau {conformal['tau']:.3f}{extra}; "
            f"{conformal['n_calibration']} calibration {conformal['unit']}s)")  # fmt: skip
