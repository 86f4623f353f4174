"""Image cache: built once, exactly the preprocessing's pixels, rebuilt when stale, keyed by the preprocessing, never
written into read-only data."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skinlesion.data.cache import ImageCache, stored_pixels
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.ham10000 import load_table
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.synth import write_synthetic
from skinlesion.errors import SkinLesionError

SHORT = 40
PREP = Preprocessing(32, SHORT)


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
    cache = ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False)
    assert len(cache) == len(table) and cache.folder.is_relative_to(tmp_path / "c")
    for image_id, path in zip(table["image_id"][:5], table["path"][:5], strict=True):
        got = cache.get(image_id)
        assert got.dtype == np.uint8 and got.shape == (SHORT, int(SHORT * 80 / 60), 3)
        np.testing.assert_array_equal(got, stored_pixels(path, PREP))
    files = _pixels_files(cache.folder)
    again = ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False)
    assert _pixels_files(again.folder) == files  # opened, not rebuilt
    # A subset (e.g. the val part), even without the table's attrs (lost in merges), reuses the full cache.
    subset = table.iloc[:3].copy()
    subset.attrs = {}
    assert ImageCache.open_or_build(subset, PREP, cache_dir=tmp_path / "c", progress=False).folder == cache.folder
    assert _pixels_files(cache.folder) == files
    # Keyed by the preprocessing: another size or colour constancy is another cache; mean / std act later.
    other = ImageCache.open_or_build(table, Preprocessing(20, 24), cache_dir=tmp_path / "c", progress=False)
    assert other.folder != cache.folder and min(other.get(table["image_id"][0]).shape[:2]) == 24
    grey = PREP.replace(color_constancy="shades-of-gray")
    assert ImageCache.open_or_build(table, grey, cache_dir=tmp_path / "c", progress=False).folder != cache.folder
    same = PREP.replace(mean=(0.5, 0.5, 0.5))
    assert ImageCache.open_or_build(table, same, cache_dir=tmp_path / "c", progress=False).folder == cache.folder
    assert Preprocessing.for_training(224).resize_size == 257


def test_small_images_are_stored_as_decoded_and_finished_exactly(data, tmp_path):
    """Under the resize size the cache keeps the decoded image (never more bytes than the original) and the
    preprocessing upscales it when read: the same pixels as decoding the file."""
    table = load_table(data)
    big = Preprocessing(128, 200)
    cache = ImageCache.open_or_build(table, big, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(cache.get(table["image_id"][0]), np.asarray(Image.open(table["path"][0])))
    for image_id, path in zip(table["image_id"][:4], table["path"][:4], strict=True):
        finished = big.finish(cache.get(image_id))
        assert finished.shape[-2:] == (200, round(200 * 80 / 60) - 1) or min(finished.shape[-2:]) == 200
        assert torch.equal(finished, big.pixels(path))


def test_a_killed_build_leaves_no_temp_file(data, tmp_path):
    """The pixels of a build killed half way (kill -9: no cleanup ran) are removed by the next build."""
    table = load_table(data)
    cache = ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False)
    leftover = cache.folder / ".pixels-0123456789ab.u8.abcd1234.tmp"
    leftover.write_bytes(b"\0" * 1000)
    old = os.stat(leftover).st_mtime - 3600
    os.utime(leftover, (old, old))
    Image.new("RGB", (80, 60), (9, 9, 9)).save(table["path"][0])  # stale: the next open rebuilds
    ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False)
    assert not leftover.exists()


def test_rebuilt_when_a_source_file_changes(data, tmp_path):
    table = load_table(data)
    cache = ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False)
    image_id, path = table["image_id"][4], Path(table["path"][4])
    before = cache.get(image_id).copy()
    Image.new("RGB", (80, 60), (0, 200, 0)).save(path, quality=95)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    rebuilt = ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False)
    after = rebuilt.get(image_id)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, stored_pixels(path, PREP))
    assert len(_pixels_files(rebuilt.folder)) == 1  # the old pixels file is gone
    # The old object keeps reading its own (now unlinked) memory map without crashing.
    np.testing.assert_array_equal(cache.get(table["image_id"][0]), rebuilt.get(table["image_id"][0]))


def test_default_location_is_the_user_cache_never_the_data_folder(data, tmp_path, monkeypatch):
    monkeypatch.delenv("SKINLESION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    table = load_table(data)
    cache = ImageCache.open_or_build(table, PREP, progress=False)
    assert cache.folder.is_relative_to(tmp_path / "xdg" / "skinlesion" / "images")
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before  # nothing written next to the data
    assert cache.get(table["image_id"][0]).shape[0] == SHORT

    monkeypatch.setenv("SKINLESION_CACHE_DIR", str(tmp_path / "env"))
    assert ImageCache.open_or_build(table, PREP, progress=False).folder.is_relative_to(tmp_path / "env")
    chosen = ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "flag", progress=False)
    assert chosen.folder.is_relative_to(tmp_path / "flag")  # --cache-dir wins over the environment


def test_data_path_that_is_not_utf8(source, tmp_path):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))  # Latin-1 name: surrogate-escaped by Python
    try:
        data = Path(shutil.copytree(source, folder / "ham"))
    except (UnicodeEncodeError, OSError):
        pytest.skip("this filesystem refuses non-UTF-8 names")
    table = load_table(data)
    cache = ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(cache.get(table["image_id"][0]), stored_pixels(table["path"][0], PREP))
    assert ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False).folder == cache.folder


def test_unwritable_cache_dir_is_a_clear_error(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SkinLesionError, match="cannot write the image cache.*--cache-dir"):
        ImageCache.open_or_build(load_table(data), PREP, cache_dir=blocker, progress=False)


def test_usable_from_dataloader_workers(data, tmp_path):
    table = load_table(data)
    cache = ImageCache.open_or_build(table, PREP, cache_dir=tmp_path / "c", progress=False)
    cache.get(table["image_id"][0])  # the parent opened its memory map; workers must open their own
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._pixels is None
    np.testing.assert_array_equal(clone.get(table["image_id"][1]), cache.get(table["image_id"][1]))

    dataset = LesionDataset(table, PREP, PREP.eval_transform(), cache=cache)
    plain = LesionDataset(table, PREP, PREP.eval_transform())
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, num_workers=2)
    batches = torch.cat([x for x, _ in loader])
    assert batches.shape == (len(table), 3, 32, 32) and batches.dtype == torch.uint8
    expected = torch.stack([plain[i][0] for i in range(len(table))])
    assert torch.equal(batches, expected)  # one preprocessing: the cache holds exactly the decoded pixels


def _open_in_child(args) -> str:
    data_dir, cache_dir = args
    cache = ImageCache.open_or_build(load_table(data_dir), PREP, cache_dir=cache_dir, progress=False)
    return str(cache.index["pixels"])


def test_concurrent_openers_build_once(data, tmp_path):
    """DDP ranks on one node (or two jobs) opening a missing cache at once: one builds under the file lock, the
    others wait and open that build (without the lock each built its own, deleting the others' pixels files)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(3) as pool:
        names = pool.map(_open_in_child, [(str(data), str(tmp_path / "c"))] * 3)
    assert len(set(names)) == 1
    folder = ImageCache.open_or_build(load_table(data), PREP, cache_dir=tmp_path / "c", progress=False).folder
    assert _pixels_files(folder) == names[:1]
