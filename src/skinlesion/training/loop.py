"""The training loop: fine-tune a timm backbone and write the run folder.

Read top to bottom: ``run`` resolves the run folder (a fresh run, or the saved one on --resume) -> ``train`` builds
the run once (training/builders.py: data, split, cache, loaders, network, optimizer, schedule, loss, EMA) -> epochs
of ``train_step`` (training/step.py) over the train loader and a validation pass -> the handlers
(training/handlers.py: checkpoints, tracking, console, early stopping) after each epoch.

Under torchrun (or SLURM, or a process group set up by the caller), rank 0 decides (the split, a resumed state)
and broadcasts; rank 0 writes the run folder, and so does one rank per node without a shared file system;
validation metrics cover the whole val set (outputs of every rank are gathered). Batches leave the loader as uint8
and are normalised on the device; each sample's augmentation draws from its own seed (training/sampling), so
loader workers persist across epochs and --resume stays exact.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix
from torch import nn
from tqdm import tqdm

from skinlesion import fileio, metrics
from skinlesion.device import autocast
from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint
from skinlesion.training import distributed, handlers
from skinlesion.training.builders import Training, build, per_process_batch, set_backbone_frozen
from skinlesion.training.config import OUTPUT_KEYS, TrainConfig
from skinlesion.training.handlers import EpochResult, TrainState
from skinlesion.training.recipes import recipe
from skinlesion.training.rng import seed_everything, set_rng_state
from skinlesion.training.step import train_step

POSTFIX_EVERY = 10  # steps between progress-bar loss updates (each one is a host-device sync)


# ------------------------------------------------------------------------------------------------- run
def run(
    config: TrainConfig,
    d: distributed.Dist | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    given: Iterable[str] | None = None,
) -> tuple[Path, TrainConfig]:
    """Train (or, ``resume``, continue from last.pt) the run ``config`` describes; its folder and final config.
    ``given``: the options the user set (on --resume only those may, and must be allowed to, change); default:
    those that differ from the config's recipe."""
    d = d or distributed.Dist()
    name = config.run_name or distributed.broadcast_object(d, config.resolved().run_name)
    config = config.replace(run_name=name).resolved()
    run_dir = config.run_dir
    if d.local_rank == 0:  # temp files of a process that died mid-write (e.g. .last.pt.*.tmp), on each node
        fileio.remove_stale_temps(run_dir)
    last = distributed.from_main(d, lambda: read_last(run_dir, resume))
    if last is not None:
        config = resume_config(config, last["config"], run_dir, given)
    fresh = d.is_main and not resume and not run_dir.exists()
    try:
        return train(config, run_dir, d, last, stop_after_epochs)
    except BaseException:
        if fresh and not (run_dir / "last.pt").exists():  # a failed start leaves no half run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def read_last(run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """last.pt of the run folder to resume (with best.pt's bytes: a node that lost its copy gets it back), or None
    for a fresh run; rank 0's run folder is the one resumed (other nodes may have none)."""
    if not resume:
        if (run_dir / "last.pt").exists():  # the commit point: without it no epoch finished, so start again
            raise SkinLesionError(f"{run_dir} already holds a run; pass --resume to continue it or another --run-name")
        return None
    if not (run_dir / "last.pt").is_file():
        raise SkinLesionError(f"--resume: no last.pt in {run_dir}; check --out/--run-name or drop --resume")
    last = checkpoint.read(run_dir / "last.pt")
    if "history" not in last:  # older last.pt files: the committed epochs of history.csv
        last["history"] = pd.read_csv(run_dir / "history.csv").to_dict("records")[: last["epoch"]]
    best = run_dir / "best.pt"
    last["best_pt_bytes"] = best.read_bytes() if best.is_file() else None
    return last


def resume_config(config: TrainConfig, saved: dict[str, Any], run_dir: Path, given: Iterable[str] | None
                  ) -> TrainConfig:  # fmt: skip
    """The saved run's config with the options given again: only resumable ones may differ (where the data and
    outputs now live, the epochs, the post-hoc steps, ...). The global batch is the saved run's: asked for again, the
    per-process batch follows the new number of processes."""
    base = TrainConfig.from_dict(saved, f"{run_dir / 'last.pt'} config", ignore=OUTPUT_KEYS)
    if given is None:
        reference = recipe(config.recipe) if config.recipe in ("reference", "improved") else TrainConfig()
        given = [k for k, v in config.to_dict().items() if v != reference.to_dict()[k]]
    changes = {k: getattr(config, k) for k in given if k not in ("run_name", "recipe")}
    requested = changes.pop("global_batch_size", None)
    if requested is not None and saved.get("global_batch_size") not in (None, requested):
        raise SkinLesionError(f"--global-batch-size {requested} differs from the run being resumed ({run_dir}: "
                              f"{saved['global_batch_size']}); pass {saved['global_batch_size']} or leave it out")
    changes["device_cache"] = config.device_cache  # where pixels live: per invocation
    changes["allow_missing"] = config.allow_missing or base.allow_missing
    return base.resumed_with(changes, run_dir).replace(global_batch_size=requested)


