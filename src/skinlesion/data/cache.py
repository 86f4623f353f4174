"""Image cache: every image decoded once by the run's ``Preprocessing`` and stored as raw RGB bytes read by memory map.

On disk, one folder per data location and preprocessing (``.../s257-1a2b3c4d/``: the resize size and a hash of
every field that changes pixels, ``Preprocessing.cache_key``) holding

* ``pixels-<token>.u8`` - all images back to back, uint8 HWC, no header (opened with ``np.memmap``);
* ``index.npz`` - the pixels file's name and, per image: id, source path, source size and mtime
  (staleness), offset, height, width. It is written last, so a build that dies half way leaves the
  previous cache intact and usable.

Each image is stored as ``Preprocessing.stored`` returns it (decoded, colour-corrected, resized when larger than
the resize size) and read back through ``Preprocessing.finish``: a loader that reads the cache gets exactly the
pixels that decoding the file gives (``Preprocessing.pixels``), so cached and uncached runs, evaluate and predict
see the same input.

Where: ``cache_dir`` argument, else ``$SKINLESION_CACHE_DIR``, else the user cache folder (platformdirs:
``~/.cache/skinlesion/images`` on Linux), as Hugging Face datasets and torch hub do: never inside the
user's data folder unless asked. One sub-folder per data folder (its name + a hash of its path).
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import platformdirs
from filelock import FileLock
from tqdm.auto import tqdm

from skinlesion.data.images import DROP_HINT
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import SkinLesionError
from skinlesion.fileio import atomic_write, remove_stale_temps

ENV_VAR = "SKINLESION_CACHE_DIR"
_CHUNK = 256  # images decoded per batch while building: bounds memory


def stored_pixels(path: str | Path, preprocessing: Preprocessing) -> np.ndarray:
    """What the cache stores for one file (``Preprocessing.stored`` of its decoded image)."""
    try:
        return preprocessing.stored(preprocessing.open(path))
    except SkinLesionError as e:
        raise SkinLesionError(f"{e}; {DROP_HINT}") from e


_IMAGE_FOLDER = re.compile(r"images?|HAM10000_images_part_\d+|ISIC2018_Task3_\w+_Input", re.IGNORECASE)


def _data_location(table: pd.DataFrame) -> Path:
    """The data folder, from the image paths alone (table attrs do not survive merges): the common
    folder of the images, or its parent when that is a layout's image folder (images/, part_1 ...)."""
    folder = Path(os.path.commonpath(sorted({os.path.dirname(p) for p in table["path"]})))
    return folder.parent if _IMAGE_FOLDER.fullmatch(folder.name) else folder


def cache_location(table: pd.DataFrame, preprocessing: Preprocessing, cache_dir: str | Path | None = None) -> Path:
    """The folder holding the cache of ``table``'s images under ``preprocessing`` (see module doc for the order)."""
    data = _data_location(table).resolve()
    # fsencode: a path that is not valid UTF-8 (surrogate-escaped by Python) still hashes.
    key = f"{data.name or 'data'}-{hashlib.sha1(os.fsencode(data)).hexdigest()[:10]}"
    root = cache_dir or os.environ.get(ENV_VAR) or Path(platformdirs.user_cache_dir("skinlesion")) / "images"
    return Path(root).expanduser() / key / preprocessing.cache_key


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise SkinLesionError(f"{path}: cannot read ({e.strerror}); run `skinlesion prepare` to find bad files") from e
    return st.st_size, st.st_mtime_ns


