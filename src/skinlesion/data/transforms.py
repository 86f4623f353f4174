"""Train / eval presets (torchvision transforms v2). Inputs: PIL images or uint8 CHW tensors.

With ``normalize=False`` a preset stops at uint8 (every geometric and colour step already runs on uint8
pixels), and ``BatchNormalizer`` does the float conversion and Normalize on the device, one batch at a
time: a quarter of the bytes through worker IPC, pinning and the host-to-device copy, and no per-image
float work in the loader workers. Both ways give the same tensor (to float rounding).
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


def train_transform(
    img_size: int,
    resize_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    augment: str = "reference",
    normalize: bool = True,
) -> v2.Compose:
    """``reference``: resize, random crop, h+v flips. ``dermoscopy``: adds 360-degree rotation,
    a wider random-resized-crop and mild colour jitter (lesions have no canonical orientation)."""
    if augment == "reference":
        geometric = [v2.Resize(resize_size, antialias=True), v2.RandomCrop(img_size)]
        photometric: list = []
    elif augment == "dermoscopy":
        geometric = [
            v2.Resize(resize_size, antialias=True),
            v2.RandomRotation(180),
            v2.RandomResizedCrop(img_size, scale=(0.35, 1.0), ratio=(0.8, 1.25), antialias=True),
        ]
        photometric = [v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02)]
    else:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
    return v2.Compose(
        [
            v2.ToImage(),
            *geometric,
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            *photometric,
            *to_float(mean, std, normalize),
        ]
    )


def eval_transform(
    img_size: int,
    resize_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    normalize: bool = True,
) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(img_size),
            *to_float(mean, std, normalize),
        ]
    )


def to_float(mean: tuple[float, ...], std: tuple[float, ...], normalize: bool) -> list:
    """The presets' last steps: uint8 -> float in [0, 1] -> Normalize; none where the device does them."""
    if not normalize:
        return [v2.ToPureTensor()]
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


class BatchNormalizer:
    """What ``to_float`` does per image, for a whole uint8 batch on its device (N, C, H, W): float in [0, 1],
    then (x - mean) / std; float batches are only moved. ``memory_format`` is applied on the way."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        # Normalize computes (x - mean) / std; folding 1/255 in here keeps it to one multiply-add per pixel.
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) / std_t
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.device, non_blocking=True, memory_format=self.memory_format)
        if x.dtype != torch.uint8:
            return x
        return torch.addcmul(self.shift, x.float(), self.scale)
