"""The self-describing checkpoint: everything needed to rebuild and run the model, no other flags.

Keys: model (state dict), backbone, num_classes, classes, preprocessing (data/preprocessing.Preprocessing as a
dict: the one description of the input, also mirrored as img_size, resize_size, mean, std for older readers),
temperature (1.0 until calibrated), epoch, metrics, config, splits_sha256, versions;
last.pt adds optimizer, scheduler, scaler, rng (see train.py).

Safe to open: files hold tensors and plain data only (``fileio.torch_save``) and are read with
``weights_only=True`` (``fileio.torch_load``), so a checkpoint cannot run code. An older file that holds NumPy
values is converted once, on the user's explicit word, by ``convert`` (``skinlesion convert-checkpoint``).
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
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import SkinLesionError
from skinlesion.model import factory


def versions() -> dict[str, str]:
    import torchvision

    return {  # str(): torch's version string is a str subclass, not plain data
        "skinlesion": str(__version__),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "timm": str(timm.__version__),
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


def preprocessing_entries(preprocessing: Preprocessing) -> dict[str, Any]:
    """A checkpoint's description of its input: ``preprocessing`` and its mirror keys for older readers."""
    return {"preprocessing": preprocessing.to_dict(), "img_size": preprocessing.img_size,
            "resize_size": preprocessing.resize_size, "mean": list(preprocessing.mean), "std": list(preprocessing.std)}


def save(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Atomically write ``meta`` plus the unwrapped model's state dict."""
    required = {"backbone", "preprocessing", "img_size", "resize_size", "mean", "std"}
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


# Keys every skinlesion checkpoint (best.pt and last.pt) has; `load` needs them all.
REQUIRED = ("backbone", "model", "num_classes", "classes", "img_size", "resize_size", "mean", "std")


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or a run folder's best.pt."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() else path


def read(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, loaded as tensors and plain data only (never unpickling code), with its keys checked."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise SkinLesionError(f"no checkpoint at {path}; train first (skinlesion train) or pass the right --run-dir")
    ckpt = fileio.torch_load(path, "checkpoint")
    check(ckpt, path)
    return ckpt


def check(ckpt: Any, path: str | Path) -> None:
    """One line for a file that is not a skinlesion checkpoint (a plain state dict, a tensor, a partial dict)."""
    hint = "pass a run folder made by `skinlesion train` or its best.pt"
    if not isinstance(ckpt, dict):
        raise SkinLesionError(f"{path} is not a skinlesion checkpoint (it holds a {type(ckpt).__name__}); {hint}")
    for key in REQUIRED:
        if key not in ckpt:
            raise SkinLesionError(f"{path} is not a skinlesion checkpoint (no {key!r} key); {hint}")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise SkinLesionError(f"{path} is not a skinlesion checkpoint ('model' is not a state dict); {hint}")


def convert(path: str | Path, trust: bool = False) -> tuple[Path, str]:
    """Rewrite an old checkpoint (NumPy values in its meta or RNG state) as tensors and plain data, atomically.

    Reading it means unpickling with ``weights_only=False``, which runs whatever code the file carries: only
    with ``trust`` (the CLI's ``--i-trust-this-file``). Returns the file and what was done."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise SkinLesionError(f"no checkpoint at {path}; pass a best.pt / last.pt or a run folder")
    if not trust:
        raise SkinLesionError(
            f"converting {path} unpickles it, which runs any code hidden in the file; pass --i-trust-this-file "
            "only for a checkpoint you made yourself or got from someone you trust"
        )
    try:
        fileio.torch_load(path, "checkpoint")
    except SkinLesionError:
        pass
    else:
        return path, "already plain data (loads with weights_only=True); nothing to do"
    names = fileio.unsafe_globals(path)  # read without unpickling
    if names is None:
        raise SkinLesionError(f"{path} is not a zip-format PyTorch file; skinlesion never wrote it, not converting")
    foreign = [n for n in names if not fileio.is_old_checkpoint_global(n)]
    if foreign:  # trust or not: an old skinlesion file holds NumPy values, never these
        raise SkinLesionError(
            f"{path} would import {', '.join(foreign[:3])} when unpickled, which no skinlesion checkpoint does; "
            "not converting it"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for this file
    except Exception as e:  # noqa: BLE001
        raise SkinLesionError(f"could not read {path} even with pickle ({type(e).__name__}); it is damaged") from e
    try:
        data = fileio.plain(ckpt)
    except TypeError as e:
        raise SkinLesionError(f"cannot convert {path}: {e}; it is not a skinlesion checkpoint") from e
    fileio.torch_save(path, data)
    fileio.torch_load(path, "checkpoint")  # proves the rewrite
    held = f" (was: {', '.join(names)})" if names else ""
    return path, f"rewritten as tensors and plain data{held}; it now loads with weights_only=True"


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

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_meta(self.meta)


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from a checkpoint file or a run folder (its best.pt), in eval mode."""
    ckpt = read(path)
    try:
        model = factory.architecture(ckpt)
    except Exception as e:  # noqa: BLE001 - unknown backbone name, bad kwargs: the file's problem
        raise SkinLesionError(
            f"{checkpoint_file(path)}: cannot build backbone {ckpt['backbone']!r} ({fileio.first_line(e)}); "
            "the checkpoint was made with another timm version or is damaged"
        ) from e
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SkinLesionError(
            f"{checkpoint_file(path)}: its weights do not fit {ckpt['backbone']} ({fileio.first_line(e)}); "
            "the checkpoint is damaged or was edited"
        ) from e
    model.to(device).eval()
    training_state = ("model", "optimizer", "scheduler", "scaler", "rng", "ema", "train_state", "history")
    meta = {k: v for k, v in ckpt.items() if k not in training_state}
    return Loaded(model, meta)


def set_entry(path: str | Path, key: str, value: Any) -> None:
    """Store ``value`` under ``key`` in an existing checkpoint (atomic rewrite); None removes the key.
    A value with a ``classes`` list (or, like the config, ``class_codes``) must list the checkpoint's classes in
    its order."""
    file = checkpoint_file(path)
    ckpt = read(file)
    if value is None:
        ckpt.pop(key, None)
    else:
        found = value if isinstance(value, dict) else {}
        codes = found.get("classes") if isinstance(found.get("classes"), list | tuple) else found.get("class_codes")
        if codes is not None and list(codes) != list(ckpt["classes"]):
            raise SkinLesionError(f"{key} and checkpoint disagree on the class order")
        ckpt[key] = value
    fileio.torch_save(file, ckpt)


def set_temperature(path: str | Path, temperature: float, calibration: dict[str, Any] | None = None) -> None:
    """Store a fitted temperature in an existing checkpoint (atomic rewrite)."""
    ckpt = read(path)
    ckpt["temperature"] = float(temperature)
    if calibration is not None:
        ckpt["calibration"] = calibration
    fileio.torch_save(checkpoint_file(path), ckpt)
