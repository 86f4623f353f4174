"""One owner of preprocessing: on real images (the bundled 200x150 sample, the 600x450 originals in ../shared/data,
PNG copies) at 64, 128 and 224 px, evaluate from the cache, evaluate --no-cache, predict, the Python API and
ONNX Runtime see the same pixels: the same probabilities (1e-5; ONNX 1e-4) and not one decision apart."""

from __future__ import annotations

import io
import json
import shutil
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import skinlesion
from skinlesion.cli import main
from skinlesion.data.ham10000 import sample_dir
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.fileio import torch_load, torch_save
from skinlesion.inference.classifier import Classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from preprocessing_shift import old_cache_pixels  # noqa: E402  (the pre-issue-25 cache path, one copy)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory) -> Path:
    """HAM10000's one-folder layout of real images: 14 bundled JPEGs (200x150), up to 7 originals (600x450) from
    ../shared/data, and 3 PNG copies (one with an alpha channel)."""
    from conftest import SHARED_DATA

    out = tmp_path_factory.mktemp("real") / "ham"
    (out / "images").mkdir(parents=True)
    sample = pd.read_csv(sample_dir() / "HAM10000_metadata.csv")
    rows = sample.groupby("dx").head(2)
    for r in rows.itertuples():
        shutil.copy(sample_dir() / "images" / f"{r.image_id}.jpg", out / "images")
    originals = SHARED_DATA / "ham10000_originals"
    if (originals / "HAM10000_metadata.csv").is_file():
        big = pd.read_csv(originals / "HAM10000_metadata.csv").groupby("dx").head(1)
        for r in big.itertuples():
            shutil.copy(originals / "images" / f"{r.image_id}.jpg", out / "images")
        rows = pd.concat([rows, big])
    pngs = rows.head(3).copy()
    for n, r in enumerate(pngs.itertuples()):
        image = Image.open(out / "images" / f"{r.image_id}.jpg").convert("RGBA" if n == 0 else "RGB")
        image.save(out / "images" / f"PNG_{r.image_id}.png")
    pngs["image_id"] = "PNG_" + pngs["image_id"]
    pngs["lesion_id"] = "PNG_" + pngs["lesion_id"]
    pd.concat([rows, pngs]).to_csv(out / "HAM10000_metadata.csv", index=False)
    return out


def sharpened_run(folder: Path, out: Path, size: int) -> Path:
    """A real run folder (one training step of timm's tiny test network) whose classifier weights are scaled up, so
    that probabilities move with the pixels: near-uniform outputs would hide a preprocessing difference."""
    table = pd.read_csv(folder / "HAM10000_metadata.csv")
    split = np.where(np.arange(len(table)) < 4, "train", "val")
    splits = out / f"splits_{size}.csv"
    table.assign(split=split)[["image_id", "lesion_id", "dx", "split"]].to_csv(splits, index=False)
    argv = ["train", "--data-dir", str(folder), "--splits", str(splits), "--out", str(out), "--run-name", f"s{size}",
            "--backbone", "test_efficientnet", "--no-pretrained", "--img-size", str(size), "--epochs", "1",
            "--batch-size", "4", "--max-train-batches", "1", "--workers", "0", "--logger", "none"]  # fmt: skip
    assert main(argv) == 0
    run = out / f"s{size}"
    ckpt = torch_load(run / "best.pt")
    generator = torch.Generator().manual_seed(size)
    for key in [k for k in ckpt["model"] if k.startswith("classifier.")]:
        ckpt["model"][key] = torch.randn(ckpt["model"][key].shape, generator=generator) * 3
    torch_save(run / "best.pt", ckpt)
    return run


def probabilities(frame: pd.DataFrame, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    frame = frame.set_index(frame.columns[0]).loc[ids]
    return frame[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=float), frame[frame.columns[0]].tolist()


@pytest.mark.parametrize("size", [64, 128, 224])
def test_every_consumer_sees_the_same_pixels(real_folder, tmp_path, capsys, size):
    run = sharpened_run(real_folder, tmp_path, size)
    val = pd.read_csv(run / "splits.csv").query("split == 'val'")["image_id"].tolist()
    files = sorted(p for p in (real_folder / "images").iterdir() if p.stem in val)
    ids = [p.stem for p in files]
    got = {}
    for name, extra in (("cache", []), ("no-cache", ["--no-cache"])):
        assert main(["evaluate", "--run-dir", str(run), "--bootstrap", "0", *extra]) == 0
        frame = pd.read_csv(run / "predictions.csv")[["image_id", "y_pred", *(f"p_{c}" for c in CLASSES)]]
        got[name] = probabilities(frame, ids)
    capsys.readouterr()
    for backend in ("torch", "onnx"):
        if backend == "onnx":
            assert main(["export", "--run-dir", str(run)]) == 0
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["predict", "--run-dir", str(run), "--format", "csv", "--backend", backend,
                         *map(str, files)]) == 0  # fmt: skip
        frame = pd.read_csv(io.StringIO(out.getvalue()))
        frame["image"] = [Path(p).stem for p in frame["image"]]
        got[f"predict {backend}"] = probabilities(frame[["image", "prediction", *frame.columns[3:]]], ids)
    api = skinlesion.load(run).predict_files(files)
    api["image"] = [Path(p).stem for p in api["image"]]
    got["api"] = probabilities(api[["image", "prediction", *(f"p_{c}" for c in CLASSES)]], ids)

    reference, decided = got["cache"]
    assert reference.std(axis=0).max() > 0.02  # the probabilities do move with the image
    for name, (p, labels) in got.items():
        tolerance = 1e-4 if "onnx" in name else 1e-5
        assert np.abs(p - reference).max() <= tolerance, (name, np.abs(p - reference).max())
        assert labels == decided, name
    capsys.readouterr()


@pytest.mark.parametrize("size", [64, 128])
def test_the_old_cache_resize_would_have_been_caught(real_folder, tmp_path, size):
    """The check above can fail: PIL's resize in the cache (what the image cache did before one owner) moves these
    probabilities by several times the tolerance on the same real images."""
    run = sharpened_run(real_folder, tmp_path, size)
    model = Classifier.load(run)
    prep: Preprocessing = model.preprocessing
    files = sorted((real_folder / "images").iterdir())
    ours = model.backend.view_logits(prep.batch(files))
    theirs = model.backend.view_logits(torch.stack([old_cache_pixels(model, f) for f in files]))
    p, q = model.chain(ours).probabilities, model.chain(theirs).probabilities
    assert np.abs(p - q).max() > 5e-5, np.abs(p - q).max()


def test_the_description_travels_with_the_model(real_folder, tmp_path):
    """best.pt and model.onnx store the preprocessing; both backends rebuild the same one; the cache is keyed by it."""
    run = sharpened_run(real_folder, tmp_path, 64)
    assert main(["export", "--run-dir", str(run)]) == 0
    torch_side = skinlesion.load(run).preprocessing
    onnx_side = skinlesion.load(run / "model.onnx").preprocessing
    assert torch_side == onnx_side == Preprocessing.from_meta(json.loads((run / "config.json").read_text()))
    assert torch_side.resize_size == 73 and torch_side.mean == (0.485, 0.456, 0.406)
    cached = list(Path(skinlesion_cache()).rglob(f"{torch_side.cache_key}/index.npz"))
    assert cached, "the training cache is the preprocessing's own folder"


def skinlesion_cache() -> str:
    import os

    return os.environ["SKINLESION_CACHE_DIR"]
