"""Lesion bootstrap: vectorised weight-matrix metrics vs a scikit-learn loop over resamples.

    .venv/bin/python benchmarks/bench_bootstrap.py [n_images] [resamples]

Prints seconds for both and their ratio; the loop is timed on 50 resamples and scaled.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from skinlesion import metrics
from skinlesion.classes import CLASSES


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    n_boot = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(size=(n, len(CLASSES))) + 2 * np.eye(len(CLASSES))[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    lesions = np.arange(n) // 2

    t = time.perf_counter()
    metrics.evaluate(y, probs, lesions, CLASSES, n_boot=n_boot)
    fast = time.perf_counter() - t

    loop_n = min(50, n_boot)
    weights = metrics.lesion_weights(lesions, loop_n, seed=0)
    t = time.perf_counter()
    for w in weights:
        idx = np.repeat(np.arange(n), w.astype(int))
        metrics.point_metrics(y[idx], probs[idx])
    slow = (time.perf_counter() - t) * n_boot / loop_n

    print(f"{n} images, {n_boot} lesion resamples")
    print(f"vectorised (weights)      {fast:8.2f} s")
    print(f"scikit-learn loop (est.)  {slow:8.2f} s")
    print(f"speed-up                  {slow / fast:8.1f}x")


if __name__ == "__main__":
    main()
