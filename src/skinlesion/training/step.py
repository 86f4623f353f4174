"""One training step, the same for the training loop and the benchmarks: a uint8 batch normalised on its device,
Mixup / CutMix, forward under autocast, the loss scaled for accumulation (and fp16's GradScaler), and on the last
micro-batch of an accumulation the optimizer step: gradient clipping, the scaler's step and update, the per-update
learning-rate schedule and the EMA of the weights."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn

from skinlesion.data.transforms import BatchNormalizer
from skinlesion.device import autocast


@dataclass
class Stepper:
    """What a step needs, built once per run (training/builders.py)."""

    model: nn.Module  # what the step runs: the plain module, or its DDP / compiled wrapper
    plain: nn.Module  # the plain module (the EMA follows it)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm scheduler: step_update(global_step) after each optimizer step
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    normalize: BatchNormalizer
    device: torch.device
    amp_dtype: torch.dtype | None = None
    mixup: Mixup | None = None
    ema: ModelEmaV3 | None = None
    grad_accum: int = 1
    clip_grad: float | None = None
    distributed: bool = False
    global_step: int = 0  # optimizer steps taken so far in the run


def train_step(s: Stepper, x: torch.Tensor, y: torch.Tensor, step_now: bool = True) -> tuple[torch.Tensor, ...]:
    """One micro-batch (``x`` uint8 or float, ``y`` class indices); with ``step_now`` the optimizer step that closes
    the accumulation. Returns the detached loss, logits and the labels on the device."""
    x = s.normalize(x)
    y = y.to(s.device, non_blocking=True)
    x, target = s.mixup(x, y) if s.mixup is not None else (x, y)
    # Gradients of a micro-batch that does not step stay local: DDP all-reduces once per optimizer step.
    no_sync = s.model.no_sync() if s.distributed and not step_now else contextlib.nullcontext()
    with no_sync:
        with autocast(s.device, s.amp_dtype):
            logits = s.model(x)
            loss = s.criterion(logits, target)
        s.scaler.scale(loss / s.grad_accum).backward()
    if step_now:
        optimizer_step(s)
    return loss.detach(), logits.detach(), y


def optimizer_step(s: Stepper) -> None:
    if s.clip_grad:
        s.scaler.unscale_(s.optimizer)
        nn.utils.clip_grad_norm_(s.model.parameters(), s.clip_grad)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    s.global_step += 1
    s.scheduler.step_update(s.global_step)
    if s.ema is not None:
        s.ema.update(s.plain, step=s.global_step)
