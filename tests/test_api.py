"""The Python API does what the CLI does, with the same numbers: TrainConfig (field names = the long options),
skinlesion.train (recipe post-hoc steps included), skinlesion.evaluate (EvalResult) and predict_files (errors as
rows)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest

import skinlesion
from skinlesion.cli import build_parser, main
from skinlesion.errors import SkinLesionError

FAST = dict(backbone="test_efficientnet", pretrained=False, img_size=32, epochs=2, batch_size=16, workers=0, seed=3,
            max_train_batches=3, logger="none")  # fmt: skip


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_config_fields_are_the_long_option_names():
    options = {o for a in train_parser()._actions for o in a.option_strings}
    for f in dataclasses.fields(skinlesion.TrainConfig):
        if f.metadata["cli"]:
            assert f"--{f.name.replace('_', '-')}" in options, f.name
    assert skinlesion.TrainConfig().lr == skinlesion.RECIPES["reference"].lr == 3e-4
    with pytest.raises(SkinLesionError, match="--img-size"):
        skinlesion.TrainConfig(img_size=10)
    with pytest.raises(SkinLesionError, match="plain folder name"):
        skinlesion.TrainConfig(run_name="../escape")


@pytest.fixture(scope="module")
def both_runs(synth_dir, tmp_path_factory):
    """One run through the API, the same through the CLI (the improved recipe: every post-hoc step runs)."""
    out = tmp_path_factory.mktemp("api")
    config = skinlesion.RECIPES["improved"].replace(data_dir=str(synth_dir), out=str(out), run_name="api", **FAST)
    api_run = skinlesion.train(config)
    argv = ["train", "--recipe", "improved", "--data-dir", str(synth_dir), "--out", str(out), "--run-name", "cli",
            "--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--epochs", "2",
            "--batch-size", "16", "--workers", "0", "--seed", "3", "--max-train-batches", "3", "--logger", "none"]
    assert main(argv) == 0
    return api_run, out / "cli"


def test_train_from_python_equals_the_command_line(both_runs):
    api_run, cli_run = both_runs
    assert api_run.name == "api"
    a, b = (json.loads((r / "config.json").read_text()) for r in both_runs)
    differs = {k for k in a if a[k] != b.get(k)}
    assert differs == {"run_name", "splits_sha256"} - ({"splits_sha256"} if a["splits_sha256"] == b[
        "splits_sha256"] else set())  # fmt: skip
    h_api, h_cli = (pd.read_csv(r / "history.csv").drop(columns=["seconds", "images_per_s"]) for r in both_runs)
    pd.testing.assert_frame_equal(h_api, h_cli)
    from skinlesion.model import checkpoint

    ca, cb = checkpoint.read(api_run), checkpoint.read(cli_run)
    for key in ("logit_adjustment", "metadata_prior", "operating_point"):  # the recipe's post-hoc steps ran
        assert (key in ca) == (key in cb), key
    assert "logit_adjustment" in ca and "metadata_prior" in ca


def test_evaluate_from_python_equals_the_command_line(both_runs, capsys):
    run = both_runs[0]
    result = skinlesion.evaluate(run, tta=True, bootstrap=50)
    assert isinstance(result, skinlesion.EvalResult)
    saved = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", "--run-dir", str(run), "--tta", "--bootstrap", "50"]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert json.loads(json.dumps(result.metrics)) == saved == again
    pd.testing.assert_frame_equal(result.predictions, pd.read_csv(run / "predictions.csv"), check_dtype=False)
    assert result.predictions_tta is not None and len(result.predictions) == saved["n_images"]


def test_predict_files_is_a_frame_with_errors_as_rows(both_runs, synth_dir, tmp_path, capsys):
    run = both_runs[0]
    images = sorted((synth_dir / "images").glob("*.jpg"))[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    model = skinlesion.load(run)
    frame = model.predict_files([images[0], broken, *images[1:]], batch_size=2, tta=True)
    assert list(frame["image"]) == [str(images[0]), str(broken), *map(str, images[1:])]
    assert frame["error"].notna().tolist() == [False, True, False, False, False, False]
    assert "not a readable image" in frame.loc[1, "error"] and np.isnan(frame.loc[1, "p_mel"])
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["predict", "--run-dir", str(run), "--tta", "--format", "csv", *map(str, images)]) == 0
    cli = pd.read_csv(io.StringIO(out.getvalue()))
    ok = frame[frame["error"].isna()].reset_index(drop=True)
    classes = [c for c in model.classes]
    np.testing.assert_allclose(ok[[f"p_{c}" for c in classes]].to_numpy(float),
                               cli[[f"p_{c}" for c in classes]].to_numpy(float), atol=1e-6)  # fmt: skip
    assert ok["prediction"].tolist() == cli["prediction"].tolist()
    assert ok["top_k"].tolist() == cli["top_k"].tolist()
