"""Post-hoc changes that need no retraining: logit adjustment baked into best.pt, and 8-view dihedral TTA."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from skinlesion.cli import main
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.torch_backend import TorchBackend
from skinlesion.inference.views import views as tta_views
from skinlesion.model import checkpoint
from skinlesion.model import logit_adjustment as posthoc


def test_offset_is_minus_log_prior_and_favours_rare_classes():
    counts = [10, 30, 60]
    off = posthoc.offset(counts, tau=1.0)
    np.testing.assert_allclose(off, -np.log([0.1, 0.3, 0.6]))
    np.testing.assert_allclose(posthoc.offset(counts, tau=0.5), off / 2)
    # Equal logits: the adjusted argmax is the rarest class; a class absent from train stays finite.
    assert posthoc.adjust(np.zeros((1, 3)), counts).argmax() == 0
    assert np.isfinite(posthoc.offset([0, 5, 5])).all()


def logits(run, x: torch.Tensor, n_views: int = 1) -> np.ndarray:
    """The network's raw logits, averaged over the first ``n_views`` TTA views."""
    return TorchBackend(run).view_logits(x, n_views).mean(0)


def test_set_logit_adjustment_shifts_every_logit_and_is_idempotent(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    x = torch.randn(4, 3, 64, 64)
    before = logits(run, x)
    config = json.loads((run / "config.json").read_text())
    counts = [config["train_class_counts"][c] for c in Classifier.load(run).classes]

    applied = posthoc.set_logit_adjustment(run, tau=1.0)
    np.testing.assert_allclose(applied, posthoc.offset(counts))
    after = logits(run, x)
    np.testing.assert_allclose(after - before, np.broadcast_to(applied, before.shape), atol=1e-4)
    # TTA averages logits, so the constant offset passes through it unchanged.
    np.testing.assert_allclose(logits(run, x, 4) - logits(tiny_run, x, 4),
                               np.broadcast_to(applied, before.shape), atol=1e-4)  # fmt: skip
    meta = checkpoint.read(run)["logit_adjustment"]
    assert meta["tau"] == 1.0 and meta["offset"] == pytest.approx(applied.tolist())

    posthoc.set_logit_adjustment(run, tau=1.0)  # again: replaces, does not add up
    np.testing.assert_allclose(logits(run, x), after, atol=1e-4)
    posthoc.set_logit_adjustment(run, tau=0.0)  # removes it
    np.testing.assert_allclose(logits(run, x), before, atol=1e-4)


def test_train_flag_stores_the_adjustment(synth_dir, tmp_path):
    flags = ["--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--batch-size", "16",
             "--epochs", "1", "--max-train-batches", "2", "--seed", "0", "--workers", "0"]  # fmt: skip
    rc = main(["train", "--data-dir", str(synth_dir), "--out", str(tmp_path), "--run-name", "la",
               *flags, "--logit-adjust-tau", "1"])  # fmt: skip
    assert rc == 0
    ckpt = checkpoint.read(tmp_path / "la")
    counts = [ckpt["config"]["train_class_counts"][c] for c in ckpt["classes"]]
    assert ckpt["config"]["logit_adjust_tau"] == 1.0
    assert ckpt["logit_adjustment"]["offset"] == pytest.approx(posthoc.offset(counts).tolist())


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = tta_views(x, 8)
    assert len(views) == 8 and [v.shape for v in views] == [x.shape] * 8
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # all distinct
    assert all(torch.equal(a, b) for a, b in zip(views[:4], tta_views(x, 4), strict=True))  # flips come first
    # Closed under rotation: a rotated input gives the same set of views, so the TTA mean is rotation-invariant.
    rotated = torch.rot90(x, 1, dims=(-2, -1))
    assert torch.equal(torch.stack(tta_views(rotated, 8)).sum(0), torch.stack(views).sum(0))
    assert any(torch.equal(rotated, v) for v in views)


def test_a_run_whose_recipe_says_8_views_averages_the_dihedral_views(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["tta_views"] == 4
    ckpt["config"]["tta_views"] = 8
    torch.save(ckpt, run / "best.pt")
    four, eight = Classifier.load(tiny_run), Classifier.load(run)
    assert (four.chain.tta_views, eight.chain.tta_views) == (4, 8)
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        expected = torch.stack([four.backend.model(v) for v in tta_views(x, 8)]).mean(0).numpy()

    def tta_logits(c: Classifier, batch: torch.Tensor) -> np.ndarray:
        return c.chain.logits(c.backend.view_logits(batch, c.n_views(True)))  # T = 1: the mean over the views

    np.testing.assert_allclose(tta_logits(eight, x), expected, atol=1e-5, rtol=1e-5)
    # The 8-view mean is invariant to a 90-degree rotation of the input; the 4-flip mean is not.
    rot = torch.rot90(x, 1, dims=(-2, -1))
    np.testing.assert_allclose(tta_logits(eight, rot), tta_logits(eight, x), atol=1e-4, rtol=1e-4)
    assert not np.allclose(tta_logits(four, rot), tta_logits(four, x), atol=1e-4)
