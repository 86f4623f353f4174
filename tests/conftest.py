"""Shared fixtures. Tests never touch the network and never write into ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Image caches and other user-cache writes go to a temp folder, never to ~ or ../shared."""
    os.environ["SKINLESION_CACHE_DIR"] = str(tmp_path_factory.mktemp("usercache"))
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "HAM10000_metadata.csv").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic HAM10000-layout folder (metadata CSV + images/), 7 learnable classes."""
    from skinlesion.data.synth import write_synthetic

    if os.environ.get("HOSTILE_DEV"):  # DEV HACK, not to commit
        return Path("/tmp/hprobe/conftest_ham")
    out = tmp_path_factory.mktemp("synth") / "ham"
    write_synthetic(out, n_per_class=30, size=(96, 72), seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_dir, tmp_path_factory) -> Path:
    """A trained run folder (config.json, splits.csv, history.csv, best.pt, last.pt) on synthetic data.

    Small and fast; used by the evaluate / report / predict / export / serve tests.
    """
    from skinlesion.cli import main

    if os.environ.get("HOSTILE_DEV"):  # DEV HACK, not to commit
        return Path("/tmp/hprobe/conftest_tiny2")
    out = tmp_path_factory.mktemp("runs")
    rc = main(
        ["train", "--data-dir", str(synth_dir), "--out", str(out), "--run-name", "tiny",
         "--backbone", "efficientnet_b0", "--no-pretrained", "--img-size", "64", "--epochs", "6",
         "--batch-size", "16", "--lr", "3e-3", "--seed", "0", "--workers", "0"]
    )
    assert rc == 0
    return out / "tiny"


@pytest.fixture(scope="session")
def onnx_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of ``tiny_run`` with temperature 1.5 stored and model.onnx exported (predict / export / serve tests).

    The non-unit temperature makes the tests see calibrated probabilities in both backends.
    """
    import shutil

    from skinlesion.inference.onnx_export import export_onnx
    from skinlesion.model import checkpoint

    run = tmp_path_factory.mktemp("onnx") / "tiny"
    shutil.copytree(tiny_run, run)
    checkpoint.set_temperature(run, 1.5)
    export_onnx(run)
    return run
