"""The image cache resident in device memory, and batches drawn from it without loader workers.

HAM10000 at the 224-px training size is about 2.6 GB of uint8 pixels (0.9 GB from the 200x150 copy): on a GPU
it fits next to the model, and every step then crops, flips (the whole train preset, per sample, seeded as in
the worker path) and normalises on the device: no worker processes, no pinned memory, no host-to-device copy.
On the CPU the batches are exactly the DataLoader's (tests/test_train_parts.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler
from torchvision import tv_tensors
from tqdm.auto import tqdm

from skinlesion.data.dataset import LesionDataset
from skinlesion.errors import SkinLesionError


class DeviceImages:
    """Every image of ``dataset`` (read from its image cache) in one uint8 buffer on ``device``, CHW each."""

    def __init__(self, dataset: LesionDataset, device: torch.device, progress: bool = False):
        cache = dataset.cache
        if cache is None:
            raise SkinLesionError("--device-cache copies the image cache to the device; drop --no-cache")
        # The loader's pixels (a cached image smaller than the resize size is finished, i.e. upscaled, on the way).
        pixels = (dataset.load(n) for n in range(len(dataset)))
        self.sizes: list[tuple[int, int]] = []
        chunks = []
        bar = tqdm(pixels, total=len(dataset), desc="images to device memory", unit="img", disable=not progress)
        for chw in bar:
            self.sizes.append((int(chw.shape[1]), int(chw.shape[2])))
            chunks.append(chw.as_subclass(torch.Tensor).contiguous().reshape(-1).to(device))
        self.offsets = np.concatenate([[0], np.cumsum([3 * h * w for h, w in self.sizes], dtype=np.int64)]).tolist()
        self.buffer = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=device)

    def __getitem__(self, i: int) -> tv_tensors.Image:
        (h, w), start = self.sizes[i], self.offsets[i]
        return tv_tensors.Image(self.buffer[start : start + 3 * h * w].view(3, h, w))

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


class DeviceBatches:
    """What the training loop needs of a DataLoader (``sampler``, ``dataset``, ``len``, ``(x, y)`` batches), over
    ``DeviceImages``: the preset runs per sample on the device, under the sampler's per-sample seed."""

    def __init__(
        self,
        dataset: LesionDataset,
        images: DeviceImages,
        batch_size: int,
        sampler: Sampler,
        drop_last: bool = False,
    ):
        self.dataset, self.images, self.batch_size, self.sampler, self.drop_last = (
            dataset, images, batch_size, sampler, drop_last
        )  # fmt: skip

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = list(self.sampler)
        device = self.images.buffer.device
        for b in range(len(self)):
            items = []
            for key in keys[b * self.batch_size : (b + 1) * self.batch_size]:
                items.append(self.dataset.item(key, self.images[key[0] if isinstance(key, tuple) else key]))
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], device=device)
