"""Training augmentation presets (torchvision transforms v2) and the batch normaliser.

Presets start from a ``Preprocessing``'s pixels (uint8, short side at the resize size: data/preprocessing.py) and
stop at a uint8 crop; ``BatchNormalizer`` does the float conversion and normalisation on the device, one batch at
a time: a quarter of the bytes through worker IPC, pinning and the host-to-device copy, and the same arithmetic
for training, validation, evaluation and inference.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("reference", "dermoscopy")


def resize_for(img_size: int) -> int:
    """Short side before cropping, in the reference ratio 257/224 (224 -> 257, 128 -> 147)."""
    return int(round(img_size * 257 / 224))


def train_augmentation(img_size: int, augment: str = "reference") -> v2.Compose:
    """``reference``: random crop, h+v flips. ``dermoscopy``: 360-degree rotation, a wider random-resized-crop
    and mild colour jitter as well (lesions have no canonical orientation). uint8 in, uint8 out."""
    if augment == "reference":
        geometric: list = [v2.RandomCrop(img_size)]
        photometric: list = []
    elif augment == "dermoscopy":
        geometric = [
            v2.RandomRotation(180),
            v2.RandomResizedCrop(img_size, scale=(0.35, 1.0), ratio=(0.8, 1.25), antialias=True),
        ]
        photometric = [v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02)]
    else:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
    return v2.Compose([*geometric, v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), *photometric,
                       v2.ToPureTensor()])  # fmt: skip


class BatchNormalizer:
    """A uint8 batch (N, C, H, W) to float on its device: (x / 255 - mean) / std as one multiply-add; float batches
    are only moved. ``memory_format`` is applied on the way."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) / std_t
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.device, non_blocking=True, memory_format=self.memory_format)
        if x.dtype != torch.uint8:
            return x
        return torch.addcmul(self.shift, x.float(), self.scale)
