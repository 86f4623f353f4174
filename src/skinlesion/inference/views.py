"""The test-time-augmentation views, defined once for both backends (torch tensors and numpy arrays, NCHW).

View order: identity, horizontal, vertical and both flips, then (8 views) the same four of the transposed
image -- together the 8 symmetries of the square (the dihedral group D4: every 90-degree rotation with and
without a mirror). ``n = 4`` takes the four flips, ``n = 1`` the image alone.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Batch = TypeVar("Batch", torch.Tensor, np.ndarray)
COUNTS = (1, 4, 8)
NAMES = ("identity", "h", "v", "hv", "t", "t+h", "t+v", "t+hv")


def _flips(x: Batch) -> list[Batch]:
    if isinstance(x, torch.Tensor):
        return [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    return [x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]]


def views(x: Batch, n: int) -> list[Batch]:
    """The first ``n`` views (1, 4 or 8) of an NCHW batch."""
    if n not in COUNTS:
        raise ValueError(f"{n} TTA views: choose 1, 4 or 8")
    if n == 1:
        return [x]
    out = _flips(x)
    if n == 8:
        out += _flips(x.transpose(-1, -2) if isinstance(x, torch.Tensor) else np.swapaxes(x, -1, -2))
    return out


def describe(n: int) -> str:
    return {1: "the image alone", 4: "identity, h, v, hv flips",
            8: "identity, h, v, hv flips of the image and of its transpose"}[n]  # fmt: skip
