"""Image cache: built once, exact pixels, rebuilt when stale, never written into read-only data."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skinlesion.data.cache import ImageCache, cache_short_side, decode_resized
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.ham10000 import load_table
from skinlesion.data.synth import write_synthetic
from skinlesion.data.transforms import eval_transform
from skinlesion.errors import SkinLesionError

SHORT = 40


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("cache") / "ham", n_per_class=2, size=(80, 60), seed=3)


@pytest.fixture()
def data(source, tmp_path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "ham"))


def _pixels_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("pixels-*.u8"))


def test_built_once_with_exact_resized_pixels(data, tmp_path):
    table = load_table(data)
    cache = ImageCache.open_or_build(table, SHORT, cache_dir=tmp_path / "c", progress=False)
    assert len(cache) == len(table) and cache.folder.is_relative_to(tmp_path / "c")
    for image_id, path in zip(table["image_id"][:5], table["path"][:5], strict=True):
        got = cache.get(image_id)
        assert got.dtype == np.uint8 and got.shape == (SHORT, int(SHORT * 80 / 60), 3)
        np.testing.assert_array_equal(got, decode_resized(path, SHORT))
    files = _pixels_files(cache.folder)
    again = ImageCache.open_or_build(table, SHORT, cache_dir=tmp_path / "c", progress=False)
    assert _pixels_files(again.folder) == files  # opened, not rebuilt
    # A subset (e.g. the val part), even without the table's attrs (lost in merges), reuses the full cache.
    subset = table.iloc[:3].copy()
    subset.attrs = {}
    assert ImageCache.open_or_build(subset, SHORT, cache_dir=tmp_path / "c", progress=False).folder == cache.folder
    assert _pixels_files(cache.folder) == files
    # Keyed by size: another short side is another cache.
    other = ImageCache.open_or_build(table, 24, cache_dir=tmp_path / "c", progress=False)
    assert other.folder != cache.folder and min(other.get(table["image_id"][0]).shape[:2]) == 24
    assert cache_short_side(224) == 257


def test_never_upscales(data, tmp_path):
    table = load_table(data)
    cache = ImageCache.open_or_build(table, 200, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(cache.get(table["image_id"][0]), np.asarray(Image.open(table["path"][0])))


def test_rebuilt_when_a_source_file_changes(data, tmp_path):
    table = load_table(data)
    cache = ImageCache.open_or_build(table, SHORT, cache_dir=tmp_path / "c", progress=False)
    image_id, path = table["image_id"][4], Path(table["path"][4])
    before = cache.get(image_id).copy()
    Image.new("RGB", (80, 60), (0, 200, 0)).save(path, quality=95)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    rebuilt = ImageCache.open_or_build(table, SHORT, cache_dir=tmp_path / "c", progress=False)
    after = rebuilt.get(image_id)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, decode_resized(path, SHORT))
    assert len(_pixels_files(rebuilt.folder)) == 1  # the old pixels file is gone
    # The old object keeps reading its own (now unlinked) memory map without crashing.
    np.testing.assert_array_equal(cache.get(table["image_id"][0]), rebuilt.get(table["image_id"][0]))


def test_default_location_is_the_user_cache_never_the_data_folder(data, tmp_path, monkeypatch):
    monkeypatch.delenv("SKINLESION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    table = load_table(data)
    cache = ImageCache.open_or_build(table, SHORT, progress=False)
    assert cache.folder.is_relative_to(tmp_path / "xdg" / "skinlesion" / "images")
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before  # nothing written next to the data
    assert cache.get(table["image_id"][0]).shape[0] == SHORT

    monkeypatch.setenv("SKINLESION_CACHE_DIR", str(tmp_path / "env"))
    assert ImageCache.open_or_build(table, SHORT, progress=False).folder.is_relative_to(tmp_path / "env")
    chosen = ImageCache.open_or_build(table, SHORT, cache_dir=tmp_path / "flag", progress=False)
    assert chosen.folder.is_relative_to(tmp_path / "flag")  # --cache-dir wins over the environment


def test_data_path_that_is_not_utf8(source, tmp_path):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))  # Latin-1 name: surrogate-escaped by Python
    try:
        data = Path(shutil.copytree(source, folder / "ham"))
    except (UnicodeEncodeError, OSError):
        pytest.skip("this filesystem refuses non-UTF-8 names")
    table = load_table(data)
    cache = ImageCache.open_or_build(table, SHORT, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(cache.get(table["image_id"][0]), decode_resized(table["path"][0], SHORT))
    assert ImageCache.open_or_build(table, SHORT, cache_dir=tmp_path / "c", progress=False).folder == cache.folder


def test_unwritable_cache_dir_is_a_clear_error(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SkinLesionError, match="cannot write the image cache.*--cache-dir"):
        ImageCache.open_or_build(load_table(data), SHORT, cache_dir=blocker, progress=False)


def test_usable_from_dataloader_workers(data, tmp_path):
    table = load_table(data)
    cache = ImageCache.open_or_build(table, SHORT, cache_dir=tmp_path / "c", progress=False)
    cache.get(table["image_id"][0])  # the parent opened its memory map; workers must open their own
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._pixels is None
    np.testing.assert_array_equal(clone.get(table["image_id"][1]), cache.get(table["image_id"][1]))

    dataset = LesionDataset(table, eval_transform(32, SHORT), cache=cache)
    plain = LesionDataset(table, eval_transform(32, SHORT))
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, num_workers=2)
    batches = torch.cat([x for x, _ in loader])
    assert batches.shape == (len(table), 3, 32, 32)
    expected = torch.stack([plain[i][0] for i in range(len(table))])
    # Cached pixels are PIL-resized, the originals torch-resized: close, not bit-identical.
    assert (batches - expected).abs().mean() < 0.05


def _open_in_child(args) -> str:
    data_dir, cache_dir = args
    cache = ImageCache.open_or_build(load_table(data_dir), SHORT, cache_dir=cache_dir, progress=False)
    return str(cache.index["pixels"])


def test_concurrent_openers_build_once(data, tmp_path):
    """DDP ranks on one node (or two jobs) opening a missing cache at once: one builds under the file lock, the
    others wait and open that build (without the lock each built its own, deleting the others' pixels files)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(3) as pool:
        names = pool.map(_open_in_child, [(str(data), str(tmp_path / "c"))] * 3)
    assert len(set(names)) == 1
    folder = ImageCache.open_or_build(load_table(data), SHORT, cache_dir=tmp_path / "c", progress=False).folder
    assert _pixels_files(folder) == names[:1]