class ImageCache:
    """Read side of the cache. Cheap to pickle (the memory map is opened lazily in each process)."""

    def __init__(self, folder: Path, index: dict[str, np.ndarray]):
        self.folder = Path(folder)
        self.index = index
        self._row = {str(i): n for n, i in enumerate(index["image_id"])}
        self._pixels: np.memmap | None = None
        self._pid = -1

    # -- building / opening ---------------------------------------------------------------
    @classmethod
    def open_or_build(
        cls,
        table: pd.DataFrame,
        preprocessing: Preprocessing,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> ImageCache:
        """Open the cache for ``table`` under ``preprocessing``; (re)build it when missing or stale.

        Stale = an image of the table is not in it, or its source file changed size or mtime.
        A rebuild keeps the still-fresh images already cached (copied, not decoded again), so
        opening it for a subset (train / val) never throws away the rest.
        """
        folder = cache_location(table, preprocessing, cache_dir)
        ids = table["image_id"].astype(str).tolist()
        paths = table["path"].astype(str).tolist()
        stats = [_stat(p) for p in paths]
        if folder.is_dir():  # pixels of a build killed half way (one that is still writing is kept: fileio)
            remove_stale_temps(folder)
        old = cls._load(folder)
        if old is not None and old._fresh(ids, paths, stats):
            return old
        try:
            # One builder at a time (DDP ranks on a node, two jobs on one machine): the others wait, then find the
            # fresh cache; a second build would delete the pixels file the first one's readers are opening.
            folder.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(folder.parent / f".{folder.name}.lock"):
                old = cls._load(folder)
                if old is not None and old._fresh(ids, paths, stats):
                    return old
                if folder.is_dir():  # pixels of a build killed half way (nobody else builds: we hold the lock)
                    remove_stale_temps(folder, nobody_writes=True)
                return cls._build(folder, ids, paths, stats, preprocessing, old, progress)
        except OSError as e:
            raise SkinLesionError(
                f"cannot write the image cache to {folder} ({e.strerror or e}); "
                "pass --cache-dir with a writable folder, or --no-cache"
            ) from e

    @classmethod
    def _load(cls, folder: Path) -> ImageCache | None:
        try:
            with np.load(folder / "index.npz", allow_pickle=False) as z:
                index = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):
            return None
        if "pixels" not in index or not (folder / str(index["pixels"])).is_file():
            return None
        return cls(folder, index)

    def _fresh_rows(self, ids: list[str], paths: list[str], stats: list[tuple[int, int]]) -> list[int | None]:
        rows = []
        for i, p, (size, mtime) in zip(ids, paths, stats, strict=True):
            n = self._row.get(i)
            ok = (
                n is not None
                and self.index["path"][n] == p
                and int(self.index["size"][n]) == size
                and int(self.index["mtime_ns"][n]) == mtime
            )
            rows.append(n if ok else None)
        return rows

    def _fresh(self, ids: list[str], paths: list[str], stats: list[tuple[int, int]]) -> bool:
        return all(n is not None for n in self._fresh_rows(ids, paths, stats))

    @classmethod
    def _build(
        cls,
        folder: Path,
        ids: list[str],
        paths: list[str],
        stats: list[tuple[int, int]],
        preprocessing: Preprocessing,
        old: ImageCache | None,
        progress: bool,
    ) -> ImageCache:
        entries = dict(zip(ids, zip(paths, stats, strict=True), strict=True))
        reuse: dict[str, int] = {}
        if old is not None:
            # Keep cached images that are still fresh, even if not in this table (another subset).
            old_ids = [str(i) for i in old.index["image_id"]]
            old_paths = [str(p) for p in old.index["path"]]
            for i, p in zip(old_ids, old_paths, strict=True):
                if i not in entries and os.path.isfile(p):
                    entries[i] = (p, _stat(p))
            order = list(entries)
            fresh = old._fresh_rows(order, [entries[i][0] for i in order], [entries[i][1] for i in order])
            reuse = {i: n for i, n in zip(order, fresh, strict=True) if n is not None}
        order = sorted(entries)
        heights = np.zeros(len(order), np.int32)
        widths = np.zeros(len(order), np.int32)
        offsets = np.zeros(len(order), np.int64)
        folder.mkdir(parents=True, exist_ok=True)

        seen = {"bytes": 0, "images": 0}  # decoded so far: a full disk's message estimates the whole file from it

        def needed() -> int:
            return seen["bytes"] * len(order) // max(1, seen["images"])

        def write_pixels(tmp: Path) -> None:
            pos = 0
            bar = tqdm(total=len(order), desc=f"caching images at {preprocessing.resize_size}px", unit="img",
                       disable=not progress)  # fmt: skip
            with open(tmp, "wb") as f, ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                for start in range(0, len(order), _CHUNK):
                    chunk = order[start : start + _CHUNK]
                    todo = [i for i in chunk if i not in reuse]
                    decoded = dict(
                        zip(todo, pool.map(lambda i: stored_pixels(entries[i][0], preprocessing), todo), strict=True)
                    )
                    seen["bytes"] += sum(decoded[i].size if i in decoded else old.nbytes_of(i) for i in chunk)
                    seen["images"] += len(chunk)
                    for n, i in enumerate(chunk, start):
                        arr = old.get(i) if i in reuse else decoded[i]
                        heights[n], widths[n] = arr.shape[:2]
                        offsets[n] = pos
                        f.write(np.ascontiguousarray(arr).tobytes())
                        pos += arr.size
                    bar.update(len(chunk))
            bar.close()

        pixels_name = f"pixels-{os.urandom(6).hex()}.u8"
        atomic_write(folder / pixels_name, write_pixels, needed)
        index = {
            "pixels": np.array(pixels_name),
            "image_id": np.array(order, dtype=str),
            "path": np.array([entries[i][0] for i in order], dtype=str),
            "size": np.array([entries[i][1][0] for i in order], np.int64),
            "mtime_ns": np.array([entries[i][1][1] for i in order], np.int64),
            "offset": offsets,
            "height": heights,
            "width": widths,
            "short_side": np.array(preprocessing.resize_size),
            "preprocessing_key": np.array(preprocessing.cache_key),
        }

        def write_index(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **index)

        atomic_write(folder / "index.npz", write_index)
        for stale in folder.glob("pixels-*.u8"):
            if stale.name != pixels_name:
                stale.unlink(missing_ok=True)  # readers that still map it keep their (unlinked) copy
        return cls(folder, index)

    # -- reading --------------------------------------------------------------------------
    def _memmap(self) -> np.memmap:
        if self._pixels is None or self._pid != os.getpid():
            self._pixels = np.memmap(self.folder / str(self.index["pixels"]), dtype=np.uint8, mode="r")
            self._pid = os.getpid()
        return self._pixels

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pixels"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row

    def shape(self, image_id: str) -> tuple[int, int]:
        """(height, width) of a cached image, without reading its pixels."""
        n = self._row[image_id]
        return int(self.index["height"][n]), int(self.index["width"][n])

    def nbytes_of(self, image_id: str) -> int:
        height, width = self.shape(image_id)
        return height * width * 3

    def get(self, image_id: str) -> np.ndarray:
        """The cached (H, W, 3) uint8 pixels (a writable copy: callers may transform in place)."""
        n = self._row.get(image_id)
        if n is None:
            raise KeyError(f"{image_id} is not in the image cache at {self.folder}")
        h, w, off = int(self.index["height"][n]), int(self.index["width"][n]), int(self.index["offset"][n])
        return np.array(self._memmap()[off : off + h * w * 3].reshape(h, w, 3))

    @property
    def nbytes(self) -> int:
        return int((self.index["height"].astype(np.int64) * self.index["width"] * 3).sum())
