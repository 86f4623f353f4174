"""Experiment tracking with the libraries people already read: TensorBoard event files in the run folder (the
default), or MLflow (a local ``./mlruns`` store unless ``MLFLOW_TRACKING_URI`` says otherwise), or nothing.

Logged by rank 0: the resolved options as parameters, per epoch history.csv's columns in groups (``train/``,
``val/``, ``opt/lr``, ``speed/``), the validation confusion matrix at each new best epoch, and when training ends
one hyper-parameter entry per run (TensorBoard's HParams dashboard; MLflow's params + ``best_*`` metrics): the
key options beside the best epoch's validation metrics. With MLflow the run folder's key files go up as artifacts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.errors import SkinLesionError
from skinlesion.training.config import SELECT

LOGGERS = ("tensorboard", "mlflow", "none")
ARTIFACTS = ("config.json", "history.csv", "splits.csv")
# history.csv columns outside the train_ / val_ families, and their group: the optimiser and the speed.
OTHER_TAGS = {"lr": "opt/lr", "seconds": "speed/epoch_seconds", "images_per_s": "speed/train_images_per_s"}
# The options a run is compared by in the HParams table (those config.json holds; the rest stay in config text).
HPARAMS = ("recipe", "backbone", "weights", "pretrained", "img_size", "epochs", "global_batch_size", "lr",
           "weight_decay", "opt", "sched", "warmup_epochs", "head_lr_mult", "drop_rate", "loss", "class_weights",
           "sampler", "logit_adjust_tau", "label_smoothing", "mixup", "cutmix", "augment", "ema", "amp_dtype",
           "select", "seed", "fold")  # fmt: skip
HPARAMS_GROUP = "hparams/"  # TensorBoard tag prefix of the run's summary metrics (hparams/best_val_macro_f1, ...)
HPARAMS_SUFFIX = ".hparams"  # the event file holding the entry, replaced when a resumed run closes again


def metric_name(column: str) -> str:
    """history.csv column -> a grouped tag: val_macro_f1 -> val/macro_f1, train_loss -> train/loss, lr -> opt/lr."""
    for part in ("val", "train"):
        if column.startswith(part + "_"):
            return f"{part}/{column.removeprefix(part + '_')}"
    return OTHER_TAGS.get(column, column)


def confusion_markdown(matrix: np.ndarray, classes: Sequence[str]) -> str:
    header = "| true \\ predicted | " + " | ".join(classes) + " |"
    rule = "|---" * (len(classes) + 1) + "|"
    rows = [f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |" for c, row in zip(classes, matrix, strict=True)]
    return "\n".join([header, rule, *rows])


def hparams_of(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The key options as the types HParams / MLflow compare by (None -> "none", lists -> JSON text)."""
    out: dict[str, bool | int | float | str] = {}
    for key in HPARAMS:
        if key not in config:
            continue
        value = config[key]
        if value is None:
            value = "none"
        elif not isinstance(value, bool | int | float | str):
            value = json.dumps(value, default=str)
        out[key] = value
    return out


def run_summary(history: pd.DataFrame, select: str = "macro_f1") -> dict[str, float]:
    """The run in a few numbers: ``best_epoch`` (the first epoch with the best ``select`` value, as the loop keeps
    best.pt), ``epochs_trained`` and the validation metrics at the best epoch (``best_val_macro_f1``, ...)."""
    column, higher = SELECT.get(select, SELECT["macro_f1"])
    scores = pd.to_numeric(history.get(column), errors="coerce") if column in history else None
    if history.empty or scores is None or scores.isna().all():
        return {}
    best = history.loc[scores.idxmax() if higher else scores.idxmin()]
    summary = {"best_epoch": float(best["epoch"]), "epochs_trained": float(history["epoch"].max())}
    for col in history.columns:
        if col.startswith("val_") and pd.notna(best[col]):
            summary[f"best_{col}"] = float(best[col])
    return summary


