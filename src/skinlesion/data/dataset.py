"""A torch Dataset over rows of an image table: the preprocessing's pixels (from the image cache when given one,
else decoded from the file by the same ``Preprocessing``), then a per-item transform (a training preset's random
crop, or the evaluation centre crop)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torchvision import tv_tensors

from skinlesion.classes import CLASSES
from skinlesion.data.images import DROP_HINT
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import SkinLesionError


class StoredPixels(Protocol):
    def get(self, image_id: str) -> np.ndarray:  # (H, W, 3) uint8, Preprocessing.stored's output
        ...

    def shape(self, image_id: str) -> tuple[int, int]:  # (H, W)
        ...


class LesionDataset(torch.utils.data.Dataset):
    """Items are ``(uint8 image tensor, class index)``; ``table`` needs image_id, path and dx (a label of
    ``classes``; -1 for rows without a label in them, e.g. unlabelled images to predict)."""

    def __init__(
        self,
        table: pd.DataFrame,
        preprocessing: Preprocessing,
        transform: Callable,
        cache: StoredPixels | None = None,
        classes: Sequence[str] = CLASSES,
    ):
        index = {c: i for i, c in enumerate(classes)}
        self.image_ids = table["image_id"].astype(str).tolist()
        self.paths = table["path"].astype(str).tolist()
        self.labels = [index.get(d, -1) for d in table["dx"]] if "dx" in table else [-1] * len(table)
        self.preprocessing = preprocessing
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, i: int) -> tv_tensors.Image:
        """The image's pixels (Preprocessing.pixels), read from the cache or decoded."""
        if self.cache is not None:
            return self.preprocessing.finish(self.cache.get(self.image_ids[i]))
        try:
            return self.preprocessing.pixels(self.paths[i])
        except SkinLesionError as e:
            raise SkinLesionError(f"{e}; {DROP_HINT}") from e

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """``key`` is an index, or ``(index, seed)`` from a seeded sampler: the random transform then draws
        from that seed alone (and leaves the process's torch RNG as it was)."""
        return self.item(key, self.load(key[0] if isinstance(key, tuple) else key))

    def item(self, key: int | tuple[int, int], image) -> tuple[torch.Tensor, int]:
        """``__getitem__`` for pixels already loaded (e.g. held in device memory: data/device_cache.py). The
        transforms draw their parameters from the CPU generator, so the seed decides them on any device."""
        if isinstance(key, tuple):
            i, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(image), self.labels[i]
        return self.transform(image), self.labels[key]
