"""Experiment tracking with the libraries people already read: TensorBoard event files in the run folder (the
default), or MLflow (a local ``./mlruns`` store unless ``MLFLOW_TRACKING_URI`` says otherwise), or nothing.

Logged by rank 0: the resolved options as parameters, per epoch the learning rate, train loss / accuracy, speed
and every validation metric (history.csv's columns), the validation confusion matrix at each new best epoch,
and with MLflow the run folder's key files as artifacts when training ends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.errors import SkinLesionError

LOGGERS = ("tensorboard", "mlflow", "none")
ARTIFACTS = ("config.json", "history.csv", "splits.csv")


def metric_name(column: str) -> str:
    """history.csv column -> a grouped tag: val_macro_f1 -> val/macro_f1, train_loss -> train/loss, lr -> lr."""
    for part in ("val", "train"):
        if column.startswith(part + "_"):
            return f"{part}/{column.removeprefix(part + '_')}"
    return column


def confusion_markdown(matrix: np.ndarray, classes: Sequence[str]) -> str:
    header = "| true \\ predicted | " + " | ".join(classes) + " |"
    rule = "|---" * (len(classes) + 1) + "|"
    rows = [f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |" for c, row in zip(classes, matrix, strict=True)]
    return "\n".join([header, rule, *rows])


class Tracker:
    """No tracking (``--logger none``); the base of the others."""

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None: ...

    def log_confusion(self, epoch: int, matrix: np.ndarray, classes: Sequence[str]) -> None: ...

    def close(self) -> None: ...


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise SkinLesionError("--logger tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or pass --logger none)") from e  # fmt: skip
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        for column, value in row.items():
            if column != "epoch" and value is not None and np.isfinite(value):
                self.writer.add_scalar(metric_name(column), float(value), epoch)
        self.writer.flush()

    def log_confusion(self, epoch: int, matrix: np.ndarray, classes: Sequence[str]) -> None:
        self.writer.add_text("val/confusion_matrix_at_best", confusion_markdown(matrix, classes), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            import mlflow
        except ImportError as e:
            raise SkinLesionError("--logger mlflow needs MLflow: pip install mlflow-skinny") from e
        self.mlflow, self.run_dir = mlflow, run_dir
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A local store next to where the command runs, as `mlflow ui` expects it; MLflow 3 asks for this
            # opt-in to the file store it keeps for exactly such local use.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
        mlflow.set_experiment("skinlesion")
        self.run = mlflow.start_run(run_name=run_dir.name)
        params = {k: str(v)[:500] for k, v in config.items() if not isinstance(v, dict)}
        mlflow.log_params(params)

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        values = {metric_name(k).replace("/", "_"): float(v) for k, v in row.items()
                  if k != "epoch" and v is not None and np.isfinite(v)}  # fmt: skip
        self.mlflow.log_metrics(values, step=epoch)

    def log_confusion(self, epoch: int, matrix: np.ndarray, classes: Sequence[str]) -> None:
        self.mlflow.log_dict({"epoch": epoch, "classes": list(classes), "matrix": matrix.tolist()},
                             "confusion_matrix_at_best.json")  # fmt: skip

    def close(self) -> None:
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.mlflow.log_artifact(str(self.run_dir / name))
        self.mlflow.end_run()


def create(kind: str | None, run_dir: Path, config: dict[str, Any]) -> Tracker:
    kind = kind or "tensorboard"
    if kind not in LOGGERS:
        raise SkinLesionError(f"unknown --logger {kind!r}; choose from {', '.join(LOGGERS)}")
    return {"tensorboard": TensorBoard, "mlflow": MLflow}.get(kind, lambda *_: Tracker())(run_dir, config)
