"""Synthetic HAM10000-layout data that a small network learns in a few epochs (tests, demos, smoke runs).

Each class is a blob with its own colour and shape/texture on a noisy skin-tone background, at a
random position, scale and rotation, so a model has to find the lesion rather than read fixed pixels:

akiec red-pink rough patch with white scale · bcc pearly pink oval with red vessels · bkl tan
square-ish plaque with stripes · df brown ring with a pale centre · mel dark irregular star with
blue-grey · nv round uniform brown · vasc cluster of red-purple lobules.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skinlesion.classes import CLASSES
from skinlesion.errors import SkinLesionError
from skinlesion.fileio import write_bytes, write_csv

# HAM10000 class shares, for --imbalance.
HAM_COUNTS = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
COLOURS = {
    "akiec": (205, 95, 85),
    "bcc": (222, 170, 175),
    "bkl": (185, 140, 95),
    "df": (135, 85, 55),
    "mel": (55, 35, 35),
    "nv": (140, 90, 55),
    "vasc": (160, 25, 70),
}
MEAN_AGE = {"akiec": 67, "bcc": 66, "bkl": 64, "df": 52, "mel": 61, "nv": 47, "vasc": 52}
SITES = (
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "foot",
    "neck",
    "scalp",
    "hand",
    "ear",
    "unknown",
)
SITE_P = (0.22, 0.21, 0.14, 0.11, 0.10, 0.07, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01, 0.02)
DX_TYPES = {"nv": (("follow_up", 0.55), ("histo", 0.35), ("consensus", 0.10))}
DEFAULT_DX_TYPES = (("histo", 0.85), ("consensus", 0.10), ("confocal", 0.05))


@dataclass(frozen=True)
class _Lesion:
    dx: str
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float
    harmonics: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase) of the outline
    colour: tuple[float, float, float]
    skin: tuple[float, float, float]
    seed: int  # texture details (vessels, lobules, scale) of this lesion


def _new_lesion(
    dx: str, size: tuple[int, int], rng: np.random.Generator, center: tuple[float, float] | None
) -> _Lesion:
    if dx not in CLASSES:
        raise SkinLesionError(f"unknown class {dx!r}; choose from {', '.join(CLASSES)}")
    w, h = size
    radius = rng.uniform(0.2, 0.32) * min(w, h)
    if center is None:
        margin = radius * 1.1
        center = (rng.uniform(margin, w - margin), rng.uniform(margin, h - margin))
    irregular = {"mel": 0.22, "akiec": 0.12}.get(dx, 0.04)
    harmonics = tuple(
        (int(k), float(rng.uniform(0.3, 1.0) * irregular), float(rng.uniform(0, 2 * np.pi)))
        for k in rng.choice(np.arange(2, 8), size=3, replace=False)
    )
    skin = np.array([228, 188, 165]) * rng.uniform(0.8, 1.05)
    colour = np.clip(np.array(COLOURS[dx]) + rng.normal(0, 8, 3), 0, 255)
    return _Lesion(
        dx,
        float(center[0]),
        float(center[1]),
        float(radius),
        float(rng.uniform(0, np.pi)),
        float(rng.uniform(0.75, 1.0)),
        harmonics,
        tuple(colour),
        tuple(skin),
        int(rng.integers(2**31)),
    )


def _again(lesion: _Lesion, size: tuple[int, int], rng: np.random.Generator) -> _Lesion:
    """Another picture of the same lesion: slightly moved, turned and zoomed."""
    w, h = size
    r = lesion.radius * rng.uniform(0.9, 1.1)
    return replace(
        lesion,
        radius=r,
        angle=lesion.angle + rng.uniform(-0.4, 0.4),
        cx=float(np.clip(lesion.cx + rng.normal(0, 0.04 * w), r, w - r)),
        cy=float(np.clip(lesion.cy + rng.normal(0, 0.04 * h), r, h - r)),
    )


def _render(lesion: _Lesion, size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx_, dy_ = x - lesion.cx, y - lesion.cy
    c, s = np.cos(lesion.angle), np.sin(lesion.angle)
    u, v = c * dx_ + s * dy_, (-s * dx_ + c * dy_) / lesion.aspect
    dist, theta = np.hypot(u, v), np.arctan2(v, u)
    outline = np.ones_like(theta)
    for k, amp, phase in lesion.harmonics:
        outline += amp * np.cos(k * theta + phase)
    if lesion.dx == "bkl":  # square-ish plaque
        outline /= (np.abs(np.cos(theta)) ** 4 + np.abs(np.sin(theta)) ** 4) ** 0.25
    if lesion.dx == "mel":  # star-like spikes
        outline *= 1 + 0.18 * np.cos(9 * theta + lesion.angle)
    edge = lesion.radius * outline - dist
    tex = np.random.default_rng(lesion.seed)
    colour = np.broadcast_to(np.array(lesion.colour, np.float32), (h, w, 3)).copy()
    rel = dist / lesion.radius

    if lesion.dx == "vasc":  # a few round lobules instead of one outline
        edge = np.full_like(dist, -np.inf)
        for _ in range(tex.integers(3, 6)):
            a, r0 = tex.uniform(0, 2 * np.pi), tex.uniform(0, 0.55) * lesion.radius
            ox, oy = lesion.cx + r0 * np.cos(a), lesion.cy + r0 * np.sin(a)
            edge = np.maximum(edge, lesion.radius * tex.uniform(0.35, 0.55) - np.hypot(x - ox, y - oy))
        colour *= (0.8 + 0.2 * np.cos(dist * 0.6))[..., None]
    elif lesion.dx == "df":  # pale centre
        colour[rel < 0.5] = (230, 205, 185)
    elif lesion.dx == "nv":  # slightly darker centre
        colour *= (0.85 + 0.15 * np.clip(rel, 0, 1))[..., None]
    elif lesion.dx == "mel":  # blue-grey veil and black dots
        veil = np.cos(u * 0.35 + tex.uniform(0, 6)) * np.cos(v * 0.3) > 0.3
        colour[veil] = (95, 105, 135)
        colour[tex.random((h, w)) < 0.05] = (15, 10, 10)
    elif lesion.dx == "bkl":  # waxy ridges
        colour *= (0.82 + 0.18 * (np.sin(u * 0.9) > 0))[..., None]
    elif lesion.dx == "bcc":  # thin red vessels
        for _ in range(tex.integers(2, 4)):
            a, off = tex.uniform(0, np.pi), tex.uniform(-0.5, 0.5) * lesion.radius
            line = np.abs(np.cos(a) * dx_ + np.sin(a) * dy_ - off) < 0.9
            colour[line] = (190, 30, 40)
    elif lesion.dx == "akiec":  # white scale
        colour[tex.random((h, w)) < 0.12] = (245, 240, 235)

    alpha = np.clip(edge / 1.5 + 0.5, 0, 1)[..., None]
    skin = np.array(lesion.skin, np.float32)
    # Dermoscopy-like background: skin tone, soft vignette, sensor noise.
    vignette = 1 - 0.25 * np.clip(np.hypot((x - w / 2) / w, (y - h / 2) / h) * 2 - 0.6, 0, 1)
    pixels = (skin * vignette[..., None]) * (1 - alpha) + colour * alpha
    pixels = pixels * rng.uniform(0.9, 1.1) + rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image, alpha[..., 0] >= 0.5


def draw_lesion(
    dx: str, size: tuple[int, int], rng: np.random.Generator, center: tuple[float, float] | None = None
) -> tuple[Image.Image, np.ndarray]:
    """One synthetic image of class ``dx`` at ``size`` (W, H) and its lesion mask (H, W) bool."""
    return _render(_new_lesion(dx, size, rng, center), size, rng)


def _counts(n_per_class: int, imbalance: bool) -> dict[str, int]:
    if not imbalance:
        return dict.fromkeys(CLASSES, n_per_class)
    total = n_per_class * len(CLASSES)
    n_all = sum(HAM_COUNTS.values())
    return {c: max(4, round(HAM_COUNTS[c] / n_all * total)) for c in CLASSES}


def _pick(rng: np.random.Generator, options: tuple[tuple[str, float], ...]) -> str:
    names, p = zip(*options, strict=True)
    return str(rng.choice(names, p=np.array(p) / sum(p)))


def write_synthetic(
    out: str | Path, n_per_class: int = 40, size: tuple[int, int] = (96, 72), imbalance: bool = False, seed: int = 0
) -> Path:
    """Write ``out/HAM10000_metadata.csv`` + ``out/images/ISIC_9xxxxxx.jpg`` (1-3 images per lesion)."""
    if n_per_class < 1:
        raise SkinLesionError(f"--n-per-class must be at least 1, got {n_per_class}")
    if min(size) < 16:
        raise SkinLesionError(f"--size must be at least 16x16, got {size[0]}x{size[1]}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows = []
    image_no, lesion_no = 9000000, 9000000
    for dx, n in _counts(n_per_class, imbalance).items():
        left = n
        while left > 0:
            k = min(left, int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])))
            lesion = _new_lesion(dx, size, rng, None)
            age = float(np.clip(round(rng.normal(MEAN_AGE[dx], 14) / 5) * 5, 5, 85))
            meta = {
                "lesion_id": f"HAM_{lesion_no:07d}",
                "dx": dx,
                "dx_type": _pick(rng, DX_TYPES.get(dx, DEFAULT_DX_TYPES)),
                "age": "" if rng.random() < 0.01 else age,
                "sex": _pick(rng, (("male", 0.54), ("female", 0.45), ("unknown", 0.01))),
                "localization": str(rng.choice(SITES, p=np.array(SITE_P) / sum(SITE_P))),
            }
            for j in range(k):
                image, _ = _render(lesion if j == 0 else _again(lesion, size, rng), size, rng)
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=92)
                image_id = f"ISIC_{image_no:07d}"
                write_bytes(out / "images" / f"{image_id}.jpg", buf.getvalue())
                rows.append({**meta, "image_id": image_id})
                image_no += 1
            lesion_no += 1
            left -= k
    columns = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    write_csv(out / "HAM10000_metadata.csv", pd.DataFrame(rows)[columns])
    return out


def parse_size(text: str) -> tuple[int, int]:
    """'96x72' -> (96, 72)."""
    try:
        w, h = (int(t) for t in text.lower().split("x"))
    except ValueError:
        raise SkinLesionError(f"--size must look like WIDTHxHEIGHT (e.g. 96x72), got {text!r}") from None
    return w, h
