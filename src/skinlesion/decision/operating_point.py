"""Operating point: a minimum sensitivity for chosen classes (melanoma, typically), set on held-out images.

A classifier's argmax is one operating point among many; a clinic screening for melanoma wants a
missed melanoma to be rarer than a false alarm. ``skinlesion operating-point --min-sensitivity mel=0.75``
finds, on the run's val split, the smallest per-class bias b >= 0 for which the decision

    predicted class = argmax_k (log p_k + b_k)

calls at least 75 % of val melanomas melanoma, and stores b in best.pt. The probabilities p (tempered, with
the metadata prior) are left as they are -- calibrated, and scored as such (AUC, ECE, log loss) -- only the
decision moves: exp(b_k) is the factor by which class k's odds are raised, i.e. the cost of missing k
relative to a false alarm. Every consumer (evaluate, predict, serve, Grad-CAM, report, the ONNX backend)
decides this way when best.pt (or model.onnx) holds an operating point.

TTA shifts the logits enough to move the threshold (on HAM10000 a bias set on the 8 dihedral views gives
0.68-0.79 melanoma recall on single views), so one pass over val sets two biases: ``bias`` for single-view
decisions (serve, Grad-CAM, predict and evaluate without --tta) and ``bias_tta`` for the run's TTA views.

The biases are thresholds chosen on val: the sensitivity that evaluate then reports on val is in-sample. The
ablation scores it honestly (set on one half of the val lesions, scored on the other).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from skinlesion import rules
from skinlesion.data.taxonomy import melanoma_code
from skinlesion.errors import SkinLesionError

MARGIN = 1e-6  # strictly above the tie, so the class wins the argmax
SUMMARY_KEYS = ("classes", "min_sensitivity", "bias", "bias_tta", "fitted_on")  # what metrics.json records of it


def parse_targets(specs: Sequence[str] | str | None, classes: Sequence[str]) -> dict[str, float]:
    """'mel=0.75' (one string, comma-separated, or a list of them) -> {'mel': 0.75}, checked (rules.targets) against
    ``classes``."""
    targets = rules.targets(list(specs) if specs is not None and not isinstance(specs, str) else specs)
    # Class codes in any letter case; "mel" names the melanoma class of any label set (MEL, melanoma).
    codes = {c.lower(): c for c in classes}
    melanoma = melanoma_code(list(classes))
    targets = {codes.get(k.lower(), melanoma if k.lower() == "mel" and melanoma else k): v for k, v in
               targets.items()}  # fmt: skip
    unknown = [name for name in targets if name not in classes]
    if unknown:
        raise SkinLesionError(f"--min-sensitivity {unknown[0]!r} is not a class of this run; {rules.TARGETS_HELP} with "
                              f"CLASS one of {', '.join(classes)}")  # fmt: skip
    return targets


def recall(z: np.ndarray, y: np.ndarray, k: int) -> float:
    positives = y == k
    return float((z[positives].argmax(1) == k).mean()) if positives.any() else float("nan")


def fit(z: np.ndarray, y: np.ndarray, classes: Sequence[str], targets: Mapping[str, float]) -> np.ndarray:
    """A bias per targeted class (0 elsewhere) with recall >= target on (z, y); the smallest one for one class.

    For one class k, image i of class k is called k once b exceeds m_i = max_{j != k} z_ij - z_ik, so the
    bias is the ceil(target * n_k)-th smallest m_i (never below 0: the operating point only raises a class).
    Several classes take images from each other, so each is raised in turn (never lowered) until all are met;
    targets that cannot be met together are refused."""
    z = np.asarray(z, dtype=np.float64)
    bias = np.zeros(len(classes))
    index = {c: i for i, c in enumerate(classes)}
    for name in targets:
        if not (y == index[name]).any():
            raise SkinLesionError(f"no {name} image among the images to set the operating point on")
    for _ in range(100):
        for name, target in targets.items():
            k = index[name]
            zk = z[y == k] + bias
            margin = np.delete(zk, k, axis=1).max(1) - zk[:, k]
            need = np.sort(margin)[int(np.ceil(target * len(zk) - 1e-9)) - 1]
            bias[k] = max(bias[k], bias[k] + need + MARGIN)
        if all(recall(z + bias, y, index[c]) >= t for c, t in targets.items()):
            return bias
    got = ", ".join(f"{c} {recall(z + bias, y, index[c]):.2f}" for c in targets)
    raise SkinLesionError(
        f"the sensitivities {', '.join(f'{c}={t:g}' for c, t in targets.items())} cannot all be reached together "
        f"on these images (got {got}); ask for lower ones or fewer classes"
    )


def decide(probs: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Predicted class per row: argmax of the probabilities, or of log p + bias with an operating point
    (``bias`` (C,) or one row per image, (N, C))."""
    probs = np.asarray(probs, dtype=np.float64)
    if bias is None:
        return probs.argmax(1)
    return (np.log(np.clip(probs, 1e-300, None)) + bias).argmax(1)


def vector(point: Mapping[str, Any] | None, classes: Sequence[str], tta: bool = False) -> np.ndarray | None:
    """The stored bias for single-view (or, ``tta``, TTA) decisions in ``classes`` order; None without one."""
    if not point:
        return None
    if list(point["classes"]) != list(classes):
        raise SkinLesionError("operating point and model disagree on the class order; re-run operating-point")
    return np.asarray(point["bias_tta"] if tta and point.get("bias_tta") else point["bias"], dtype=np.float64)


def describe(point: Mapping[str, Any]) -> str:
    """'mel >= 0.75 (bias +1.62, TTA +1.07)', for logs, the report and the web page."""
    single = dict(zip(point["classes"], point["bias"], strict=True))
    tta = dict(zip(point["classes"], point.get("bias_tta") or point["bias"], strict=True))
    return ", ".join(
        f"{c} >= {t:g} (bias {single[c]:+.2f}" + (f", TTA {tta[c]:+.2f})" if point.get("bias_tta") else ")")
        for c, t in point["min_sensitivity"].items()
    )


def build(
    z: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    targets: Mapping[str, float],
    z_tta: np.ndarray | None = None,
    **about: Any,
) -> dict[str, Any]:
    """Fit on single-view logits ``z`` (and TTA logits ``z_tta``) and describe: what best.pt and model.onnx carry."""
    index = {c: i for i, c in enumerate(classes)}
    point: dict[str, Any] = {"classes": list(classes), "min_sensitivity": dict(targets), "n_images": int(len(y))}
    for key, logits in (("", z), ("_tta", z_tta)):
        if logits is None:
            point["bias_tta"] = None
            continue
        bias = fit(logits, y, classes, targets)
        point[f"bias{key}"] = bias.tolist()
        point[f"sensitivity_before{key}"] = {c: recall(logits, y, index[c]) for c in targets}
        point[f"sensitivity_after{key}"] = {c: recall(logits + bias, y, index[c]) for c in targets}
    return {**point, **about}


def report_line(point: Mapping[str, Any]) -> str:
    def moved(key: str) -> str:
        before, after = point[f"sensitivity_before{key}"], point[f"sensitivity_after{key}"]
        return ", ".join(f"{c} {before[c]:.3f} -> {after[c]:.3f}" for c in point["min_sensitivity"])

    views = f"; {point['tta_views']} TTA views: {moved('_tta')}" if point.get("bias_tta") else ""
    return (
        f"operating point {describe(point)} set on {point['n_images']} {point['fitted_on']} images "
        f"(T {point['temperature']:.3f}); sensitivity there, single view: {moved('')}{views}"
    )
