"""The one owner of image preprocessing: how a file becomes the tensor a network sees.

    file / upload / PIL image
      -- decode      open_rgb: JPEG / PNG by content, EXIF rotation, RGB, the size rules; a JPEG larger than twice the
                     resize size is decoded at a reduced DCT scale and any other large image box-averaged
      -- colour      optional colour constancy (Shades of Gray), on the decoded image
      -- resize      short side to ``resize_size`` (torchvision's uint8 bilinear resize with antialias)
      == pixels      (3, H, W) uint8: what the image cache holds and every loader starts from
      -- crop        centre crop ``img_size`` (evaluation, inference); training presets crop at random instead
      -- normalize   (x / 255 - mean) / std on a uint8 batch, on its device (``BatchNormalizer``)

A ``Preprocessing`` is built once from a run's config, stored in best.pt (``preprocessing``) and in model.onnx's
metadata, and rebuilt from them, so the cache build, the training and evaluation loaders (cached or not),
predict, serve, the Python API, Grad-CAM, the report gallery and the ONNX check all produce the same pixels.
The cache key is a hash of the fields that change pixels (decode, colour constancy, resize), so a cache built
under another description is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from skinlesion.data import colour
from skinlesion.data.images import MAX_ASPECT, MAX_IMAGE_PIXELS, check_size, open_rgb
from skinlesion.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchNormalizer, resize_for, train_augmentation
from skinlesion.errors import SkinLesionError

# Bumped when the pixel pipeline changes in a way the fields below do not show: caches made before are rebuilt.
PIXEL_VERSION = 2
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}
# Fields that change the pixels (the cache key); mean / std / img_size act after the cache.
PIXEL_FIELDS = ("resize_size", "interpolation", "antialias", "color_constancy", "decode")
Source = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class Preprocessing:
    img_size: int
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    antialias: bool = True
    color_constancy: str = "none"  # or "shades-of-gray" (Minkowski p = 6), applied before resizing
    decode: str = "reduced"  # JPEG DCT draft / box-average down to twice the resize size (data/images.open_rgb)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.interpolation not in INTERPOLATIONS:
            raise SkinLesionError(f"unknown interpolation {self.interpolation!r}; choose {', '.join(INTERPOLATIONS)}")
        if self.color_constancy not in colour.METHODS:
            raise SkinLesionError(f"unknown colour constancy {self.color_constancy!r}; choose "
                                  f"{', '.join(colour.METHODS)}")  # fmt: skip
        if self.decode not in ("reduced", "full"):
            raise SkinLesionError(f"unknown decode policy {self.decode!r}; choose reduced or full")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SkinLesionError("mean and std need three values each, std above 0")

    # ----------------------------------------------------------------------------------------- describe
    @classmethod
    def for_training(
        cls,
        img_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        color_constancy: str = "none",
    ) -> Preprocessing:
        """A new run's description: resize in the reference ratio 257/224, the backbone's mean / std."""
        return cls(img_size, resize_for(img_size), tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD),
                   color_constancy=color_constancy or "none")  # fmt: skip

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Preprocessing:
        """From best.pt's entries or model.onnx's metadata: their ``preprocessing``, else (files written before it
        existed) their img_size / resize_size / mean / std."""
        stored = meta.get("preprocessing")
        if isinstance(stored, str):
            stored = json.loads(stored)
        if stored:
            fields = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in stored.items() if k in fields})
        return cls(int(meta["img_size"]), int(meta["resize_size"]), tuple(meta["mean"]), tuple(meta["std"]))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def replace(self, **changes: Any) -> Preprocessing:
        return dataclasses.replace(self, **changes)

    @property
    def cache_key(self) -> str:
        """The cache folder's name: the resize size and a hash of everything else that changes the pixels."""
        fields = {k: getattr(self, k) for k in PIXEL_FIELDS} | {"version": PIXEL_VERSION}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        return f"s{self.resize_size}-{digest}"

    def describe(self) -> str:
        cc = "" if self.color_constancy == "none" else f", {self.color_constancy} colour constancy"
        return (f"decode ({self.decode}){cc}, resize short side to {self.resize_size} ({self.interpolation}"
                f"{', antialias' if self.antialias else ''}), centre crop {self.img_size}, normalise with mean "
                f"{[round(v, 4) for v in self.mean]} std {[round(v, 4) for v in self.std]}")  # fmt: skip

    # ------------------------------------------------------------------------------------ decode -> pixels
    def open(self, source: Source, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect: float | None = MAX_ASPECT
             ) -> Image.Image:  # fmt: skip
        """A file, upload or PIL image decoded by the one policy (PIL images are taken as decoded, under the same
        size rules: data/images.check_size)."""
        if isinstance(source, Image.Image):
            check_size(source.width, source.height, "image", max_pixels, max_aspect)
            return source if source.mode == "RGB" else source.convert("RGB")
        reduce_to = self.resize_size if self.decode == "reduced" else None
        return open_rgb(source, max_pixels=max_pixels, max_aspect=max_aspect, min_short_side=reduce_to)

    def stored(self, image: Image.Image) -> np.ndarray:
        """What the image cache holds for a decoded image, (H, W, 3) uint8: colour-corrected and, when larger,
        already resized (``finish`` then leaves it as it is); a smaller image is kept as decoded and ``finish``
        upscales it at read time, so the cache never holds more bytes than the originals."""
        chw = self._colour(as_chw(image))
        if min(chw.shape[-2:]) > self.resize_size:
            chw = self._resize(chw)
        return chw.permute(1, 2, 0).contiguous().numpy()

    def finish(self, stored: np.ndarray | torch.Tensor) -> tv_tensors.Image:
        """``pixels`` from what ``stored`` returned: the resize if it is still to do (a no-op otherwise)."""
        return tv_tensors.Image(self._resize(as_chw(stored)))

    def pixels(self, source: Source, **limits: Any) -> tv_tensors.Image:
        """(3, H, W) uint8 with the short side at ``resize_size``: decode, colour, resize. Equal, bit for bit, to
        ``finish(stored(open(source)))``, the cached path."""
        return self.finish(self.stored(self.open(source, **limits)))

    # ----------------------------------------------------------------------------------- pixels -> input
    def crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """The centre crop the network sees at evaluation (uint8, 3 x img_size x img_size)."""
        return TF.center_crop(pixels, [self.img_size, self.img_size])

    def model_view(self, source: Source, **limits: Any) -> np.ndarray:
        """(img_size, img_size, 3) uint8: what the network sees of an image (Grad-CAM overlays, the web page)."""
        return self.crop(self.pixels(source, **limits)).permute(1, 2, 0).numpy()

    def batch(self, sources: Sequence[Source], **limits: Any) -> torch.Tensor:
        """A uint8 batch (N, 3, img_size, img_size) of centre crops; ``normalizer`` finishes it on the device."""
        return torch.stack([self.crop(self.pixels(s, **limits)).as_subclass(torch.Tensor) for s in sources])

    def normalizer(
        self, device: torch.device | str = "cpu", memory_format: torch.memory_format = torch.contiguous_format
    ) -> BatchNormalizer:
        """uint8 batch -> (x / 255 - mean) / std float on ``device``: the one normalisation (training and inference)."""
        return BatchNormalizer(self.mean, self.std, device, memory_format)

    def eval_transform(self) -> v2.Compose:
        """Per-item transform of the evaluation loaders: pixels -> uint8 centre crop."""
        return v2.Compose([v2.CenterCrop(self.img_size), v2.ToPureTensor()])

    def train_transform(self, augment: str) -> v2.Compose:
        """Per-item transform of the training loader: pixels -> a random uint8 crop of ``augment``'s preset."""
        return train_augmentation(self.img_size, augment)

    # ----------------------------------------------------------------------------------------- internals
    def _colour(self, chw: torch.Tensor) -> torch.Tensor:
        return colour.apply(chw, self.color_constancy)

    def _resize(self, chw: torch.Tensor) -> torch.Tensor:
        return TF.resize(chw, [self.resize_size], INTERPOLATIONS[self.interpolation], antialias=self.antialias)


def as_chw(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 from a PIL image, an (H, W, 3) array or a (3, H, W) tensor, always laid out the same way
    (a channels-last view of HWC memory), so torch's resize takes the same kernel whatever the caller held."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
        return image.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) pixels, got {array.shape}")
    if not array.flags.writeable or not array.flags.c_contiguous:  # PIL's buffer is read-only: torch wants its own
        array = np.array(array, order="C")
    return torch.from_numpy(array).permute(2, 0, 1)
