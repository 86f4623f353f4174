"""What happens at the end of each epoch, one small handler per job, each owning its state: the checkpoints (best.pt,
history.csv and last.pt, the epoch's commit point), experiment tracking, the console line, early stopping and the
time box of ``--stop-after-epochs``. The loop calls them in order; a handler that wants the loop to end says so in
``TrainState.stop``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from skinlesion import fileio
from skinlesion.model import checkpoint
from skinlesion.training import distributed, tracking
from skinlesion.training.builders import Training
from skinlesion.training.config import SELECT
from skinlesion.training.rng import rng_state

HISTORY_COLUMNS = [
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
    "val_macro_f1", "val_macro_auc", "seconds", "images_per_s",
]  # fmt: skip


@dataclass
class TrainState:
    """Where a run stands: saved in last.pt (``train_state`` and ``history``) and restored by --resume."""

    epoch: int = 0  # the last finished epoch
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stop: str | None = None  # set by a handler: why the loop ends before --epochs

    def entry(self) -> dict[str, Any]:
        """last.pt's ``train_state``."""
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "global_step": self.global_step}

    @classmethod
    def from_last(cls, last: dict[str, Any]) -> TrainState:
        saved = last["train_state"]
        return cls(epoch=int(last["epoch"]), global_step=int(saved["global_step"]), best_value=saved["best_value"],
                   best_epoch=int(saved["best_epoch"]), history=[dict(r) for r in last["history"]])  # fmt: skip


@dataclass
class EpochResult:
    epoch: int
    row: dict[str, Any]  # history.csv's row
    improved: bool  # a new best of --select: best.pt is rewritten
    confusion: np.ndarray  # validation confusion matrix
    n_val: int


def is_better(value: float, best: float | None, higher: bool) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if higher else value < best)


class Handler(Protocol):
    def on_epoch_end(self, t: Training, state: TrainState, result: EpochResult) -> None: ...

    def close(self) -> None: ...


class Checkpoints:
    """best.pt at a new best epoch, then history.csv, then last.pt: the commit point, written last and carrying the
    history, so a kill at any earlier write resumes from the previous epoch and rewrites what that epoch wrote."""

    def on_epoch_end(self, t: Training, state: TrainState, result: EpochResult) -> None:
        rngs = distributed.gather_object(t.dist, rng_state())  # every rank's, so --resume restores each
        if not t.dist.writes:
            return
        metrics = {**{k: v for k, v in result.row.items() if k.startswith("val_")}, "n_val": result.n_val}
        meta = {**t.checkpoint_meta(), "epoch": result.epoch, "metrics": metrics}
        if result.improved:
            checkpoint.save(t.run_dir / "best.pt", t.eval_model, meta)
        fileio.write_csv(t.run_dir / "history.csv", pd.DataFrame(state.history, columns=HISTORY_COLUMNS))
        s = t.step
        checkpoint.save(t.run_dir / "last.pt", t.model, {
            **meta, "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict(), "rng": rngs, "train_state": state.entry(),
            "ema": s.ema.state_dict() if s.ema is not None else None, "history": state.history,
        })  # fmt: skip

    def close(self) -> None: ...


class Tracking:
    """TensorBoard / MLflow (rank 0): every epoch's row, the confusion matrix at each new best epoch."""

    def __init__(self, t: Training):
        self.tracker = tracking.create(t.config.logger, t.run_dir, t.config_out) if t.dist.is_main else (
            tracking.Tracker())  # fmt: skip

    def on_epoch_end(self, t: Training, state: TrainState, result: EpochResult) -> None:
        self.tracker.log_epoch(result.epoch, result.row)
        if result.improved:
            self.tracker.log_confusion(result.epoch, result.confusion, t.classes)

    def close(self) -> None:
        self.tracker.close()


class Console:
    """One line per epoch on rank 0."""

    def on_epoch_end(self, t: Training, state: TrainState, result: EpochResult) -> None:
        if not t.dist.is_main:
            return
        c, r = t.config, result.row
        fold = f"fold {c.fold} " if c.folds else ""
        tqdm.write(
            f"{fold}epoch {result.epoch}/{c.epochs}  train loss {r['train_loss']:.4f} acc {r['train_acc']:.3f} | "
            f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.3f} bal_acc {r['val_balanced_acc']:.3f} "
            f"f1 {r['val_macro_f1']:.3f} auc {r['val_macro_auc']:.3f} | lr {r['lr']:.2e} | "
            f"{r['seconds']:.1f} s, {r['images_per_s']:.1f} img/s{'  *best' if result.improved else ''}"
        )

    def close(self) -> None: ...


class EarlyStopping:
    """``--patience N``: stop after N epochs without a new best of ``--select``."""

    def __init__(self, patience: int | None):
        self.patience = patience

    def on_epoch_end(self, t: Training, state: TrainState, result: EpochResult) -> None:
        if self.patience is not None and result.epoch - state.best_epoch >= self.patience:
            state.stop = f"early stop: no {t.config.select} improvement for {self.patience} epochs"
            if t.dist.is_main:
                print(state.stop)

    def close(self) -> None: ...


class StopAfter:
    """``--stop-after-epochs N``: end this invocation after N epochs, as if interrupted (``--resume`` continues)."""

    def __init__(self, epochs: int | None, first_epoch: int):
        self.epochs, self.first_epoch = epochs, first_epoch

    def on_epoch_end(self, t: Training, state: TrainState, result: EpochResult) -> None:
        if self.epochs is not None and result.epoch - self.first_epoch + 1 >= self.epochs:
            state.stop = state.stop or f"stopped after {self.epochs} epoch(s) of this invocation"

    def close(self) -> None: ...


def improvement(t: Training, state: TrainState, row: dict[str, Any]) -> bool:
    """Whether the epoch's ``row`` beats the best --select value so far (and record it as the best)."""
    column, higher = SELECT[t.config.select]
    if not is_better(row[column], state.best_value, higher):
        return False
    state.best_value, state.best_epoch = row[column], int(row["epoch"])
    return True
