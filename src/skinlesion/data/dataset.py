"""A torch Dataset over rows of the metadata table, reading the image cache when given one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from skinlesion.classes import CLASS_INDEX
from skinlesion.data.images import DROP_HINT, open_rgb
from skinlesion.errors import SkinLesionError


class ArraySource(Protocol):
    def get(self, image_id: str) -> np.ndarray:  # (H, W, 3) uint8
        ...

    def shape(self, image_id: str) -> tuple[int, int]:  # (H, W)
        ...


class LesionDataset(Dataset):
    """Items are ``(image_tensor, class_index)``.

    ``table`` needs columns image_id, path, dx. With ``cache`` the pre-resized uint8 pixels are
    read from it (no JPEG decode); otherwise the original file is decoded.
    """

    def __init__(self, table: pd.DataFrame, transform: Callable, cache: ArraySource | None = None):
        self.image_ids = table["image_id"].astype(str).tolist()
        self.paths = table["path"].astype(str).tolist()
        self.labels = [CLASS_INDEX[d] for d in table["dx"]]
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, i: int):
        if self.cache is not None:
            pixels = self.cache.get(self.image_ids[i])
            return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1))
        try:
            return open_rgb(self.paths[i])
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
