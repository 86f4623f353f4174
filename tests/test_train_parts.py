"""Pieces of the training engine without a training run: losses, class weights, samplers, metrics, recipes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skinlesion.cli import build_parser
from skinlesion.errors import SkinLesionError
from skinlesion.training.loop import resolve_config, val_metrics
from skinlesion.training.losses import FocalLoss, build_loss, class_weights
from skinlesion.training.sampling import BalancedSampler, ShardSampler


def test_class_weight_schemes():
    counts = [100, 10, 0, 1000]
    assert class_weights(counts, "none") is None
    inv = class_weights(counts, "inverse")
    assert inv[2] == 0 and inv[[0, 1, 3]].mean() == pytest.approx(1.0)
    assert inv[1] / inv[0] == pytest.approx(10.0)
    assert class_weights(counts, "sqrt")[1] / class_weights(counts, "sqrt")[0] == pytest.approx(10**0.5)
    eff = class_weights(counts, "effective", beta=0.999)
    expected = [(1 - 0.999) / (1 - 0.999**n) for n in (100, 10, 1000)]
    assert (eff[1] / eff[0]).item() == pytest.approx(expected[1] / expected[0], rel=1e-5)
    assert eff[3] < eff[0] < eff[1]  # rarer -> heavier, but flatter than inverse
    assert eff[1] / eff[3] < inv[1] / inv[3]
    with pytest.raises(SkinLesionError, match="--class-weights"):
        class_weights(counts, "bogus")


def test_focal_loss_reduces_to_cross_entropy_and_takes_soft_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 7), torch.randint(0, 7, (8,))
    assert FocalLoss(gamma=0)(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert FocalLoss(gamma=2)(logits, y) < F.cross_entropy(logits, y)  # easy examples down-weighted
    soft = F.one_hot(y, 7).float()
    assert FocalLoss(gamma=2)(logits, soft).item() == pytest.approx(FocalLoss(gamma=2)(logits, y).item(), rel=1e-5)
    w = torch.rand(7)
    weighted = build_loss("ce", w, soft_targets=True)(logits, soft)
    assert weighted.item() == pytest.approx(
        (w[y] * F.cross_entropy(logits, y, reduction="none")).mean().item(), rel=1e-5
    )


def test_balanced_sampler_is_balanced_deterministic_and_sharded():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    s = BalancedSampler(labels, seed=3)
    s.set_epoch(1)
    draw = list(s)
    assert list(s) == draw and len(draw) == len(labels)
    freq = np.bincount(np.asarray(labels)[draw], minlength=3) / len(draw)
    assert np.allclose(freq, 1 / 3, atol=0.06)
    s.set_epoch(2)
    assert list(s) != draw
    ranks = [BalancedSampler(labels, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == 500 and sorted(a + b) == sorted(draw)  # the two shards are the one draw
    assert sorted(list(ShardSampler(7, 2, 0)) + list(ShardSampler(7, 2, 1))) == list(range(7))


def test_val_metrics():
    labels = np.array([0, 0, 1, 1, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5]])
    m = val_metrics(labels, logits)
    assert m["val_acc"] == pytest.approx(0.8)
    assert m["val_balanced_acc"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["val_macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1) / 3)
    assert m["val_loss"] == pytest.approx(F.cross_entropy(logits, torch.as_tensor(labels)).item())
    assert 0.5 < m["val_macro_auc"] <= 1


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_recipe_defaults_and_explicit_flags_override():
    cfg = resolve_config(parse())
    assert (cfg["backbone"], cfg["lr"], cfg["weight_decay"], cfg["batch_size"], cfg["epochs"]) == (
        "efficientnet_b0", 3e-4, 1e-4, 32, 20)  # fmt: skip
    assert (cfg["loss"], cfg["select"], cfg["amp"], cfg["channels_last"], cfg["pretrained"]) == (
        "ce", "macro_f1", True, True, True)  # fmt: skip
    improved = resolve_config(parse("--recipe", "improved", "--no-amp"))
    assert improved["recipe"] == "improved" and improved["logit_adjust_tau"] == 1.0 and improved["amp"] is False
    assert (improved["lr"], improved["tta_views"], cfg["tta_views"]) == (1e-3, 8, 4)
    assert resolve_config(parse("--recipe", "improved", "--tta-views", "4", "--lr", "3e-4"))["tta_views"] == 4
    assert resolve_config(parse("--recipe", "improved", "--logit-adjust-tau", "0"))["logit_adjust_tau"] == 0
    assert (improved["metadata_prior"], cfg["metadata_prior"]) == (True, False)
    assert resolve_config(parse("--recipe", "improved", "--no-metadata-prior"))["metadata_prior"] is False
    with pytest.raises(SystemExit):  # the choices are listed in --help and checked when parsed
        parse("--recipe", "fancy")
    with pytest.raises(SkinLesionError, match="--recipe"):  # a namespace built in Python is checked too
        resolve_config(argparse.Namespace(**{**vars(parse()), "recipe": "fancy"}))


def test_each_rank_draws_its_own_augmentation_stream():
    from skinlesion.training.loop import loader_seed

    seeds = {loader_seed(42, epoch, rank) for epoch in range(1, 21) for rank in range(8)}
    assert len(seeds) == 20 * 8  # no two (epoch, rank) pairs share a stream
    assert loader_seed(42, 3, 0) == 42 * 1000 + 3  # one process: the value earlier runs (and their resume) used