class Tracker:
    """No tracking (``--logger none``); the base of the others.

    ``close`` ends the run with its hyper-parameter entry (``log_hparams``) unless it was logged already: the
    summary comes from ``<run>/history.csv`` (every epoch, also those before a ``--resume``), else from the rows
    this tracker saw."""

    name = "none"

    def __init__(self, run_dir: Path | None = None, config: dict[str, Any] | None = None):
        self.run_dir, self.config = run_dir, dict(config or {})
        self.rows: list[dict[str, Any]] = []
        self.hparams_logged = False

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        self.rows.append({"epoch": epoch, **row})

    def log_confusion(self, epoch: int, matrix: np.ndarray, classes: Sequence[str]) -> None: ...

    def log_hparams(self, config: dict[str, Any], summary: dict[str, float]) -> None:
        """The run's entry for comparing runs: ``hparams_of(config)`` beside ``summary`` (``run_summary``)."""
        self.hparams_logged = True

    def summary(self) -> dict[str, float]:
        path = self.run_dir / "history.csv" if self.run_dir is not None else None
        history = pd.read_csv(path) if path is not None and path.is_file() else pd.DataFrame(self.rows)
        return run_summary(history, self.config.get("select") or "macro_f1")

    def close(self) -> None:
        if not self.hparams_logged and self.run_dir is not None:
            summary = self.summary()
            if summary:
                self.log_hparams(self.config, summary)


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        super().__init__(run_dir, config)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise SkinLesionError("--logger tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or pass --logger none)") from e  # fmt: skip
        self.SummaryWriter = SummaryWriter
        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        super().log_epoch(epoch, row)
        for column, value in row.items():
            if column != "epoch" and value is not None and np.isfinite(value):
                self.writer.add_scalar(metric_name(column), float(value), epoch)
        self.writer.flush()

    def log_confusion(self, epoch: int, matrix: np.ndarray, classes: Sequence[str]) -> None:
        self.writer.add_text("val/confusion_matrix_at_best", confusion_markdown(matrix, classes), epoch)
        self.writer.flush()

    def log_hparams(self, config: dict[str, Any], summary: dict[str, float]) -> None:
        """One HParams session in the run's own folder (not a sub-run as ``SummaryWriter.add_hparams`` makes),
        in an event file of its own that a later close (a resumed run) replaces: TensorBoard keeps the first
        session info of a run, so a second one beside it would never show. No experiment summary is written: the
        dashboard then builds its columns from every run's hparams and scalars, so runs with other options mix."""
        from tensorboard.plugins.hparams import summary_v2

        super().log_hparams(config, summary)
        self.writer.flush()
        for old in self.log_dir.glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"):
            old.unlink()
        step = int(summary.get("epochs_trained", 0))
        with self.SummaryWriter(log_dir=str(self.log_dir), filename_suffix=HPARAMS_SUFFIX) as writer:
            writer.file_writer.add_summary(summary_v2.hparams_pb(hparams_of(config)), step)
            for key, value in summary.items():
                writer.add_scalar(HPARAMS_GROUP + key, value, step)

    def close(self) -> None:
        super().close()
        self.writer.close()


class MLflow(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        super().__init__(run_dir, config)
        try:
            import mlflow
        except ImportError as e:
            raise SkinLesionError("--logger mlflow needs MLflow: pip install mlflow-skinny") from e
        self.mlflow = mlflow
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
        super().log_epoch(epoch, row)
        values = {metric_name(k).replace("/", "_"): float(v) for k, v in row.items()
                  if k != "epoch" and v is not None and np.isfinite(v)}  # fmt: skip
        self.mlflow.log_metrics(values, step=epoch)

    def log_confusion(self, epoch: int, matrix: np.ndarray, classes: Sequence[str]) -> None:
        self.mlflow.log_dict({"epoch": epoch, "classes": list(classes), "matrix": matrix.tolist()},
                             "confusion_matrix_at_best.json")  # fmt: skip

    def log_hparams(self, config: dict[str, Any], summary: dict[str, float]) -> None:
        """MLflow compares runs by params (all options, logged at the start) and metrics: the summary goes up as
        ``best_epoch``, ``epochs_trained``, ``best_val_*``, and the selection rule as a tag."""
        super().log_hparams(config, summary)
        self.mlflow.log_metrics(summary, step=int(summary.get("epochs_trained", 0)))
        self.mlflow.set_tag("select", str(config.get("select") or "macro_f1"))

    def close(self) -> None:
        super().close()
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.mlflow.log_artifact(str(self.run_dir / name))
        self.mlflow.end_run()


def resolve_logger(kind: str | None) -> str:
    """The logger a ``--logger`` value means (None: the default, tensorboard), for config.json."""
    kind = kind or "tensorboard"
    if kind not in LOGGERS:
        raise SkinLesionError(f"unknown --logger {kind!r}; choose from {', '.join(LOGGERS)}")
    return kind


def create(kind: str | None, run_dir: Path, config: dict[str, Any]) -> Tracker:
    """The tracker for ``--logger kind``; its ``name`` is the logger used ("tensorboard", "mlflow" or "none")."""
    kind = resolve_logger(kind)
    return {"tensorboard": TensorBoard, "mlflow": MLflow, "none": Tracker}[kind](run_dir, config)
