"""Seeds and random-number-generator state: every source seeded from ``--seed``, and saved in last.pt as tensors
and plain data (it loads with weights_only=True), so ``--resume`` continues the same random streams."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's augmentation seeds on one rank (``SeededSampler``): crops and flips differ between
    ranks (each sees other images, but must not replay the same augmentation stream) and survive --resume."""
    return seed * 1000 + epoch + 1_000_003 * rank


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain data (last.pt loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (int(version), tuple(int(v) for v in internal), None if gauss is None else float(gauss)),
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``; also takes a converted older last.pt (NumPy's state as a tuple)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"], numpy_state["keys"], numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])  # fmt: skip
    name, keys, pos, has_gauss, cached = numpy_state
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
