"""ONNX Runtime backend: model.onnx -> raw logits per TTA view, with the interface of the torch backend.

Everything it needs (classes, normalisation, sizes, and the decision chain's settings: temperature, metadata
prior, operating point, TTA views, lesion pooling) comes from model.onnx's metadata, written by
``skinlesion export``; the input is the same ``Preprocessing`` (stored in the metadata) as the torch backend's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skinlesion import fileio
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import SkinLesionError
from skinlesion.inference.views import views

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
        "members": json.loads(props.get("members", "null")),
        "preprocessing": json.loads(props.get("preprocessing", "null")),
        "class_names": json.loads(props.get("class_names", "null")),
        **{key: json.loads(props.get(key, "null")) for key in ("referral", "conformal", "ood")},
    }


def providers() -> list[str]:
    """ONNX Runtime's accelerators where this build has them (CUDA, then CPU as the fallback ORT requires)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


class OnnxBackend:
    name = "onnx"

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
            self.session = ort.InferenceSession(str(self.path), options, providers=providers())
        except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to fix
            raise SkinLesionError(f"could not load {self.path} ({e}); re-run `skinlesion export`") from e
        self.meta = read_metadata(self.session, self.path)
        self.classes: list[str] = list(self.meta["classes"])
        self.preprocessing = Preprocessing.from_meta(self.meta)
        self.normalize = self.preprocessing.normalizer("cpu")
        self.input_name = self.session.get_inputs()[0].name

    def is_stale(self, checkpoint_path: str | Path) -> bool:
        """True when best.pt changed (retrained / recalibrated) after this model.onnx was exported."""
        src = self.meta["source_sha256"]
        return bool(src) and Path(checkpoint_path).is_file() and fileio.sha256_file(checkpoint_path) != src

    def view_logits(self, batch: torch.Tensor, n_views: int = 1) -> np.ndarray:
        """Raw logits (n_views, N, C), float32, of a uint8 batch of centre crops under each TTA view."""
        x = self.normalize(torch.as_tensor(batch)).numpy()
        return np.stack([self.session.run(None, {self.input_name: np.ascontiguousarray(v)})[0].astype(np.float32)
                         for v in views(x, n_views)])  # fmt: skip
