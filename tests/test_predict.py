"""``skinlesion predict`` through the CLI: JSON / CSV / table output, skipping bad files, both backends."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from skinlesion.classes import CLASSES, FULL_NAMES
from skinlesion.cli import main
from skinlesion.data.images import open_rgb
from skinlesion.inference.classifier import Classifier
from skinlesion.model import checkpoint


@pytest.fixture(scope="module")
def folder(synth_dir, tmp_path_factory) -> Path:
    """Three real images, one broken .jpg and one text file."""
    out = tmp_path_factory.mktemp("predict_in")
    for i, src in enumerate(sorted((synth_dir / "images").glob("*.jpg"))[::40][:3]):
        shutil.copy(src, out / f"lesion_{i}.jpg")
    (out / "broken.jpg").write_text("not a jpeg")
    (out / "notes.txt").write_text("a note")
    return out


def run_json(capsys, *argv: str) -> tuple[dict, str]:
    assert main(["predict", *argv, "--format", "json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_json_output_probabilities_topk_and_skips(onnx_run, folder, capsys):
    doc, err = run_json(capsys, "--run-dir", str(onnx_run), str(folder), "--top-k", "2", "--batch-size", "2")
    rows = doc["predictions"]
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in folder.glob("lesion_*.jpg"))
    for r in rows:
        probs = r["probabilities"]
        assert list(probs) == list(CLASSES)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert r["prediction"] == max(probs, key=probs.get)
        assert r["prediction_name"] == FULL_NAMES[r["prediction"]]
        assert len(r["top_k"]) == 2 and r["top_k"][0]["class"] == r["prediction"]
        assert r["top_k"][0]["probability"] >= r["top_k"][1]["probability"]
    assert "broken.jpg" in err and "notes.txt" in err
    assert {Path(s["image"]).name for s in doc["skipped"]} == {"broken.jpg", "notes.txt"}
    # Calibrated with the checkpoint's temperature (1.5).
    logits = torch.from_numpy(Classifier.load(onnx_run).view_logits([open_rgb(rows[0]["image"])])[0])
    expected = torch.softmax(logits / 1.5, 1).numpy()[0]
    assert np.allclose([rows[0]["probabilities"][c] for c in CLASSES], expected, atol=1e-6)
    assert doc["temperature"] == pytest.approx(1.5)


@pytest.mark.parametrize("views", ["4", "8"])
def test_onnx_backend_gives_the_same_probabilities(onnx_run, folder, capsys, views):
    torch_doc, _ = run_json(capsys, "--run-dir", str(onnx_run), str(folder), "--tta", "--tta-views", views)
    onnx_doc, _ = run_json(
        capsys, "--run-dir", str(onnx_run), str(folder), "--tta", "--tta-views", views, "--backend", "onnx"
    )
    assert torch_doc["tta_views"] == onnx_doc["tta_views"] == int(views)
    assert len(torch_doc["predictions"]) == len(onnx_doc["predictions"]) == 3
    for a, b in zip(torch_doc["predictions"], onnx_doc["predictions"], strict=True):
        assert a["prediction"] == b["prediction"]
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in CLASSES) < 1e-4


def test_csv_and_table_formats(onnx_run, folder, capsys):
    assert main(["predict", "--run-dir", str(onnx_run), str(folder), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3
    assert all(sum(float(r[f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert all(len(r["top_k"].split(";")) == 3 for r in rows)
    image = sorted(folder.glob("lesion_*.jpg"))[0]
    assert main(["predict", "--run-dir", str(onnx_run), str(image), "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert image.name in out and rows[0]["prediction"] in out.splitlines()[1].split()
    assert out.splitlines()[0].split() == ["image", *CLASSES, "prediction", "top-k"]  # short codes, names in JSON
    deep = folder / ("very_long_folder_name_" * 6)
    deep.mkdir()
    shutil.copy(image, deep / image.name)
    assert main(["predict", "--run-dir", str(onnx_run), str(deep / image.name), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 120 and lines[1].endswith(lines[1].split()[-1]) and "..." in lines[1]


def test_fails_only_when_nothing_is_readable(onnx_run, folder, capsys):
    assert main(["predict", "--run-dir", str(onnx_run), str(folder / "broken.jpg"), str(folder / "gone.png")]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "gone.png" in err and "none of the 2" in err


def test_onnx_backend_without_export_says_what_to_do(tiny_run, folder, capsys):
    assert main(["predict", "--run-dir", str(tiny_run), str(folder), "--backend", "onnx"]) == 2
    assert "skinlesion export" in capsys.readouterr().err


def test_stale_onnx_model_is_flagged(onnx_run, folder, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(onnx_run, run)
    checkpoint.set_temperature(run, 2.0)  # recalibrated after the export
    doc, err = run_json(capsys, "--run-dir", str(run), str(folder), "--backend", "onnx")
    assert "re-run `skinlesion export" in err
    assert doc["temperature"] == pytest.approx(1.5)  # the ONNX file still carries its own
