"""Training losses and class-weight schemes for the imbalanced HAM10000 classes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from skinlesion.errors import SkinLesionError

WEIGHT_SCHEMES = ("none", "inverse", "sqrt", "effective")


def class_weights(counts: np.ndarray | list[int], scheme: str, beta: float = 0.999) -> torch.Tensor | None:
    """Per-class loss weights from training-set class counts, normalised to mean 1 over present classes.

    ``inverse``: 1/n; ``sqrt``: 1/sqrt(n); ``effective``: (1 - beta) / (1 - beta**n), the effective number
    of samples (Cui et al., CVPR 2019). Absent classes get weight 0 (they never appear as targets).
    """
    if scheme == "none":
        return None
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    w = np.zeros_like(n)
    if scheme == "inverse":
        w[present] = 1.0 / n[present]
    elif scheme == "sqrt":
        w[present] = 1.0 / np.sqrt(n[present])
    elif scheme == "effective":
        w[present] = (1.0 - beta) / (1.0 - np.power(beta, n[present]))
    else:
        raise SkinLesionError(f"unknown --class-weights {scheme!r}; choose from {', '.join(WEIGHT_SCHEMES)}")
    w[present] /= w[present].mean()
    return torch.tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) with optional per-class weights (the alpha term) and soft targets.

    ``target`` may be class indices or a (N, C) probability matrix (mixup / cutmix / label smoothing):
    loss = -sum_c w_c * t_c * (1 - p_c)**gamma * log p_c, averaged over the batch.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        if target.dim() == 1:
            k = logits.shape[-1]
            target = F.one_hot(target, k).float() * (1 - self.label_smoothing) + self.label_smoothing / k
        loss = -target * (1 - log_p.exp()).pow(self.gamma) * log_p
        if self.weight is not None:
            loss = loss * self.weight
        return loss.sum(-1).mean()


class WeightedSoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against soft targets (mixup / cutmix) with per-class weights."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (-target * F.log_softmax(logits.float(), dim=-1) * self.weight).sum(-1).mean()


def build_loss(
    name: str,
    weight: torch.Tensor | None = None,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
    soft_targets: bool = False,
) -> nn.Module:
    """The training criterion. With ``soft_targets`` (mixup/cutmix) timm's Mixup already applied the
    label smoothing to the targets, so it is not applied again here."""
    if name == "focal":
        return FocalLoss(gamma, weight, 0.0 if soft_targets else label_smoothing)
    if name != "ce":
        raise SkinLesionError(f"unknown --loss {name!r}; choose ce or focal")
    if soft_targets:
        return SoftTargetCrossEntropy() if weight is None else WeightedSoftTargetCrossEntropy(weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
