"""`skinlesion prepare | split | synth` from the command line, including the three data errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from skinlesion.cli import main
from skinlesion.data.split import read_splits
from skinlesion.data.synth import write_synthetic


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("prep") / "ham", n_per_class=3, size=(48, 36), seed=2)


@pytest.fixture()
def broken(source, tmp_path) -> tuple[Path, str, str]:
    """A copy with one missing and one truncated image; returns (folder, missing id, corrupt id)."""
    root = Path(shutil.copytree(source, tmp_path / "ham"))
    images = sorted((root / "images").iterdir())
    images[0].unlink()
    images[1].write_bytes(images[1].read_bytes()[:200])
    return root, images[0].stem, images[1].stem


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """Return code, stdout, and the error lines of stderr (tqdm bars dropped)."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    return rc, out, "\n".join(errors)


def test_prepare_without_arguments_runs_clean_on_the_bundled_sample(capsys):
    rc, out, err = _run(capsys, "prepare")
    assert rc == 0, err
    assert "total     700" in out and "ages outside 0-120 or not numbers (unknown): 0" in out
    assert "missing files (dropped): none" in out and "corrupt files (dropped): none" in out
    assert "image cache:" in out and "(700 images, short side 257px for 224px runs" in out


def test_prepare_reports_missing_and_corrupt_files(broken, capsys):
    root, missing, corrupt = broken
    rc, out, err = _run(capsys, "prepare", "--data-dir", str(root), "--no-cache")
    assert rc == 2
    assert err.startswith("error: 2 image(s) listed in HAM10000_metadata.csv cannot be used (1 missing, 1 unreadable)")
    assert f"{missing} (missing)" in err and f"{corrupt} (corrupt" in err and "--allow-missing" in err
    assert len(err.splitlines()) == 1


def test_prepare_reports_unknown_labels(source, tmp_path, capsys):
    root = Path(shutil.copytree(source, tmp_path / "ham"))
    meta = pd.read_csv(root / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    meta.loc[[0, 5], "dx"] = "scc"
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    rc, _, err = _run(capsys, "prepare", "--data_dir", str(root))
    assert rc == 2
    assert "2 row(s) with unknown dx: 'scc' (2 rows)" in err and "allowed: akiec, bcc" in err


def test_allow_missing_drops_and_records_them(broken, capsys):
    root, missing, corrupt = broken
    rc, out, err = _run(capsys, "prepare", "--data-dir", str(root), "--allow-missing", "--img-size", "32")
    assert rc == 0, err
    assert f"missing files (dropped): 1 ({missing})" in out
    assert f"corrupt files (dropped): 1 ({corrupt}: corrupt" in out
    assert "total      19" in out and "(19 images, short side 37px for 32px runs" in out


def test_split_command_writes_the_csv_and_prints_counts(source, tmp_path, capsys):
    out_csv = tmp_path / "run" / "splits.csv"
    rc, out, err = _run(capsys, "split", "--data-dir", str(source), "--out", str(out_csv), "--val-frac", "0.34")
    assert rc == 0, err
    split = read_splits(out_csv)
    assert len(split) == 21 and set(split["split"]) == {"train", "val"}
    n_val = int((split["split"] == "val").sum())
    assert "train" in out and "val" in out and f"images          {21 - n_val}" in out
    with pytest.raises(SystemExit) as refused:  # a number out of its range is refused while parsing
        main(["split", "--data-dir", str(source), "--out", str(out_csv), "--folds", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 2 and "argument --folds: expected an integer >= 2" in err


def test_synth_command(tmp_path, capsys):
    rc, out, err = _run(
        capsys, "synth", "--out", str(tmp_path / "s"), "--n_per_class", "5", "--size", "32x24", "--imbalance"
    )
    assert rc == 0, err
    meta = pd.read_csv(tmp_path / "s" / "HAM10000_metadata.csv")
    assert meta["dx"].value_counts().idxmax() == "nv" and f"wrote {len(meta)} images" in out
    rc, _, err = _run(capsys, "synth", "--out", str(tmp_path / "t"), "--size", "big")
    assert rc == 2 and "WIDTHxHEIGHT" in err