# ----------------------------------------------------------------------------------------------- train
def train(
    c: TrainConfig, run_dir: Path, d: distributed.Dist, last: dict[str, Any] | None, stop_after: int | None
) -> tuple[Path, TrainConfig]:
    """The training itself: from ``last`` (last.pt's contents) when resuming, else from the start."""
    if c.global_batch_size:  # the same global batch whatever the number of processes
        c = c.replace(batch_size=per_process_batch(c.global_batch_size, d.world_size, c.grad_accum))
    d = distributed.with_writers(d, run_dir)
    seed_everything(c.seed + d.rank)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t = build(c, run_dir, d, resume=last is not None)
    state = restore(t, last, d) if last is not None else TrainState()
    if d.writes:
        fileio.write_json(run_dir / "config.json", t.config_out)
    if d.is_main:
        print(f"run folder {run_dir}: {c.backbone} {c.img_size}px, {t.config_out['n_train']} train / "
              f"{t.config_out['n_val']} val images, {d.device} amp={t.config_out['amp_dtype']} world={d.world_size}")
    steps = [handlers.Checkpoints(), handlers.Tracking(t), handlers.Console(), handlers.EarlyStopping(c.patience),
             handlers.StopAfter(stop_after, state.epoch + 1)]  # fmt: skip
    try:
        fit(t, state, steps)
    finally:
        for handler in steps:
            handler.close()
    if d.is_main and state.best_value is not None:
        print(f"best {c.select} {state.best_value:.4f} at epoch {state.best_epoch}: {run_dir / 'best.pt'}")
    if last is not None and d.writes and (run_dir / "best.pt").is_file():  # a fresh run's best.pt has them already
        keep_scoring_settings(run_dir / "best.pt", t.config_out)
    return run_dir, c


def restore(t: Training, last: dict[str, Any], d: distributed.Dist) -> TrainState:
    """Weights, optimizer, schedule, scaler, EMA, RNG streams and history from last.pt."""
    s = t.step
    t.model.load_state_dict(last["model"])
    s.optimizer.load_state_dict(last["optimizer"])
    if last["config"]["epochs"] == t.config.epochs:  # else the cosine is re-planned over the new length
        s.scheduler.load_state_dict(last["scheduler"])
    if last["scaler"] and s.scaler.is_enabled():
        s.scaler.load_state_dict(last["scaler"])
    elif s.scaler.is_enabled():  # started in fp32 / bf16 (no scaler state), resumed where fp16 needs one
        print(f"note: resuming with fp16 + GradScaler ({d.device}); the run was started without it, so the scaler "
              "starts fresh", file=sys.stderr)  # fmt: skip
    if s.ema is not None:
        s.ema.load_state_dict(last["ema"])
    state = TrainState.from_last(last)
    best_bytes = last.pop("best_pt_bytes", None)
    if d.writes and best_bytes and not (t.run_dir / "best.pt").is_file():
        fileio.write_bytes(t.run_dir / "best.pt", best_bytes)
    s.global_step = state.global_step
    s.scheduler.step_update(state.global_step)
    set_rng_state(last["rng"][d.rank] if d.rank < len(last["rng"]) else last["rng"][0])
    return state


def fit(t: Training, state: TrainState, steps: list[handlers.Handler]) -> TrainState:
    """Epochs from the one after ``state.epoch`` to --epochs; each handler after each epoch, in order."""
    for epoch in range(state.epoch + 1, t.config.epochs + 1):
        result = run_epoch(t, state, epoch)
        for handler in steps:
            handler.on_epoch_end(t, state, result)
        if state.stop:
            break
    return state


