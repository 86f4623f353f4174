"""Train / eval presets (torchvision transforms v2). Inputs: PIL images or uint8 CHW tensors."""

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
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_transform(
    img_size: int,
    resize_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
