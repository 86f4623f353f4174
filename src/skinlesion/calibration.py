"""``skinlesion calibrate``: temperature scaling (one scalar T, LBFGS on the NLL).

T is always fitted on images it is not scored on:

* ``crossfit`` (default): val lesions are split into folds (stratified by diagnosis, grouped by
  lesion); T fitted on the other folds scores each fold, which gives an honest before/after on all
  of val. The T stored is the one fitted on all of val.
* ``train-slice``: T is fitted on a lesion-grouped slice of *train* and scored on val. Those images
  were trained on, so the network is more confident on them than on new data and T comes out too
  small; it is offered for comparison and for runs whose val set is tiny.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedGroupKFold

from skinlesion import checkpoint, fileio, metadata_prior, metrics, operating_point
from skinlesion.device import resolve_device
from skinlesion.errors import SkinLesionError
from skinlesion.evaluate import labels_of, open_cache, predict_logits, read_config, softmax, split_part
from skinlesion.inference import Predictor


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


def lesion_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per image: lesions kept whole, diagnoses spread evenly where the counts allow."""
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise SkinLesionError(f"only {n_groups} lesions to calibrate on; need at least --folds {n_folds}")
    fold = np.empty(len(y), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for f, (_, idx) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        fold[idx] = f
    return fold


def crossfit(
    logits: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_folds: int = 2,
    seed: int = 0,
    offsets: np.ndarray | None = None,
):
    """Out-of-fold calibrated probabilities and the T of each fold. ``offsets`` (a metadata prior's) are
    added after the temperature, which is fitted on the image logits alone -- as predict and serve apply it."""
    fold = lesion_folds(y, groups, n_folds, seed)
    probs = np.empty_like(logits, dtype=float)
    temps = []
    for f in range(n_folds):
        held = fold == f
        t = fit_temperature(logits[~held], y[~held])
        probs[held] = softmax(logits[held] / t + (0.0 if offsets is None else offsets[held]))
        temps.append(t)
    return probs, temps


def scores(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    m = metrics.point_metrics(y, probs)["overall"]
    return {k: m[k] for k in ("ece", "log_loss", "brier", "accuracy")}


def _bins(y: np.ndarray, probs: np.ndarray) -> dict[str, list]:
    return {
        k: [None if not np.isfinite(v) else float(v) for v in a] for k, a in metrics.reliability_bins(y, probs).items()
    }


def calibrate(
    logits_fit: np.ndarray,
    y_fit: np.ndarray,
    logits_eval: np.ndarray | None,
    y_eval: np.ndarray | None,
    groups_fit: np.ndarray,
    method: str,
    n_folds: int = 2,
    seed: int = 0,
    offsets: np.ndarray | None = None,
) -> dict[str, Any]:
    """calibration.json content. crossfit: fit set == scored set (out of fold); train-slice: fit, then score eval.

    T is fitted on the image logits alone; ``offsets`` (the metadata prior's, for the scored images) are added
    after it when scoring, as evaluate / predict / serve do."""
    off = 0.0 if offsets is None else offsets
    if method == "crossfit":
        after, fold_t = crossfit(logits_fit, y_fit, groups_fit, n_folds, seed, offsets=offsets)
        y_scored, before = y_fit, softmax(logits_fit + off)
        temperature = fit_temperature(logits_fit, y_fit)
        extra: dict[str, Any] = {"folds": n_folds, "fold_temperatures": fold_t}
    elif method == "train-slice":
        temperature = fit_temperature(logits_fit, y_fit)
        y_scored, before, after = y_eval, softmax(logits_eval + off), softmax(logits_eval / temperature + off)
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


def train_slice(table, frac: float, seed: int):
    """A lesion-grouped, diagnosis-stratified ``frac`` of ``table``."""
    n_folds = max(2, round(1 / frac))
    y = labels_of(table)
    fold = lesion_folds(y, table["lesion_id"].astype(str).to_numpy(), n_folds, seed)
    return table[fold == 0].reset_index(drop=True)


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    predictor = Predictor(run_dir, device=str(resolve_device(args.device)))
    short = int(predictor.meta["resize_size"])
    cache_dir = args.cache_dir or read_config(run_dir).get("cache_dir")

    def logits_of(table, what: str) -> np.ndarray:
        cache = open_cache(table, short, getattr(args, "cache", True), cache_dir)
        return predict_logits(predictor, table, args.batch_size, cache=cache, workers=args.workers, desc=what)

    held = split_part(run_dir, args.split)
    y_held = labels_of(held)
    logits_held = logits_of(held, f"{args.split} logits")
    prior = predictor.metadata_prior
    offsets = metadata_prior.offsets(prior, held) if prior else None  # scored as evaluate will use them
    if args.method == "crossfit":
        groups = held["lesion_id"].astype(str).to_numpy()
        result = calibrate(logits_held, y_held, None, None, groups, "crossfit", args.folds, args.seed, offsets)
        result.update(fit_on=f"{args.split} (all lesions)", scored_on=f"{args.split}, out of fold")
    else:
        fit = train_slice(split_part(run_dir, "train"), args.slice_frac, args.seed)
        result = calibrate(
            logits_of(fit, "train-slice logits"),
            labels_of(fit),
            logits_held,
            y_held,
            fit["lesion_id"].astype(str).to_numpy(),
            "train-slice",
            seed=args.seed,
            offsets=offsets,
        )
        result.update(fit_on=f"{args.slice_frac:.0%} of train lesions (trained on)", scored_on=args.split)
    result["metadata_prior_images"] = int(metadata_prior.known(held, prior).sum()) if prior else 0
    summary = {k: v for k, v in result.items() if k != "reliability"}
    checkpoint.set_temperature(run_dir, result["temperature"], calibration=summary)
    fileio.write_json(run_dir / "calibration.json", result)
    b, a = result["before"], result["after"]
    print(f"temperature {result['temperature']:.3f} ({result['method']}; fitted on {result['fit_on']})")
    print(f"scored on {result['scored_on']} ({result['n_scored']} images):")
    print(f"  ECE {b['ece']:.4f} -> {a['ece']:.4f}   NLL {b['log_loss']:.4f} -> {a['log_loss']:.4f}")
    print(f"stored T in {run_dir / 'best.pt'}; wrote {run_dir / 'calibration.json'} (re-run evaluate to use it)")
    # The operating point's biases live after the temperature: set them again at the new T.
    operating_point.refit_stored(
        run_dir, "the new temperature", batch_size=args.batch_size, device=str(predictor.device),
        workers=args.workers, cache_dir=cache_dir, use_cache=getattr(args, "cache", True),
    )  # fmt: skip
