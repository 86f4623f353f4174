"""Batched prediction from a loaded checkpoint: eval transform, temperature, optional TTA.

Shared by evaluate, predict, serve and the Grad-CAM commands so that they all see the same
probabilities for the same image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skinlesion import checkpoint, operating_point
from skinlesion.data.transforms import eval_transform
from skinlesion.metadata_prior import combine


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Identity, horizontal, vertical and both flips of an NCHW batch."""
    return [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square (dihedral group D4): the 4 flips of x and of its transpose,
    i.e. every 90-degree rotation with and without a mirror."""
    return tta_views(x) + tta_views(x.transpose(-1, -2))


TTA_VIEWS = {4: tta_views, 8: dihedral_views}


def run_tta_views(meta: dict) -> int:
    """How many views ``--tta`` averages for this run: its recipe's ``tta_views`` (4 flips unless it says 8)."""
    return int((meta.get("config") or {}).get("tta_views", 4))


def run_pools_lesions(meta: dict) -> bool:
    """Whether this run scores a lesion's images together by default (its recipe's ``pool_lesions``)."""
    return bool((meta.get("config") or {}).get("pool_lesions", False))


class Predictor:
    def __init__(self, source: str | Path | checkpoint.Loaded, device: str = "cpu"):
        self.loaded = source if isinstance(source, checkpoint.Loaded) else checkpoint.load(source, device)
        self.device = torch.device(device)
        self.model = self.loaded.model.to(self.device).eval()
        meta = self.loaded.meta
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.img_size = int(meta["img_size"])
        self.transform = eval_transform(meta["img_size"], meta["resize_size"], tuple(meta["mean"]), tuple(meta["std"]))
        self.tta_views = run_tta_views(meta)
        self.pool_lesions = run_pools_lesions(meta)
        self.metadata_prior: dict | None = meta.get("metadata_prior")
        # The operating point (operating_point.py): per-class decision biases; None = the plain argmax.
        self.operating_point: dict | None = meta.get("operating_point")
        operating_point.vector(self.operating_point, self.classes)  # a class-order mismatch fails here

    @property
    def temperature(self) -> float:
        return self.loaded.temperature

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(im) for im in images])

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Raw (un-tempered) logits; with ``tta`` the mean logit over ``self.tta_views`` views (4 flips or
        the 8 dihedral symmetries)."""
        batch = batch.to(self.device)
        if not tta:
            return self.model(batch).float().cpu()
        return torch.stack([self.model(v).float() for v in TTA_VIEWS[self.tta_views](batch)]).mean(0).cpu()

    def probabilities(self, logits: torch.Tensor, offset: np.ndarray | None = None) -> np.ndarray:
        """softmax(logits / T + offset): ``offset`` is the metadata prior's (metadata_prior.offsets)."""
        return torch.softmax(torch.from_numpy(combine(logits.numpy(), self.temperature, offset)), dim=1).float().numpy()

    def decide(self, probs: np.ndarray, tta: bool = False) -> np.ndarray:
        """Predicted class indices: the argmax, moved by the operating point (its bias for single views or,
        ``tta``, for the TTA views the probabilities came from) when best.pt holds one."""
        return operating_point.decide(probs, operating_point.vector(self.operating_point, self.classes, tta))

    def predict_images(
        self, images: Sequence[Image.Image], tta: bool = False, offset: np.ndarray | None = None
    ) -> np.ndarray:
        """Calibrated class probabilities, shape (N, num_classes)."""
        return self.probabilities(self.logits(self.preprocess(images), tta=tta), offset=offset)

    def predict_loader(self, loader: Iterable, tta: bool = False) -> torch.Tensor:
        """Logits for every batch of an (images, labels) loader, concatenated."""
        return torch.cat([self.logits(x, tta=tta) for x, _ in loader])
