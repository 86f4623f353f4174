"""How fast a scoring function runs on this CPU: best-round images/s of several side by side, and the CPU's name.

Used by `export --int8` (fp32 against INT8, stored in the file for ``--backend auto``) and by the benchmarks.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def images_per_s(fns: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, rounds: int = 3,
                 min_seconds: float = 0.5) -> dict[str, float]:  # fmt: skip
    """Best-round images/s of each callable on the batch ``x``: the callables alternate within every round of about
    ``min_seconds`` each, and the best round counts (another job only slows a round down)."""
    calls = {}
    for name, fn in fns.items():  # warm-up, and how many calls make a round of about min_seconds
        fn(x)
        calls[name] = max(1, int(min_seconds / max(_seconds(lambda fn=fn: fn(x)), 1e-4)))
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls[name]
            seconds = _seconds(lambda fn=fn, n=n: [fn(x) for _ in range(n)])
            best[name] = max(best[name], n * len(x) / seconds)
    return best


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model() -> str:
    """This CPU's model name (Linux; the platform's processor string elsewhere)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
