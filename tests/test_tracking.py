"""Experiment tracking: TensorBoard event files by default, MLflow's local store on request, nothing with none."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from skinlesion.cli import main
from skinlesion.model import checkpoint

TINY = ["--backbone", "efficientnet_b0", "--no-pretrained", "--img-size", "32", "--epochs", "2", "--batch-size", "16",
        "--workers", "0", "--max-train-batches", "2"]  # fmt: skip


def test_tensorboard_events_hold_the_history(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    history = pd.read_csv(tiny_run / "history.csv")
    for tag, column in [("val/macro_f1", "val_macro_f1"), ("train/loss", "train_loss"), ("lr", "lr")]:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == history["epoch"].tolist()
        assert [e.value for e in logged] == pytest.approx(history[column].tolist(), rel=1e-6)
    # A confusion matrix at every new best epoch; the last of them is the epoch best.pt holds.
    best_epochs = {e.step for e in events.Tensors("val/confusion_matrix_at_best/text_summary")}
    assert max(best_epochs) == checkpoint.read(tiny_run)["epoch"]
    assert "config" in events.Tags()["tensors"] or any("config" in t for t in events.Tags()["tensors"])


def test_mlflow_writes_a_local_store(synth_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["train", "--data-dir", str(synth_dir), "--out", str(tmp_path / "runs"), "--run-name", "ml",
            "--logger", "mlflow", *TINY]  # fmt: skip
    assert main(argv) == 0
    assert not (tmp_path / "runs" / "ml" / "tensorboard").exists()
    runs = [p for p in Path("mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert len(runs) == 1
    run = runs[0]
    lines = (run / "metrics" / "val_macro_f1").read_text().split("\n")
    values = [float(line.split()[1]) for line in lines if line.strip()]
    history = pd.read_csv(tmp_path / "runs" / "ml" / "history.csv")
    assert values == pytest.approx(history["val_macro_f1"].tolist(), rel=1e-6)
    assert (run / "params" / "lr").read_text() == "0.0003"
    assert {p.name for p in (run / "artifacts").iterdir()} >= {"config.json", "history.csv", "splits.csv",
                                                               "confusion_matrix_at_best.json"}  # fmt: skip


def test_logger_none_writes_no_tracking_files(synth_dir, tmp_path):
    argv = ["train", "--data-dir", str(synth_dir), "--out", str(tmp_path), "--run-name", "quiet", "--logger", "none",
            *TINY]  # fmt: skip
    assert main(argv) == 0
    assert not (tmp_path / "quiet" / "tensorboard").exists() and (tmp_path / "quiet" / "history.csv").is_file()
