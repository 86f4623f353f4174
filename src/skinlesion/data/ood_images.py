"""Non-dermoscopy images available offline, to check what a classifier does with inputs it was not made for
(the out-of-distribution refusal's evaluation set).

Real photos and pictures: scikit-learn's two sample photos (``load_sample_images``) and every picture of a
reasonable size that installed packages bundle (matplotlib's sample data, plot baselines, ...; this package's own
sample folder, which holds dermoscopy images, is skipped). Generated ones: blank frames, noise, gradients, a
checkerboard, and text "screenshots" rendered with PIL. Deterministic for a seed; duplicates (same pixels) once.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff")
SKIP_PACKAGES = ("skinlesion",)  # dermoscopy images: in distribution
TEXTS = (
    "Patient summary\nReferral letter to dermatology\nDate: 2024-03-01\nPlease review the attached image.",
    "def train(model, loader):\n    for x, y in loader:\n        loss = criterion(model(x), y)\n"
    "        loss.backward()",
    "ERROR 404\nThe page you are looking for\ncould not be found.",
    "Invoice #1042\nItem            Qty   Price\nConsultation      1   80.00\nTotal                 80.00",
)


def sklearn_photos() -> list[tuple[str, Image.Image]]:
    """scikit-learn's bundled sample photos (china.jpg, flower.jpg)."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [(f"sklearn:{Path(name).name}", Image.fromarray(np.asarray(image)).convert("RGB"))
            for name, image in zip(bunch.filenames, bunch.images, strict=True)]  # fmt: skip


def package_pictures(roots: Sequence[str | Path] | None = None, min_side: int = 64,
                     limit: int = 40) -> list[tuple[str, Image.Image]]:  # fmt: skip
    """Pictures bundled with installed packages (under ``roots``, default the environment's site-packages), at
    least ``min_side`` pixels on each side, sorted by path, at most ``limit``."""
    roots = roots if roots is not None else sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found: list[tuple[str, Image.Image]] = []
    for name, path in sorted(_picture_files(roots)):
        if len(found) >= limit:
            break
        image = _open(path, min_side)
        if image is not None:
            found.append((name, image))
    return found


def _picture_files(roots: Sequence[str | Path]) -> set[tuple[str, Path]]:
    """(path under its root, e.g. matplotlib/mpl-data/sample_data/grace_hopper.jpg, path) of every picture file."""
    files: set[tuple[str, Path]] = set()
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP_PACKAGES and not d.startswith(".")]
            for n in names:
                if n.lower().endswith(PICTURE_SUFFIXES):
                    path = Path(folder) / n
                    files.add((path.relative_to(root).as_posix(), path))
    return files


def _open(path: Path, min_side: int) -> Image.Image | None:
    """The picture as RGB, or None when it is too small or not a readable image."""
    try:
        with Image.open(path) as image:
            if min(image.size) < min_side or image.width * image.height > 4096 * 4096:
                return None
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def generated_images(size: tuple[int, int] = (600, 450), seed: int = 0) -> list[tuple[str, Image.Image]]:
    """Blank frames, noise, gradients, a checkerboard and text screenshots of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = [(f"generated:blank_{name}", Image.new("RGB", size, color))
           for name, color in (("white", (255, 255, 255)), ("black", (0, 0, 0)), ("grey", (128, 128, 128)),
                               ("skin_tone", (224, 172, 150)))]  # fmt: skip
    arrays = {
        "noise_uniform": rng.integers(0, 256, (h, w, 3)),
        "noise_gaussian": np.clip(rng.normal(128, 40, (h, w, 3)), 0, 255),
        "gradient": np.broadcast_to(np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.6, 0.2]), (h, w, 3)),
        "checkerboard": ((np.indices((h, w)) // 40).sum(0) % 2 * 255)[:, :, None].repeat(3, 2),
    }
    out += [(f"generated:{name}", Image.fromarray(np.asarray(a, dtype=np.uint8))) for name, a in arrays.items()]
    font = ImageFont.load_default(size=max(12, h // 18))
    for i, text in enumerate(TEXTS):
        image = Image.new("RGB", size, (250, 250, 250) if i % 2 == 0 else (30, 30, 36))
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, w, h // 12], fill=(60, 110, 200))  # a title bar, as in a window or a web page
        draw.multiline_text((w // 20, h // 8), text, font=font, fill=(20, 20, 20) if i % 2 == 0 else (220, 220, 220),
                            spacing=h // 40)  # fmt: skip
        out.append((f"generated:text_{i}", image))
    return out


def offline_ood_images(size: tuple[int, int] = (600, 450), seed: int = 0, roots: Sequence[str | Path] | None = None,
                       limit: int = 40) -> list[tuple[str, Image.Image]]:  # fmt: skip
    """(name, RGB image) of every source above, each distinct picture once (the first name it had)."""
    seen: set[str] = set()
    images = []
    for name, image in [*sklearn_photos(), *package_pictures(roots, limit=limit), *generated_images(size, seed)]:
        digest = hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            images.append((name, image))
    return images
