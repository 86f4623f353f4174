"""The self-describing checkpoint: everything needed to rebuild and run the model, no other flags.

Keys: model (state dict), backbone, num_classes, classes, img_size, resize_size, mean, std,
temperature (1.0 until calibrated), epoch, metrics, config, splits_sha256, versions;
last.pt adds optimizer, scheduler, scaler, rng (see train.py).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from skinlesion import __version__, fileio
from skinlesion.classes import CLASSES
from skinlesion.errors import SkinLesionError


def versions() -> dict[str, str]:
    import torchvision

    return {
        "skinlesion": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Atomically write ``meta`` plus the unwrapped model's state dict."""
    required = {"backbone", "img_size", "resize_size", "mean", "std"}
    missing = required - set(meta)
    if missing:
        raise ValueError(f"checkpoint meta lacks {sorted(missing)}")
    payload = {
        "classes": list(CLASSES),
        "num_classes": len(CLASSES),
        "temperature": 1.0,
        "versions": versions(),
        **meta,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
    }
    return fileio.torch_save(path, payload)


def read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise SkinLesionError(f"no checkpoint at {path}; train first (skinlesion train) or pass the right --run-dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SkinLesionError(f"could not read checkpoint {path}: {e}") from e


@dataclass
class Loaded:
    model: nn.Module
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from a checkpoint file or a run folder (its best.pt), in eval mode."""
    ckpt = read(path)
    model = timm.create_model(
        ckpt["backbone"], pretrained=False, num_classes=ckpt["num_classes"], **ckpt.get("model_kwargs", {})
    )
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    training_state = ("model", "optimizer", "scheduler", "scaler", "rng", "ema", "train_state")
    meta = {k: v for k, v in ckpt.items() if k not in training_state}
    return Loaded(model, meta)


def set_entry(path: str | Path, key: str, value: Any) -> None:
    """Store ``value`` under ``key`` in an existing checkpoint (atomic rewrite); None removes the key.
    A value with a ``classes`` list must list the checkpoint's classes in its order."""
    file = Path(path) / "best.pt" if Path(path).is_dir() else Path(path)
    ckpt = read(file)
    if value is None:
        ckpt.pop(key, None)
    else:
        if "classes" in value and list(value["classes"]) != list(ckpt["classes"]):
            raise SkinLesionError(f"{key} and checkpoint disagree on the class order")
        ckpt[key] = value
    fileio.torch_save(file, ckpt)


def set_temperature(path: str | Path, temperature: float, calibration: dict[str, Any] | None = None) -> None:
    """Store a fitted temperature in an existing checkpoint (atomic rewrite)."""
    ckpt = read(path)
    ckpt["temperature"] = float(temperature)
    if calibration is not None:
        ckpt["calibration"] = calibration
    fileio.torch_save(Path(path) / "best.pt" if Path(path).is_dir() else path, ckpt)