def run_epoch(t: Training, state: TrainState, epoch: int) -> EpochResult:
    """Train one epoch, validate, and record the epoch in ``state``."""
    start = time.perf_counter()
    if t.config.head_warmup_epochs:
        set_backbone_frozen(t.step.optimizer, t.step.scheduler, t.step.global_step,
                            epoch <= t.config.head_warmup_epochs)  # fmt: skip
    row: dict[str, Any] = {"epoch": epoch, **train_one_epoch(t, epoch)}
    eval_model = t.eval_model
    for module in {id(m): m for m in (t.model, eval_model)}.values():  # rank 0's BN statistics on every rank:
        distributed.broadcast_buffers(t.dist, module)  # each validates and saves the same model
    scores, n_val, confusion = validate(t, eval_model)
    row.update(scores, seconds=time.perf_counter() - start)
    row = {k: row[k] for k in handlers.HISTORY_COLUMNS}
    state.history.append(row)
    improved = handlers.improvement(t, state, row)
    state.epoch, state.global_step = epoch, t.step.global_step
    return EpochResult(epoch, row, improved, confusion, n_val)


def train_one_epoch(t: Training, epoch: int) -> dict[str, float]:
    s, loader, d = t.step, t.train_loader, t.dist
    s.model.train()
    loader.sampler.set_epoch(epoch)
    lr = s.optimizer.param_groups[0]["lr"]  # at the epoch's first step
    # Loss and correct counts are summed on the device: reading them (.item()) would make every step wait for the
    # accelerator. The progress bar reads them every POSTFIX_EVERY steps only.
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)
    seen, n = 0, t.batches_per_epoch
    start = time.perf_counter()
    desc = f"fold {t.config.fold} epoch {epoch}" if t.config.folds else f"epoch {epoch}"
    bar = tqdm(itertools.islice(loader, n), total=n, desc=desc, leave=False, disable=not d.is_main, unit="batch")
    for i, (x, y) in enumerate(bar):  # --max-train-batches caps smoke runs (islice)
        loss, logits, y = train_step(s, x, y, step_now=(i + 1) % s.grad_accum == 0 or i + 1 == n)
        totals += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double()])
        seen += len(y)
        if (i + 1) % POSTFIX_EVERY == 0 or i + 1 == n:
            bar.set_postfix(loss=f"{totals[0].item() / seen:.4f}")
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = distributed.all_reduce_sum(d, [*totals.tolist(), float(seen)])
    return {"lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen, "images_per_s": seen / seconds}


@torch.inference_mode()
def validate(t: Training, model: nn.Module) -> tuple[dict[str, float], int, np.ndarray]:
    """Metrics over the whole val set (and its confusion matrix): every rank predicts its shard, the logits are
    gathered. ``model`` is the plain module (not the DDP / compiled wrapper): eval mode and a smaller last batch
    would make torch.compile build a second and a third graph for a few seconds of work."""
    d, loader, k = t.dist, t.val_loader, len(t.classes)
    model.eval()
    outputs = []
    for x, _ in loader:
        with autocast(d.device, t.step.amp_dtype):
            outputs.append(model(t.step.normalize(x)).float().cpu())
    logits = torch.cat(outputs) if outputs else torch.empty(0, k)
    _, logits = distributed.gather_rows(d, torch.tensor(loader.sampler.indices), logits)
    labels = np.asarray(loader.dataset.labels)
    confusion = confusion_matrix(labels, logits.argmax(1).numpy(), labels=list(range(k)))
    return val_metrics(labels, logits), len(labels), confusion


def val_metrics(labels: np.ndarray, logits: torch.Tensor) -> dict[str, float]:
    """Loss (plain CE, comparable across recipes) plus the same accuracy, balanced accuracy, macro F1 and
    macro one-vs-rest AUC (over the classes present) that ``skinlesion evaluate`` reports."""
    overall = metrics.point_metrics(labels, torch.softmax(logits.float(), 1).numpy())["overall"]
    return {
        "val_loss": F.cross_entropy(logits.float(), torch.as_tensor(labels)).item(),
        "val_acc": overall["accuracy"],
        "val_balanced_acc": overall["balanced_accuracy"],
        "val_macro_f1": overall["macro_f1"],
        "val_macro_auc": overall["macro_auc"],
    }


def keep_scoring_settings(path: Path, cfg_out: dict[str, Any]) -> None:
    """A --resume may change how later stages score (``pool_lesions``); they read best.pt's config, which is only
    rewritten at a new best epoch, so carry the change over."""
    stored = checkpoint.read(path).get("config") or {}
    if stored.get("pool_lesions") != cfg_out.get("pool_lesions"):
        checkpoint.set_entry(path, "config", {**stored, "pool_lesions": cfg_out.get("pool_lesions")})
