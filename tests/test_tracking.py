"""Experiment tracking: TensorBoard event files by default, MLflow's local store on request, nothing with none."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from skinlesion.cli import main
from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint
from skinlesion.training import tracking

TINY = ["--backbone", "efficientnet_b0", "--no-pretrained", "--img-size", "32", "--epochs", "2", "--batch-size", "16",
        "--workers", "0", "--max-train-batches", "2"]  # fmt: skip


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0}).Reload()


def _session_hparams(events) -> dict:
    """The HParams plugin's session-start entry of a run, as {name: value}."""
    from tensorboard.plugins.hparams import metadata

    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    info = metadata.parse_session_start_info_plugin_data(content)
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def test_tensorboard_events_hold_the_history(tiny_run):
    events = _events(tiny_run / "tensorboard")
    history = pd.read_csv(tiny_run / "history.csv")
    pairs = [("val/macro_f1", "val_macro_f1"), ("train/loss", "train_loss"), ("train/acc", "train_acc"),
             ("opt/lr", "lr"), ("speed/epoch_seconds", "seconds"), ("speed/train_images_per_s", "images_per_s")]
    for tag, column in pairs:  # fmt: skip
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == history["epoch"].tolist()
        assert [e.value for e in logged] == pytest.approx(history[column].tolist(), rel=1e-6)
    # Every scalar sits in a group: train/, val/, opt/, speed/ or the run summary hparams/.
    groups = {tag.split("/")[0] if "/" in tag else tag for tag in events.Tags()["scalars"]}
    assert groups == {"train", "val", "opt", "speed", "hparams"}
    # A confusion matrix at every new best epoch; the last of them is the epoch best.pt holds.
    best_epochs = {e.step for e in events.Tensors("val/confusion_matrix_at_best/text_summary")}
    assert max(best_epochs) == checkpoint.read(tiny_run)["epoch"]
    assert "config" in events.Tags()["tensors"] or any("config" in t for t in events.Tags()["tensors"])


def test_tensorboard_has_one_hparams_entry_per_run(tiny_run):
    """The HParams entry sits in the run's own folder (no nested run), with the key options and the best epoch's
    validation metrics as scalars the dashboard reads."""
    folder = tiny_run / "tensorboard"
    assert not [p for p in folder.iterdir() if p.is_dir()]  # one TensorBoard run per run folder
    assert len(list(folder.glob("*" + tracking.HPARAMS_SUFFIX))) == 1
    events = _events(folder)
    config = json.loads((tiny_run / "config.json").read_text())
    hparams = _session_hparams(events)
    assert hparams["lr"] == pytest.approx(config["lr"]) and hparams["backbone"] == config["backbone"]
    assert hparams["img_size"] == config["img_size"] and hparams["select"] == "macro_f1"
    assert hparams["ema"] is False and hparams["fold"] == "none"  # bools stay bools, None is "none"
    assert set(hparams) <= set(tracking.HPARAMS)
    best = checkpoint.read(tiny_run)["epoch"]
    history = pd.read_csv(tiny_run / "history.csv").set_index("epoch")

    def last(tag):
        return events.Scalars(tag)[-1].value

    assert last("hparams/best_epoch") == best
    assert last("hparams/epochs_trained") == history.index.max()
    for column in ("val_macro_f1", "val_acc", "val_loss", "val_macro_auc"):
        assert last(f"hparams/best_{column}") == pytest.approx(history.loc[best, column], rel=1e-6)


def test_a_resumed_run_replaces_its_hparams_entry(tmp_path):
    """A second tracker on the same folder (a --resume) logs on, and its close replaces the HParams entry."""
    history = pd.DataFrame(
        {"epoch": [1, 2, 3, 4], "lr": 1e-3, "train_loss": [2.0, 1.5, 1.2, 1.0], "val_loss": [1.8, 1.6, 1.7, 1.5],
         "val_acc": [0.3, 0.5, 0.4, 0.6], "val_macro_f1": [0.2, 0.45, 0.4, 0.55]}
    )  # fmt: skip
    config = {"lr": 1e-3, "backbone": "b0", "select": "macro_f1", "epochs": 2, "data_dir": "/x", "weights": None}
    for epochs in ([1, 2], [3, 4]):
        tracker = tracking.create(None, tmp_path, {**config, "epochs": epochs[-1]})
        assert tracker.name == "tensorboard"
        for epoch in epochs:
            row = history[history["epoch"] == epoch].iloc[0].to_dict()
            tracker.log_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
        history[history["epoch"] <= epochs[-1]].to_csv(tmp_path / "history.csv", index=False)  # as the loop does
        tracker.close()
    folder = tmp_path / "tensorboard"
    assert len(list(folder.glob("*" + tracking.HPARAMS_SUFFIX))) == 1
    events = _events(folder)
    assert [e.step for e in events.Scalars("val/macro_f1")] == [1, 2, 3, 4]
    assert events.Scalars("hparams/best_epoch")[-1].value == 4  # after the resume, over the whole history
    assert events.Scalars("hparams/best_val_macro_f1")[-1].value == pytest.approx(0.55)
    assert _session_hparams(events) == {"lr": pytest.approx(1e-3), "backbone": "b0", "select": "macro_f1",
                                        "epochs": 4, "weights": "none"}  # fmt: skip


def test_run_summary_follows_the_select_rule():
    history = pd.DataFrame({"epoch": [1, 2, 3], "val_loss": [1.0, 0.7, 0.8], "val_macro_f1": [0.5, 0.6, 0.6],
                            "val_balanced_acc": [0.7, 0.5, 0.6], "val_macro_auc": [0.8, 0.9, None]})  # fmt: skip
    assert tracking.run_summary(history)["best_epoch"] == 2  # ties: the first, as the loop keeps best.pt
    assert tracking.run_summary(history, "val_loss")["best_epoch"] == 2
    assert tracking.run_summary(history, "balanced_acc")["best_epoch"] == 1
    assert tracking.run_summary(history, "auc")["best_val_macro_auc"] == 0.9
    assert tracking.run_summary(history.iloc[:0]) == {}


def test_create_names_the_logger_it_used(tmp_path):
    assert tracking.resolve_logger(None) == "tensorboard" and tracking.resolve_logger("none") == "none"
    assert tracking.create("none", tmp_path, {}).name == "none"
    with pytest.raises(SkinLesionError, match="unknown --logger"):
        tracking.resolve_logger("wandb")


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
    # Grouped names as in TensorBoard ("/" -> "_"), and the run's summary for comparing runs.
    assert {"opt_lr", "speed_epoch_seconds", "train_loss"} <= {p.name for p in (run / "metrics").iterdir()}
    best = checkpoint.read(tmp_path / "runs" / "ml")["epoch"]
    assert float((run / "metrics" / "best_epoch").read_text().split()[1]) == best
    best_f1 = float((run / "metrics" / "best_val_macro_f1").read_text().split()[1])
    assert best_f1 == pytest.approx(history.set_index("epoch").loc[best, "val_macro_f1"], rel=1e-6)
    assert (run / "tags" / "select").read_text() == "macro_f1"


def test_logger_none_writes_no_tracking_files(synth_dir, tmp_path):
    argv = ["train", "--data-dir", str(synth_dir), "--out", str(tmp_path), "--run-name", "quiet", "--logger", "none",
            *TINY]  # fmt: skip
    assert main(argv) == 0
    assert not (tmp_path / "quiet" / "tensorboard").exists() and (tmp_path / "quiet" / "history.csv").is_file()
