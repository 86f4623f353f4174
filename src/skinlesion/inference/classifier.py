"""A classifier = an inference backend (raw logits per TTA view) + the decision chain (everything after).

What evaluate, predict, serve and the Python API (skinlesion.api) run: the backend's logits go through the
run's ``DecisionChain`` and nothing else, so every consumer gets the same probabilities and decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from skinlesion.data.dataset import LesionDataset
from skinlesion.data.images import open_rgb
from skinlesion.decision.chain import DecisionChain, Decisions
from skinlesion.errors import SkinLesionError

BACKENDS = ("torch", "onnx")


class Backend(Protocol):
    name: str
    meta: dict[str, Any]
    classes: list[str]
    img_size: int
    resize_size: int
    transform: Any

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def view_logits(self, batch: torch.Tensor, n_views: int = 1) -> np.ndarray: ...


def load_backend(source: str | Path, backend: str = "torch", device: str = "cpu") -> Backend:
    """The torch (best.pt) or ONNX Runtime (model.onnx) backend of a run folder or file."""
    if backend == "torch":
        from skinlesion.inference.torch_backend import TorchBackend

        return TorchBackend(source, device=device)
    if backend == "onnx":
        from skinlesion.inference.onnx_backend import OnnxBackend

        return OnnxBackend(source)
    raise SkinLesionError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")


@dataclass(frozen=True)
class Classifier:
    backend: Backend
    chain: DecisionChain

    @classmethod
    def load(cls, source: str | Path, backend: str = "torch", device: str = "cpu") -> Classifier:
        loaded = load_backend(source, backend, device)
        return cls(loaded, DecisionChain.from_meta(loaded.meta))

    @property
    def classes(self) -> list[str]:
        return list(self.chain.classes)

    def with_chain(self, **changes: Any) -> Classifier:
        """The same network with some chain settings changed (a step switched off, other TTA views)."""
        return replace(self, chain=self.chain.replace(**changes))

    def switched(self, *switches: Any) -> Classifier:
        """The same network with the command line's switches applied to its chain (DecisionChain.switched)."""
        return replace(self, chain=self.chain.switched(*switches))

    def n_views(self, tta: bool) -> int:
        return self.chain.tta_views if tta else 1

    def decode(self, source: str | Path | bytes, **limits: Any) -> Image.Image:
        """An image file or upload decoded for this model: open_rgb with the model's resize size, so a large photo
        is decoded small (``limits``: open_rgb's max_pixels / max_aspect)."""
        return open_rgb(source, min_short_side=self.backend.resize_size, **limits)

    def view_logits(self, images: Sequence[Image.Image | str | Path], tta: bool = False) -> np.ndarray:
        """Raw logits (V, N, C) of images (PIL images or files): V = 1, or the run's TTA views."""
        pil = [im if isinstance(im, Image.Image) else self.decode(im) for im in images]
        return self.backend.view_logits(self.backend.preprocess(pil), self.n_views(tta))

    def predict(
        self,
        images: Sequence[Image.Image | str | Path],
        tta: bool = False,
        clinical: pd.DataFrame | None = None,
        lesion_ids: Sequence[str | None] | None = None,
    ) -> Decisions:
        """Probabilities and decisions of images (PIL images or files); ``clinical`` (row i = images[i]: age, sex,
        localization) for the metadata prior, ``lesion_ids`` for lesion pooling."""
        return self.chain(self.view_logits(images, tta), self.chain.offsets(clinical), lesion_ids)

    def view_logits_of_table(
        self,
        table: pd.DataFrame,
        n_views: int = 1,
        batch_size: int = 64,
        cache: Any = None,
        workers: int = 0,
        desc: str = "predict",
    ) -> np.ndarray:
        """Raw logits (n_views, N, C) of every row of a data table (``path`` column; ``cache``: the data
        layer's image cache), in one pass: view 0 is the single-view logit, the mean over all the TTA one."""
        dataset = LesionDataset(table, self.backend.transform, cache)
        pin = getattr(self.backend, "device", torch.device("cpu")).type == "cuda"  # page-locked: faster copies
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)
        chunks = [self.backend.view_logits(x, n_views) for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False)]
        return np.concatenate(chunks, axis=1)
