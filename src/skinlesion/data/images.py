"""Opening one image the same way everywhere: EXIF orientation honoured, any mode to RGB, and the one set of image
rules (JPEG or PNG by content, not by name; a short side of at least MIN_IMAGE_SIDE; at most MAX_ASPECT times as
long as wide; at most MAX_IMAGE_PIXELS), so prepare, train, evaluate, predict, gradcam, the Python API and serve
accept and refuse the same files."""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from skinlesion.errors import SkinLesionError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# The one decompression limit (prepare, train, evaluate, predict and serve): dermatoscopes write at most a few
# tens of megapixels (ISIC 2018: <= 6,688 x 4,439 = 30 MP); anything larger is refused from the header, before
# any pixel is decoded. `serve --max-megapixels` may only lower it for uploads.
MAX_IMAGE_PIXELS = 50_000_000
MAX_ASPECT = 10.0  # long side / short side: dermoscopic photos are about 4:3; a thin strip is not a lesion
MIN_IMAGE_SIDE = 16  # short side: below it no lesion detail is left (a 1x1 image was "classified" as mel)
IMAGE_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: the multi-picture JPEG some cameras write
DROP_HINT = "pass --allow-missing to drop such files (`skinlesion prepare --allow-missing` lists them)"


class ImageTooLargeError(SkinLesionError):
    """Over the pixel limit (decompression-bomb guard) or too thin a strip; the web app answers 413."""


class ImageTooSmallError(SkinLesionError):
    """Under the minimum short side; the web app answers 422 (an image, but not one a model can read)."""


def check_size(
    width: int, height: int, name: str, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect: float | None = MAX_ASPECT
) -> None:
    """The size rules, from the header alone: too many pixels, too thin a strip, too small a short side."""
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}; "
                                 "downsize the image first")  # fmt: skip
    if max_aspect is not None and max(width, height) > max_aspect * max(1, min(width, height)):
        raise ImageTooLargeError(f"{name}: {width}x{height} pixels is longer than {max_aspect:g} times its short "
                                 "side; crop the image to the lesion")  # fmt: skip
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageTooSmallError(f"{name}: {width}x{height} pixels is under the minimum of {MIN_IMAGE_SIDE} pixels "
                                 "on the short side; use the original, full-size image")  # fmt: skip


# Image modes PIL's reduce() averages correctly (not palette indices, not 1-bit, not 16-bit).
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "I", "F", "CMYK"}


def shrink(im: Image.Image, min_short_side: int | None) -> Image.Image:
    """Box-average by the largest whole factor that keeps the short side at least twice ``min_short_side``."""
    if not min_short_side or im.mode not in _REDUCIBLE:
        return im
    factor = min(im.size) // (2 * min_short_side)
    return im.reduce(factor) if factor >= 2 else im


def open_rgb(
    source: str | Path | bytes,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_aspect: float | None = MAX_ASPECT,
    min_short_side: int | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) to an RGB PIL image with EXIF rotation applied.

    Raises SkinLesionError for anything that is not a readable JPEG or PNG (told by its content: a GIF named
    .jpg is refused), and from the header alone, before decoding (``check_size``): ImageTooLargeError for images
    above ``max_pixels`` (decompression-bomb guard) or longer than ``max_aspect`` times their short side (a thin
    strip that resizing to the model's short side would blow up: 1x100000 px becomes 147x14,700,000),
    ImageTooSmallError for a short side under MIN_IMAGE_SIDE.

    ``min_short_side`` (the model's resize size): a JPEG whose short side is more than twice it is decoded at the
    smallest JPEG DCT scale (1/2, 1/4, 1/8) that still keeps twice it (PIL ``draft``), the way browsers show
    camera photos, and any other image is box-averaged down to that (``shrink``) right after decoding: the server's
    memory rise for a 48-megapixel upload falls from ~630 MiB to ~20 MiB (JPEG) / ~185 MiB (PNG)
    (benchmarks/bench_serve_soak.py), and the resize to the model's size that follows averages over at least two
    source pixels per output pixel either way.
    The image cache passes it, and ``Classifier.decode`` for predict, serve, the Python API, gradcam and the report
    gallery; the ``--no-cache`` data loader decodes at full size.
    """
    name = "uploaded bytes" if isinstance(source, bytes) else str(source)
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(fp) as im:
            if im.format not in IMAGE_FORMATS:
                raise SkinLesionError(f"{name}: a {im.format} image, not a JPEG or PNG (whatever its name says); "
                                      "convert it to JPEG or PNG")  # fmt: skip
            check_size(im.width, im.height, name, max_pixels, max_aspect)
            if min_short_side and im.format == "JPEG" and min(im.size) > 2 * min_short_side:
                scale = min(im.size) / (2 * min_short_side)
                im.draft("RGB", (math.ceil(im.width / scale), math.ceil(im.height / scale)))
            im.load()
            im = shrink(im, min_short_side)  # a PNG / TIFF of tens of megapixels: box-average while still small
            ImageOps.exif_transpose(im, in_place=True)  # not a copy of the whole image when there is nothing to do
            if im.mode != "RGB":
                # RGBA / LA: composite on white so transparent borders do not turn black.
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                    bg = Image.new("RGB", im.size, (255, 255, 255))
                    bg.paste(im, mask=im.getchannel("A"))
                    im = bg
                elif im.mode == "I" or im.mode.startswith("I;16"):
                    # 16-bit grayscale PNG: a plain convert clips everything above 255 to white.
                    im = im.convert("I").point(lambda v: v * (1 / 256)).convert("RGB")
                else:
                    im = im.convert("RGB")
            return shrink(im, min_short_side)  # palette / 1-bit / 16-bit images: once in RGB
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: refused as a decompression bomb ({e})") from e
    except FileNotFoundError as e:
        raise SkinLesionError(f"{name}: file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SkinLesionError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
