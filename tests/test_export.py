"""``skinlesion export``: model.onnx metadata, dynamic batch, agreement with PyTorch, loud failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from skinlesion import fileio
from skinlesion.classes import CLASSES
from skinlesion.cli import main
from skinlesion.errors import SkinLesionError
from skinlesion.inference import onnx_export as export
from skinlesion.inference.classifier import Classifier
from skinlesion.model import checkpoint


def synth_images(synth_dir: Path, n: int = 6) -> list[Image.Image]:
    paths = sorted((synth_dir / "images").glob("*.jpg"))[::35][:n]  # spread over the classes
    return [Image.open(p).convert("RGB") for p in paths]


def test_metadata_describes_the_model(onnx_run):
    model = onnx.load(str(onnx_run / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    meta = checkpoint.read(onnx_run)
    assert json.loads(props["classes"]) == list(CLASSES)
    assert json.loads(props["mean"]) == pytest.approx(list(meta["mean"]))
    assert json.loads(props["std"]) == pytest.approx(list(meta["std"]))
    assert int(props["img_size"]) == meta["img_size"] == 64
    assert int(props["resize_size"]) == meta["resize_size"]
    assert float(props["temperature"]) == pytest.approx(1.5)
    assert props["backbone"] == "efficientnet_b0"
    assert int(props["tta_views"]) == meta["config"]["tta_views"] == 4
    assert props["source_sha256"] == fileio.sha256_file(onnx_run / "best.pt")
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "batch dimension should be symbolic (dynamic)"


def test_onnx_runtime_matches_pytorch_on_images(onnx_run, synth_dir):
    images = synth_images(synth_dir)
    torch_p, onnx_p = Classifier.load(onnx_run, "torch"), Classifier.load(onnx_run, "onnx")
    assert onnx_p.chain == torch_p.chain and torch_p.chain.temperature == pytest.approx(1.5)
    for tta, views in ((False, 4), (True, 4), (True, 8)):
        a = torch_p.with_chain(tta_views=views).predict(images, tta=tta).probabilities
        b = onnx_p.with_chain(tta_views=views).predict(images, tta=tta).probabilities
        assert a.shape == b.shape == (len(images), len(CLASSES))
        assert np.abs(a - b).max() < 1e-4
    eight = onnx_p.with_chain(tta_views=8).predict(images, tta=True).probabilities
    four = onnx_p.with_chain(tta_views=4).predict(images, tta=True).probabilities
    assert not np.allclose(eight, four, atol=1e-5)  # 8 views != 4 flips
    # Calibrated: the probabilities are softmax(logits / 1.5), not softmax(logits).
    logits = torch.from_numpy(torch_p.view_logits(images)[0])
    assert np.allclose(torch_p.predict(images).probabilities, torch.softmax(logits / 1.5, 1).numpy(), atol=1e-6)
    assert not np.allclose(torch_p.predict(images).probabilities, torch.softmax(logits, 1).numpy(), atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the quick legacy exporter builds the wrong graph
def test_export_refuses_a_graph_that_disagrees(onnx_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(onnx_run / "best.pt", run / "best.pt")

    def wrong_graph(model, img_size, opset):
        # A graph with negated logits: the self-check must catch it and write nothing.
        bad = checkpoint.load(run).model
        with torch.no_grad():
            bad.get_classifier().weight.neg_()
            bad.get_classifier().bias.neg_()
        path = tmp_path / "bad.onnx"
        torch.onnx.export(
            bad,
            (torch.randn(2, 3, img_size, img_size),),
            str(path),
            dynamo=False,
            input_names=[export.INPUT_NAME],
            output_names=[export.OUTPUT_NAME],
            dynamic_axes={export.INPUT_NAME: {0: "batch"}},
        )
        return path.read_bytes()

    monkeypatch.setattr(export, "to_onnx_bytes", wrong_graph)
    with pytest.raises(SkinLesionError, match="disagree"):
        export.export_onnx(run)
    assert not (run / "model.onnx").exists()


def test_export_cli_without_checkpoint_says_what_to_do(tmp_path, capsys):
    assert main(["export", "--run-dir", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
