"""ONNX Runtime predictor with the interface of ``inference.Predictor.predict_images``.

Everything it needs (classes, normalisation, sizes, temperature, metadata prior) comes from model.onnx's
metadata, written by ``skinlesion export``; preprocessing is the same eval transform.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from skinlesion import fileio, operating_point
from skinlesion.data.transforms import eval_transform
from skinlesion.errors import SkinLesionError
from skinlesion.metadata_prior import combine

REQUIRED_KEYS = ("classes", "mean", "std", "img_size", "resize_size", "temperature", "backbone")


def onnx_path(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    return path if path.suffix == ".onnx" else path / "model.onnx"


def read_metadata(session: Any, path: Path) -> dict[str, Any]:
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise SkinLesionError(f"{path} lacks metadata {missing}; re-create it with `skinlesion export`")
    return {
        "classes": json.loads(props["classes"]),
        "mean": json.loads(props["mean"]),
        "std": json.loads(props["std"]),
        "img_size": int(props["img_size"]),
        "resize_size": int(props["resize_size"]),
        "temperature": float(props["temperature"]),
        "backbone": props["backbone"],
        "tta_views": int(props.get("tta_views", 4)),  # models exported before it existed used the 4 flips
        "source_sha256": props.get("source_sha256", ""),
        "metadata_prior": json.loads(props.get("metadata_prior", "null")),
        "operating_point": json.loads(props.get("operating_point", "null")),
        "pool_lesions": bool(json.loads(props.get("pool_lesions", "false"))),
    }


class OnnxPredictor:
    """``predict_images(pil_list, tta)`` -> calibrated probabilities (N, num_classes), like the torch one."""

    def __init__(self, source: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = onnx_path(source)
        if not self.path.is_file():
            raise SkinLesionError(
                f"no ONNX model at {self.path}; run `skinlesion export --run-dir {self.path.parent}` first"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to fix
            raise SkinLesionError(f"could not load {self.path} ({e}); re-run `skinlesion export`") from e
        self.meta = read_metadata(self.session, self.path)
        self.classes: list[str] = list(self.meta["classes"])
        self.img_size: int = self.meta["img_size"]
        self.input_name = self.session.get_inputs()[0].name
        self.tta_views: int = self.meta["tta_views"]
        self.metadata_prior: dict | None = self.meta["metadata_prior"]
        self.operating_point: dict | None = self.meta["operating_point"]
        self.pool_lesions: bool = self.meta["pool_lesions"]
        operating_point.vector(self.operating_point, self.classes)
        self.transform = eval_transform(
            self.img_size, self.meta["resize_size"], tuple(self.meta["mean"]), tuple(self.meta["std"])
        )

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    def is_stale(self, checkpoint_path: str | Path) -> bool:
        """True when best.pt changed (retrained / recalibrated) after this model.onnx was exported."""
        src = self.meta["source_sha256"]
        return bool(src) and Path(checkpoint_path).is_file() and fileio.sha256_file(checkpoint_path) != src

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return torch.stack([self.transform(im) for im in images]).numpy()

    def logits(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Raw logits; with ``tta`` the mean over the run's views, in inference.TTA_VIEWS's order: identity,
        h, v and hv flips, then (8 views) the same four of the transposed image."""
        views = [batch]
        if tta:
            flips = [batch[..., ::-1], batch[..., ::-1, :], batch[..., ::-1, ::-1]]
            views += flips
            if self.tta_views == 8:
                views += [v.swapaxes(-1, -2) for v in (batch, *flips)]
        out = [self.session.run(None, {self.input_name: np.ascontiguousarray(v)})[0] for v in views]
        return np.mean(out, axis=0).astype(np.float32)

    def probabilities(self, logits: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
        z = combine(logits, self.temperature, offset)
        return torch.softmax(torch.from_numpy(z), dim=1).float().numpy()

    def decide(self, probs: np.ndarray, tta: bool = False) -> np.ndarray:
        return operating_point.decide(probs, operating_point.vector(self.operating_point, self.classes, tta))

    def predict_images(
        self, images: Sequence[Image.Image], tta: bool = False, offset: np.ndarray | None = None
    ) -> np.ndarray:
        return self.probabilities(self.logits(self.preprocess(images), tta=tta), offset)
