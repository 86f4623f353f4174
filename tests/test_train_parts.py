"""Pieces of the training engine without a training run: losses, class weights, samplers, metrics, recipes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skinlesion.cli import build_parser
from skinlesion.commands.train import train_options
from skinlesion.errors import SkinLesionError
from skinlesion.training.config import TrainConfig
from skinlesion.training.loop import val_metrics
from skinlesion.training.losses import FocalLoss, build_loss, class_weights
from skinlesion.training.rng import loader_seed
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


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    return train_options(args)[0]


def test_recipe_defaults_and_explicit_flags_override():
    cfg = resolve_config(parse())
    assert (cfg.resolved().backbone, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (
        "efficientnet_b0", 3e-4, 1e-4, 32, 20)  # fmt: skip
    assert (cfg.loss, cfg.select, cfg.amp, cfg.channels_last, cfg.pretrained, cfg.logger) == (
        "ce", "macro_f1", True, True, True, "tensorboard")  # fmt: skip
    improved = resolve_config(parse("--recipe", "improved", "--no-amp"))
    assert improved.recipe == "improved" and improved.logit_adjust_tau == 1.0 and improved.amp is False
    assert (improved.lr, improved.tta_views, cfg.tta_views) == (1e-3, 8, 4)
    assert resolve_config(parse("--recipe", "improved", "--tta-views", "4", "--lr", "3e-4")).tta_views == 4
    assert resolve_config(parse("--recipe", "improved", "--logit-adjust-tau", "0")).logit_adjust_tau == 0
    assert (improved.metadata_prior, cfg.metadata_prior) == (True, False)
    assert resolve_config(parse("--recipe", "improved", "--no-metadata-prior")).metadata_prior is False
    # --min-sensitivity: one spelling, repeated or comma-separated, the same in train and operating-point
    both = resolve_config(parse("--min-sensitivity", "mel=0.75", "--min-sensitivity", "bcc=0.8")).min_sensitivity
    assert both == resolve_config(parse("--min-sensitivity", "mel=0.75,bcc=0.8")).min_sensitivity == "mel=0.75,bcc=0.8"
    with pytest.raises(SystemExit):  # the choices are listed in --help and checked when parsed
        parse("--recipe", "fancy")
    with pytest.raises(SkinLesionError, match="--recipe"):  # a config built in Python is checked too
        from skinlesion.training.recipes import recipe

        recipe("fancy")


def test_help_shows_each_recipes_default():
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(out.getvalue().split())
    assert "learning rate (reference 0.0003, improved 0.001)" in text
    assert "(reference 4, improved 8)" in text and "post-hoc steps" in text and "class imbalance" in text
    assert "training epochs (default 20)" in text


def test_each_rank_draws_its_own_augmentation_stream():
    seeds = {loader_seed(42, epoch, rank) for epoch in range(1, 21) for rank in range(8)}
    assert len(seeds) == 20 * 8  # no two (epoch, rank) pairs share a stream
    assert loader_seed(42, 3, 0) == 42 * 1000 + 3  # rank 0: the single-process value


@pytest.mark.parametrize("augment", ["reference", "dermoscopy"])
def test_uint8_presets_normalised_on_the_device_equal_torchvisions_normalize(augment):
    """The presets stop at uint8 crops; BatchNormalizer (one multiply-add) equals torchvision's ToDtype + Normalize
    on them (to 1e-6), for the training presets and the evaluation crop."""
    from torchvision.transforms import v2

    from skinlesion.data.preprocessing import Preprocessing

    prep = Preprocessing(64, 73, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    rng = np.random.default_rng(0)
    pixels = [torch.from_numpy(rng.integers(0, 256, (3, 73, 97), dtype=np.uint8)) for _ in range(4)]
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(prep.mean), list(prep.std))])
    normalize = prep.normalizer()
    for preset in (prep.train_transform(augment), prep.eval_transform()):
        batch = []
        for i, p in enumerate(pixels):
            torch.manual_seed(i)
            batch.append(preset(p))
        batch = torch.stack(batch)
        assert batch.dtype == torch.uint8 and batch.shape[-2:] == (64, 64)
        out = normalize(batch)
        assert out.dtype == torch.float32
        assert (out - torch.stack([reference(x) for x in batch])).abs().max().item() <= 1e-6
    assert torch.equal(normalize(out), out)  # float batches pass through


def test_seeded_samples_augment_the_same_with_any_worker_count_and_epoch_by_epoch():
    """Each sample's augmentation comes from its (seed, epoch, rank, position) seed: 0 workers, 2 persistent
    workers, or a loader rebuilt at epoch 2 (--resume) give the same batches; epochs and ranks differ."""
    from torch.utils.data import DataLoader, Dataset

    from skinlesion.data.dataset import LesionDataset
    from skinlesion.training.sampling import SeededSampler

    class Noise(Dataset):  # what LesionDataset does with an (index, seed) key, on a tiny random "image"
        def __len__(self):
            return 12

        __getitem__ = LesionDataset.__getitem__
        item = LesionDataset.item

        def load(self, i):
            return torch.full((3, 8, 8), i, dtype=torch.uint8)

        labels = list(range(12))
        transform = staticmethod(lambda x: x.float() + torch.rand(3, 8, 8))

    def epochs(workers, rank=0, first=1, last=2):
        inner = torch.utils.data.DistributedSampler(range(12), num_replicas=2, rank=rank, seed=0)
        sampler = SeededSampler(inner, lambda epoch: loader_seed(7, epoch, rank))
        loader = DataLoader(Noise(), batch_size=3, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))  # fmt: skip
        out = {}
        for epoch in range(first, last + 1):
            sampler.set_epoch(epoch)
            out[epoch] = torch.cat([x for x, _ in loader])
        return out

    torch.manual_seed(123)
    before = torch.get_rng_state()
    straight = epochs(0)
    assert torch.equal(torch.get_rng_state(), before)  # the transforms leave the process's RNG alone
    persistent = epochs(2)
    resumed = epochs(2, first=2)
    for epoch in (1, 2):
        assert torch.equal(straight[epoch], persistent[epoch])
    assert torch.equal(straight[2], resumed[2])
    noise = [straight[e] - straight[e].floor() for e in (1, 2)]
    assert not torch.allclose(noise[0], noise[1])  # a new epoch, new crops and flips
    other_rank = epochs(0, rank=1)[1]
    assert not torch.allclose(other_rank - other_rank.floor(), noise[0])


def test_ranks_come_from_torchrun_or_slurm_and_the_slurm_node_list_is_read():
    from skinlesion.training.distributed import first_slurm_host, ranks_from_env

    assert ranks_from_env({}) is None
    assert ranks_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert ranks_from_env({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}) == (5, 8, 1)
    slurm = {"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    assert ranks_from_env(slurm) == (9, 16, 1)  # `srun python -m skinlesion train`: one task per GPU
    assert ranks_from_env({**slurm, "WORLD_SIZE": "2", "RANK": "1"}) == (1, 2, 0)  # srun torchrun: torchrun's
    # the batch script itself (asked for 16 tasks, but it is one process outside any srun step)
    assert ranks_from_env({"SLURM_NTASKS": "16", "SLURM_PROCID": "0"}) is None
    assert first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_slurm_host("node7") == "node7"


def test_an_existing_process_group_is_adopted(monkeypatch):
    import torch.distributed as dist

    from skinlesion.training import distributed

    for key in ("WORLD_SIZE", "RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        d = distributed.setup("cpu")  # no torchrun variables: the caller's group (Ray Train, Fabric) decides
        assert dist.is_initialized() and (d.rank, d.world_size, d.writes) == (0, 1, True)
        assert distributed.from_main(d, lambda: 41) == 41
        distributed.teardown(d)
        assert dist.is_initialized()  # the caller's group stays theirs
    finally:
        dist.destroy_process_group()


def test_global_batch_size_sets_the_per_process_batch(synth_dir, tmp_path, capsys):
    import json

    from skinlesion.cli import main

    flags = ["train", "--data-dir", str(synth_dir), "--out", str(tmp_path), "--backbone", "test_efficientnet",
             "--no-pretrained", "--img-size", "32", "--epochs", "1", "--max-train-batches", "1", "--workers", "0",
             "--logger", "none"]  # fmt: skip
    assert main([*flags, "--run-name", "odd", "--global-batch-size", "30", "--grad-accum", "4"]) == 2
    assert "--global-batch-size 30" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()  # a failed start leaves no run folder
    assert main([*flags, "--run-name", "g", "--global-batch-size", "24", "--grad-accum", "2"]) == 0
    cfg = json.loads((tmp_path / "g/config.json").read_text())
    assert (cfg["batch_size"], cfg["global_batch_size"], cfg["grad_accum"]) == (12, 24, 2)
