"""``export --int8`` (ONNX Runtime static INT8), its drift report, and the backends (torch, onnx, onnx-int8, auto)
feeding the same decision chain in evaluate / predict / serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from skinlesion import fileio
from skinlesion.cli import main
from skinlesion.data.run_folder import split_part
from skinlesion.decision.chain import DecisionChain
from skinlesion.evaluation.evaluate import evaluate
from skinlesion.inference import drift, int8_export, quantize, selection
from skinlesion.inference.onnx_export import add_metadata, props_of
from skinlesion.model import checkpoint

PROBS = [f"p_{c}" for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")]


@pytest.fixture(scope="module")
def int8_run(onnx_run, tmp_path_factory) -> tuple[Path, str]:
    """A copy of onnx_run with model.int8.onnx from `skinlesion export --int8` (calibrated on 40 images), and what
    the command printed."""
    run = tmp_path_factory.mktemp("int8") / "tiny"
    shutil.copytree(onnx_run, run)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", "--run-dir", str(run), "--int8", "--calibration-images", "40"]) in (0, None)
    return run, out.getvalue()


def test_int8_file_is_quantized_traceable_and_carries_its_drift(int8_run):
    run, printed = int8_run
    model = onnx.load(str(run / "model.int8.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) > 50  # every conv kernel stored as int8
    fp32_props = props_of((run / "model.onnx").read_bytes())
    assert props["precision"] == "int8" and "precision" not in fp32_props
    assert props["source_sha256"] == fileio.sha256_file(run / "best.pt") == fp32_props["source_sha256"]
    assert props["fp32_sha256"] == fileio.sha256_file(run / "model.onnx")
    assert json.loads(props["quantization"])["calibration"]["images"] == 40
    for key in ("classes", "temperature", "preprocessing", "tta_views", "operating_point"):
        assert props[key] == fp32_props[key]  # the same decision chain and preprocessing as model.onnx
    measured = json.loads(props["int8_drift"])
    assert measured["split"] == "val" and measured["images"] == len(split_part(run, "val"))
    assert set(measured["metrics"]) == {"balanced_accuracy", "macro_auc", "mel_recall"}
    assert f"INT8 vs fp32 on val ({measured['images']} images" in printed
    shift = json.loads(props[quantize.LOGIT_SHIFT_KEY])
    assert len(shift) == len(json.loads(props["classes"]))
    assert "classifier bias corrected by INT8's mean logit shift on the calibration images: akiec " in printed
    speed = json.loads(props["int8_speed"])
    assert (f"speed on this CPU at batch 32: fp32 {speed['fp32_img_s']:.1f} img/s, INT8 {speed['int8_img_s']:.1f} "
            "img/s") in printed  # fmt: skip
    assert "wrote" in printed and "model.int8.onnx" in printed and "calibrated on 40 training images" in printed


def test_backends_give_the_same_numbers_through_the_one_chain(int8_run, tmp_path):
    """evaluate on every backend: torch = onnx to the export tolerance; onnx-int8 differs from onnx by exactly the
    drift export stored (agreement, max |dp|, balanced accuracy difference)."""
    run, _ = int8_run
    frames, results = {}, {}
    for backend in ("torch", "onnx", "onnx-int8"):
        result = evaluate(run, backend=backend, bootstrap=0, write=False)
        assert result.metrics["backend"] == backend
        frames[backend], results[backend] = result.predictions, result
    assert np.abs(frames["torch"][PROBS].to_numpy() - frames["onnx"][PROBS].to_numpy()).max() < 1e-4
    assert (frames["torch"]["y_pred"] == frames["onnx"]["y_pred"]).all()
    measured = selection.onnx_props(run / "model.int8.onnx")["int8_drift"]
    measured = json.loads(measured)
    fp32, int8 = frames["onnx"], frames["onnx-int8"]
    assert np.mean(fp32["y_pred"] == int8["y_pred"]) == pytest.approx(measured["agreement"])
    assert np.abs(fp32[PROBS].to_numpy() - int8[PROBS].to_numpy()).max() == pytest.approx(measured["max_abs_dp"],
                                                                                          rel=1e-4, abs=1e-6)
    delta = (results["onnx-int8"].metrics["balanced_accuracy"]["value"]
             - results["onnx"].metrics["balanced_accuracy"]["value"])  # fmt: skip
    assert delta == pytest.approx(measured["metrics"]["balanced_accuracy"]["delta"], abs=1e-9)
    assert any("INT8" in n for n in results["onnx-int8"].notes)


def with_props(path: Path, **changes: str) -> None:
    data = path.read_bytes()
    fileio.write_bytes(path, add_metadata(data, {**props_of(data), **changes}))


def report(drop: float) -> dict:
    return {"split": "val", "images": 10, "lesions": 10, "agreement": 0.9, "disagreements": 1, "max_abs_dp": 0.2,
            "metrics": {"balanced_accuracy": {"fp32": 0.8, "int8": 0.8 - drop, "delta": -drop, "ci95": None},
                        "macro_auc": {"fp32": 0.9, "int8": 0.9, "delta": 0.0, "ci95": None},
                        "mel_recall": {"fp32": 0.5, "int8": 0.5, "delta": 0.0, "ci95": None}}}  # fmt: skip


def test_auto_picks_the_fastest_up_to_date_backend(int8_run, tmp_path):
    src, _ = int8_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    speed = json.loads(props_of((run / "model.int8.onnx").read_bytes())["int8_speed"])
    assert speed["batch"] == 32 and speed["fp32_img_s"] > 0 and speed["int8_img_s"] > 0 and speed["cpu"]
    # Measured slower than fp32 on this CPU at export: auto keeps to fp32 and says so; by name it is used.
    with_props(run / "model.int8.onnx", int8_speed=json.dumps({**speed, "fp32_img_s": 100.0, "int8_img_s": 88.0}))
    choice = selection.choose(run)
    assert choice.backend == "onnx" and any("0.88x model.onnx's speed" in n for n in choice.notes)
    assert selection.choose(run, "onnx-int8").backend == "onnx-int8"
    with_props(run / "model.int8.onnx", int8_speed=json.dumps({**speed, "fp32_img_s": 100.0, "int8_img_s": 150.0}))
    assert selection.choose(run).backend == "onnx-int8"
    assert selection.choose(run, device="cuda").backend == "torch"
    assert selection.choose(run, "onnx").backend == "onnx"
    # A drift over the limit: auto keeps to fp32, says why; asked for by name it is still used.
    with_props(run / "model.int8.onnx", int8_drift=json.dumps(report(0.02)))
    choice = selection.choose(run)
    assert choice.backend == "onnx" and any("0.020 balanced accuracy" in n for n in choice.notes)
    assert selection.choose(run, "onnx-int8").backend == "onnx-int8"
    with_props(run / "model.int8.onnx", int8_drift=json.dumps(report(0.004)))
    assert selection.choose(run).backend == "onnx-int8"
    # best.pt changed and only model.onnx exported again: the int8 file is stale, ignored by auto.
    checkpoint.set_temperature(run, 2.0)
    choice = selection.choose(run)
    assert choice.backend == "torch" and sum("older best.pt" in n for n in choice.notes) == 2
    fp32 = run / "model.onnx"
    with_props(fp32, source_sha256=fileio.sha256_file(run / "best.pt"))
    choice = selection.choose(run)
    assert choice.backend == "onnx" and "model.int8.onnx" in choice.notes[0]
    explicit = selection.choose(run, "onnx-int8")
    assert explicit.backend == "onnx-int8" and explicit.notes[0].startswith("warning:")
    (run / "model.int8.onnx").unlink()
    with pytest.raises(Exception, match="export --int8"):
        selection.load(run, "onnx-int8")


def test_predict_and_serve_use_int8(int8_run, synth_dir, capsys):
    run, _ = int8_run
    images = sorted((synth_dir / "images").glob("*.jpg"))[::40][:4]
    docs = {}
    for backend in ("onnx", "onnx-int8"):
        assert main(["predict", "--run-dir", str(run), "--backend", backend, "--format", "json",
                     *map(str, images)]) in (0, None)  # fmt: skip
        docs[backend] = json.loads(capsys.readouterr().out)
    assert docs["onnx-int8"]["backend"] == "onnx-int8"
    measured = json.loads(selection.onnx_props(run / "model.int8.onnx")["int8_drift"])
    for a, b in zip(docs["onnx"]["predictions"], docs["onnx-int8"]["predictions"], strict=True):
        dp = max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"])
        assert dp < max(0.05, 2 * measured["max_abs_dp"])  # int8: within the drift measured at export
    from skinlesion.serve.app import ModelService

    assert ModelService(run, "onnx-int8").backend == "onnx-int8"


def test_paired_drift_report_and_warning(int8_run):
    run, _ = int8_run
    table = split_part(run, "val")
    chain = DecisionChain.from_meta(checkpoint.read(run))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, len(table), 7)) * 3
    same = drift.compare(chain, table, logits, logits.copy(), bootstrap=50)
    assert same["agreement"] == 1.0 and same["max_abs_dp"] == 0.0
    assert same["metrics"]["balanced_accuracy"]["ci95"] == [0.0, 0.0] and drift.warning(same) is None
    # Push every image to one wrong class: a real drop, with a paired interval below zero.
    y = table["dx"].map({c: i for i, c in enumerate(chain.classes)}).to_numpy()
    wrong = logits.copy()
    wrong[0, np.arange(len(y)), (y + 1) % 7] += 100
    worse = drift.compare(chain, table, logits, wrong, bootstrap=50)
    ba = worse["metrics"]["balanced_accuracy"]
    assert ba["int8"] == 0.0 and ba["delta"] < -0.01 and ba["ci95"][1] < 0
    message = drift.warning(worse)
    assert message and "--backend onnx" in message and not drift.acceptable(worse)


def test_export_warns_and_auto_keeps_fp32_on_a_large_drop(int8_run, tmp_path, monkeypatch, capsys):
    """The command's warning path: the fp32 export and the quantization are replaced by the files already made and
    the measured drift by a report with a 0.03 drop, so what is tested is the printing, the stored drift and auto's
    reaction."""
    src, _ = int8_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    made = (run / "model.int8.onnx").read_bytes()
    (run / "model.int8.onnx").unlink()
    monkeypatch.setattr(int8_export.quantize, "quantize_run", lambda *a, **k: (made, 40))
    from skinlesion.commands import export as export_command  # model.onnx is current: skip its 30 s re-export

    monkeypatch.setattr(export_command, "export_onnx", lambda *a, **k: (run / "model.onnx", 0.0, 0.0, 1.0))
    monkeypatch.setattr(int8_export.drift, "measure", lambda *a, **k: report(0.03))
    assert main(["export", "--run-dir", str(run), "--int8"]) in (0, None)
    err = capsys.readouterr().err
    assert "warning: INT8 loses 0.030 balanced accuracy" in err and "--backend onnx" in err
    assert selection.choose(run).backend == "onnx"
    assert json.loads(selection.onnx_props(run / "model.int8.onnx")["int8_drift"])["metrics"]


def test_int8_path_and_calibration_sample(onnx_run):
    assert quantize.int8_path(Path("r/model.onnx")) == Path("r/model.int8.onnx")
    assert quantize.int8_path(Path("r/other.onnx")) == Path("r/other.int8.onnx")
    a, b = quantize.calibration_table(onnx_run, 20), quantize.calibration_table(onnx_run, 20)
    assert a["image_id"].tolist() == b["image_id"].tolist() and len(a) == 20
    assert set(a["split"]) == {"train"}
    everything = quantize.calibration_table(onnx_run, 10_000)
    assert len(everything) == (pd.read_csv(onnx_run / "splits.csv")["split"] == "train").sum()


def test_stem_and_first_convolution_and_classifier_stay_fp32(int8_run):
    """kept_in_fp32 on a real efficientnet_b0 graph: the stem, the depthwise convolution its SiLU feeds, the classifier;
    in the written int8 file exactly those read plain fp32 weights, every other convolution int8 ones."""
    run, _ = int8_run
    fp32 = onnx.load(str(run / "model.onnx")).graph
    kept = quantize.kept_in_fp32(run / "model.onnx")
    by_name = {n.name: n for n in fp32.node}
    shapes = {t.name: list(t.dims) for t in fp32.initializer}
    convs = [n for n in fp32.node if n.op_type == "Conv"]
    stem, first = convs[0], convs[1]
    assert shapes[stem.input[1]][1] == 3 and next(a.i for a in first.attribute if a.name == "group") > 1
    assert kept == [stem.name, first.name] + [n.name for n in fp32.node if n.op_type == "Gemm"]
    assert by_name[kept[-1]].op_type == "Gemm"

    int8 = onnx.load(str(run / "model.int8.onnx")).graph
    plain = {t.name for t in int8.initializer}
    fp32_weights = {n.name for n in int8.node if n.op_type in ("Conv", "Gemm") and n.input[1] in plain}
    assert fp32_weights == set(kept)
    assert sum(n.op_type == "Conv" for n in int8.node) == len(convs)


def test_bias_correction_removes_the_mean_logit_shift(int8_run):
    """correct_bias: after it the INT8 graph's mean logit shift from fp32 on the calibration images is ~0; a graph
    given an artificial shift of +0.5 on one class gets it taken back out."""
    import onnxruntime as ort
    from onnx import numpy_helper

    run, _ = int8_run
    files = quantize.calibration_table(run, 40)["path"].tolist()
    preprocessing = checkpoint.load(run).preprocessing

    def batches():
        return quantize.calibration_batches(files, preprocessing)

    def mean_shift(model: bytes) -> np.ndarray:
        a, b = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (str(run / "model.onnx"), model))
        diffs = [b.run(None, {"input": x})[0] - a.run(None, {"input": x})[0] for x in batches()]
        return np.concatenate(diffs).mean(0)

    written = onnx.load(str(run / "model.int8.onnx"))
    written.ClearField("metadata_props")
    assert np.abs(mean_shift(written.SerializeToString())).max() < 1e-3
    gemm = next(n for n in written.graph.node if n.op_type == "Gemm")
    bias = next(t for t in written.graph.initializer if t.name == gemm.input[2])
    shifted = numpy_helper.to_array(bias).copy()
    shifted[4] += 0.5
    bias.CopyFrom(numpy_helper.from_array(shifted, bias.name))
    assert mean_shift(written.SerializeToString())[4] == pytest.approx(0.5, abs=1e-3)
    corrected = quantize.correct_bias(written.SerializeToString(), run / "model.onnx", batches(), "input")
    assert np.abs(mean_shift(corrected)).max() < 1e-3


def test_damaged_speed_metadata_is_one_line_or_no_evidence(int8_run, tmp_path, capsys):
    """int8_speed that is not a JSON object: evaluate stops with one line naming the fix; an object without two
    positive numbers is no evidence INT8 is faster, so auto keeps fp32 and says why."""
    src, _ = int8_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    with_props(run / "model.int8.onnx", int8_drift=json.dumps(report(0.0)), int8_speed="[1, 2")
    assert main(["evaluate", "--run-dir", str(run), "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8_speed metadata is unreadable" in err[0] and "export" in err[0]
    with_props(run / "model.int8.onnx", int8_speed=json.dumps({"fp32_img_s": "fast", "int8_img_s": 10.0}))
    choice = selection.choose(run)
    assert choice.backend == "onnx" and any("has no valid speed" in n for n in choice.notes)


def test_export_records_the_rounding_and_refuses_an_unknown_one(int8_run, onnx_run, capsys):
    run, printed = int8_run
    how = json.loads(quantize.metadata_props(run / "model.int8.onnx")["quantization"])
    assert how["weight_rounding"].startswith("GPTQ") and "weights rounded by GPTQ" in printed
    with pytest.raises(SystemExit) as stop:
        main(["export", "--run-dir", str(onnx_run), "--int8", "--weight-rounding", "stochastic"])
    assert stop.value.code == 2 and "--weight-rounding" in capsys.readouterr().err
