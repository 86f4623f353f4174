"""Device choice: ``auto`` picks cuda, then mps, then cpu."""

from __future__ import annotations

import torch

from skinlesion.errors import SkinLesionError


def resolve_device(name: str | None = "auto") -> torch.device:
    name = name or "auto"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SkinLesionError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SkinLesionError("--device mps asked for, but MPS is not available; use --device cpu")
    return torch.device(name)
