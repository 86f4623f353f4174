"""Colour constancy: the illuminant of each image estimated and divided out before resizing.

Shades of Gray (Finlayson & Trezzi 2004) with Minkowski norm p = 6, as the ISIC 2019 winners used it (Gessert et
al. 2020) against differences of dermatoscope and camera between sources: per channel e_c = mean(I_c ** p) ** (1/p),
then each channel is scaled by 1 / (sqrt(3) * e_c / |e|), so a grey-world image is left as it is. Computed in float64
with NumPy (deterministic on every machine), rounded back to uint8.
"""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("none", "shades-of-gray")
MINKOWSKI_P = 6


def shades_of_gray(chw: torch.Tensor, p: int = MINKOWSKI_P) -> torch.Tensor:
    """(3, H, W) uint8 -> the same image under a neutral illuminant."""
    x = chw.numpy().astype(np.float64)
    illuminant = np.power(np.mean(np.power(x, p), axis=(1, 2)), 1.0 / p)
    norm = np.sqrt(np.sum(illuminant**2))
    if norm == 0:  # an all-black image: nothing to correct
        return chw
    with np.errstate(divide="ignore"):  # a channel that is black throughout keeps gain 1
        gain = np.where(illuminant > 0, norm / (np.sqrt(3.0) * illuminant), 1.0)
    out = np.clip(np.rint(x * gain[:, None, None]), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(1, 2, 0))).permute(2, 0, 1)


def apply(chw: torch.Tensor, method: str) -> torch.Tensor:
    if method == "none":
        return chw
    if method == "shades-of-gray":
        return shades_of_gray(chw)
    raise ValueError(f"unknown colour constancy {method!r}")
