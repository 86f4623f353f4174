"""The training engine end to end from the CLI: run-folder contract, resume, reproducibility, the
past-the-reference flags, learning, local weights, early stopping and other backbones.

Runs are tiny (32-64 px, a few batches) so the file stays fast on two CPU cores; DDP is in test_train_ddp.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skinlesion import fileio
from skinlesion.cli import main
from skinlesion.model import checkpoint
from skinlesion.training.handlers import HISTORY_COLUMNS

# A timm test model (100k parameters): every flag gets exercised in seconds.
FAST = ["--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--batch-size", "16",
        "--lr", "3e-3", "--seed", "0", "--workers", "0"]  # fmt: skip


def train(synth_dir, out, name, *flags) -> int:
    return main(["train", "--data-dir", str(synth_dir), "--out", str(out), "--run-name", name, *flags])


def history(run) -> pd.DataFrame:
    return pd.read_csv(run / "history.csv")


def test_tiny_run_is_the_run_folder_contract(tiny_run):
    h = history(tiny_run)
    assert list(h.columns) == HISTORY_COLUMNS
    assert h["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert (h["images_per_s"] > 0).all() and (h["lr"] > 0).all()

    splits = pd.read_csv(tiny_run / "splits.csv")
    assert list(splits.columns) == ["image_id", "lesion_id", "dx", "split", "group_id", "source"]
    assert set(splits["split"]) == {"train", "val"}
    assert not set(splits.query("split == 'train'").lesion_id) & set(splits.query("split == 'val'").lesion_id)

    cfg = json.loads((tiny_run / "config.json").read_text())
    for key in ("data_dir", "metadata", "images", "backbone", "img_size", "resize_size", "mean", "std", "lr",
                "epochs", "batch_size", "seed", "loss", "sampler", "recipe", "versions", "amp_dtype"):  # fmt: skip
        assert key in cfg, key
    assert (cfg["backbone"], cfg["img_size"], cfg["resize_size"], cfg["recipe"]) == (
        "efficientnet_b0",
        64,
        73,
        "reference",
    )
    assert cfg["n_val"] == (splits["split"] == "val").sum()

    best = checkpoint.read(tiny_run)
    assert best["splits_sha256"] == fileio.sha256_file(tiny_run / "splits.csv")
    assert best["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert best["epoch"] == int(h.loc[h["val_macro_f1"].idxmax(), "epoch"])  # first best by macro F1
    assert best["metrics"]["val_macro_f1"] == pytest.approx(h["val_macro_f1"].max())
    assert best["metrics"]["n_val"] == cfg["n_val"]
    assert best["config"]["lr"] == 3e-3 and best["versions"]["timm"]
    last = checkpoint.read(tiny_run / "last.pt")
    assert last["epoch"] == 6
    assert {"optimizer", "scheduler", "scaler", "rng", "ema", "train_state"} <= set(last)
    assert {"python", "numpy", "torch"} <= set(last["rng"][0])

    loaded = checkpoint.load(tiny_run)  # rebuilds from the checkpoint alone
    assert loaded.model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_resume_continues_exactly_and_same_seed_repeats(synth_dir, tmp_path):
    """4 epochs straight == 2 epochs (interrupted) + --resume; EMA, grad-accum, warm-up, clipping and a head-only
    warm-up that ends after the resume (epoch 3) on. The straight run and the first half use 2 persistent loader
    workers, the resumed half none: augmentations depend on neither."""
    flags = [*FAST, "--epochs", "4", "--ema", "--ema-decay", "0.9", "--grad-accum", "2", "--warmup-epochs", "1",
             "--clip-grad", "1.0", "--max-train-batches", "5", "--head-warmup-epochs", "3",
             "--workers", "2"]  # fmt: skip
    assert train(synth_dir, tmp_path, "straight", *flags) == 0
    assert train(synth_dir, tmp_path, "resumed", *flags, "--stop-after-epochs", "2") == 0
    assert len(history(tmp_path / "resumed")) == 2
    # same seed and data -> same split and same first-epoch training loss
    assert (tmp_path / "straight/splits.csv").read_bytes() == (tmp_path / "resumed/splits.csv").read_bytes()
    assert history(tmp_path / "resumed")["train_loss"][0] == history(tmp_path / "straight")["train_loss"][0]
    # without --resume an existing run is never overwritten
    assert train(synth_dir, tmp_path, "resumed", *flags) == 2
    assert train(synth_dir, tmp_path, "resumed", "--resume", "--lr", "1e-2") == 2  # recipe flags are frozen
    assert train(synth_dir, tmp_path, "resumed", "--resume", "--workers", "0") == 0

    a, b = history(tmp_path / "straight"), history(tmp_path / "resumed")
    assert b["epoch"].tolist() == [1, 2, 3, 4]
    cols = ["lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-4, atol=1e-5)
    for name in ("last.pt", "best.pt"):
        sa, sb = checkpoint.read(tmp_path / "straight" / name), checkpoint.read(tmp_path / "resumed" / name)
        assert sa["epoch"] == sb["epoch"]
        for key, value in sa["model"].items():
            torch.testing.assert_close(value, sb["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    last = checkpoint.read(tmp_path / "resumed/last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items()}
    assert set(ema) == set(last["model"])
    assert any(not torch.equal(v, ema[k]) for k, v in last["model"].items() if v.is_floating_point())


def test_head_only_warmup_leaves_the_backbone_alone():
    """While frozen, an AdamW step moves the classifier and no backbone weight; unfrozen, both move."""
    import timm
    from timm.scheduler import CosineLRScheduler

    from skinlesion.training.builders import param_groups, set_backbone_frozen

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=7)  # no BatchNorm: weights are all an optimiser moves
    optimizer = torch.optim.AdamW(param_groups(model, 1.0), lr=1e-2, weight_decay=0.1)
    scheduler = CosineLRScheduler(optimizer, t_initial=10, warmup_t=2, warmup_lr_init=1e-4, warmup_prefix=True,
                                  t_in_epochs=False)  # fmt: skip
    head = {id(p) for p in model.get_classifier().parameters()}

    def step() -> dict[str, bool]:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        moved = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
        return {part: any(m for (n, p), m in zip(model.named_parameters(), moved.values(), strict=True)
                          if (id(p) in head) == (part == "head")) for part in ("head", "body")}  # fmt: skip

    set_backbone_frozen(optimizer, scheduler, 0, frozen=True)
    assert optimizer.param_groups[0]["lr"] == 0 and optimizer.param_groups[1]["lr"] == pytest.approx(1e-4)
    assert step() == {"head": True, "body": False}
    set_backbone_frozen(optimizer, scheduler, 1, frozen=False)
    assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"] > 0
    assert step() == {"head": True, "body": True}


def test_imbalance_and_regularisation_flags(synth_dir, tmp_path):
    """focal + effective-number class weights + balanced sampler + mixup/cutmix + smoothing, fp32 NCHW."""
    flags = [*FAST, "--epochs", "2", "--loss", "focal", "--gamma", "2", "--class-weights", "effective",
             "--sampler", "balanced", "--mixup", "0.2", "--cutmix", "1.0", "--label-smoothing", "0.1",
             "--no-amp", "--no-channels-last", "--augment", "dermoscopy", "--head-lr-mult", "10",
             "--select", "val_loss", "--max-train-batches", "4"]  # fmt: skip
    assert train(synth_dir, tmp_path, "flags", *flags) == 0
    run = tmp_path / "flags"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["loss"], cfg["sampler"], cfg["class_weights"], cfg["mixup"], cfg["cutmix"]) == (
        "focal", "balanced", "effective", 0.2, 1.0)  # fmt: skip
    assert cfg["amp_dtype"] is None and cfg["channels_last"] is False
    assert np.mean(list(cfg["class_weight_values"].values())) == pytest.approx(1.0)
    h = history(run)
    assert np.isfinite(h[HISTORY_COLUMNS].to_numpy()).all()
    best = checkpoint.read(run)
    assert best["select"] == "val_loss" and best["metrics"]["val_loss"] == pytest.approx(h["val_loss"].min())


def test_improved_recipe_and_patience(synth_dir, tmp_path):
    """--recipe improved supplies its defaults. With lr 1e-12 (0 is refused) a model without BatchNorm does not
    change, so it never improves after epoch 1 and --patience 1 stops after epoch 2."""
    flags = [*FAST, "--backbone", "test_vit", "--recipe", "improved", "--epochs", "5", "--lr", "1e-12",
             "--patience", "1", "--max-train-batches", "1"]  # fmt: skip
    assert train(synth_dir, tmp_path, "stop", *flags) == 0
    cfg = json.loads((tmp_path / "stop/config.json").read_text())
    assert (cfg["recipe"], cfg["logit_adjust_tau"], cfg["lr"]) == ("improved", 1.0, 1e-12)
    best = checkpoint.read(tmp_path / "stop")
    assert best["logit_adjustment"]["tau"] == 1.0  # prior correction in best.pt
    assert best["metadata_prior"]["n_fit"] == cfg["n_train"]  # and the age / sex / site prior
    assert history(tmp_path / "stop")["epoch"].tolist() == [1, 2]


def test_compile_flag_wraps_the_model(synth_dir, tmp_path, monkeypatch):
    """--compile goes through torch.compile (stubbed here: inductor takes ~45 s to compile on 2 cores)."""
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert train(synth_dir, tmp_path, "c", *FAST, "--compile", "--epochs", "1", "--max-train-batches", "1") == 0
    assert calls == ["EfficientNet"]


def test_learning_check(synth_dir, tmp_path):
    """From scratch at 64 px, a few epochs on the CPU separate the synthetic classes (macro F1 >= 0.9).
    resnet10t (5M parameters) rather than efficientnet_b0: from scratch it gets there in ~5 epochs, b0 needs 10+."""
    flags = ["--backbone", "resnet10t", "--no-pretrained", "--img-size", "64", "--epochs", "5",
             "--batch-size", "16", "--lr", "3e-3", "--seed", "0", "--workers", "0"]  # fmt: skip
    assert train(synth_dir, tmp_path, "learn", *flags) == 0
    assert history(tmp_path / "learn")["val_macro_f1"].max() >= 0.9


@pytest.mark.parametrize("backbone", ["densenet121", "convnext_atto", "vit_tiny_patch16_224"])
def test_other_backbones(synth_dir, tmp_path, backbone):
    flags = ["--backbone", backbone, "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--epochs", "1",
             "--max-train-batches", "1", "--workers", "0"]  # fmt: skip
    assert train(synth_dir, tmp_path, backbone, *flags) == 0
    loaded = checkpoint.load(tmp_path / backbone)
    assert loaded.meta["backbone"] == backbone
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_local_weights_from_the_cli(synth_dir, tmp_path):
    """--weights lite0 (EfficientNet-PyTorch keys) and a timm-format .safetensors file both load."""
    from safetensors.torch import save_file

    from skinlesion.model.factory import lite0_weights_path, read_state_dict

    flags = ["--img-size", "32", "--epochs", "1", "--max-train-batches", "1", "--lr", "1e-6", "--workers", "0"]
    assert train(synth_dir, tmp_path, "lite0", "--backbone", "tf_efficientnet_lite0", "--weights", "lite0", *flags) == 0
    source = read_state_dict(lite0_weights_path())
    trained = checkpoint.read(tmp_path / "lite0")["model"]
    torch.testing.assert_close(trained["conv_stem.weight"], source["_conv_stem.weight"], atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "lite0/config.json").read_text())["weights_path"] == str(lite0_weights_path())

    # timm format, with a 1000-class head that must be dropped
    import timm

    donor = timm.create_model("test_efficientnet", num_classes=1000)
    save_file(donor.state_dict(), str(tmp_path / "donor.safetensors"))
    assert train(synth_dir, tmp_path, "timm", "--backbone", "test_efficientnet", "--weights",
                 str(tmp_path / "donor.safetensors"), *flags) == 0  # fmt: skip
    trained = checkpoint.read(tmp_path / "timm")["model"]
    torch.testing.assert_close(trained["conv_stem.weight"], donor.state_dict()["conv_stem.weight"], atol=1e-4, rtol=0)


def test_offline_default_weights_is_one_clear_error(synth_dir, tmp_path):
    """The default (hub weights) with no network and an empty cache: exit 2 naming both ways out."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "skinlesion", "train", "--data-dir", str(synth_dir), "--out", str(tmp_path),
         "--run-name", "offline", "--img-size", "32", "--workers", "0"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "efficientnet_b0" in message
    assert "--weights" in message and "--no-pretrained" in message
    assert not (tmp_path / "offline/history.csv").exists()


@pytest.mark.parametrize("point", [("best.pt", 1), ("history.csv", 1), ("last.pt", 1), ("history.csv", 2),
                                   ("last.pt", 2)])  # fmt: skip
def test_a_kill_at_any_write_resumes_to_the_same_history(synth_dir, tmp_path, monkeypatch, point):
    """last.pt is each epoch's commit point: a run killed while writing any file of epoch N continues (with
    --resume, or afresh when no epoch was committed) to the history an uninterrupted run writes."""
    from skinlesion.training import handlers

    flags = [*FAST, "--epochs", "2", "--max-train-batches", "2"]
    assert train(synth_dir, tmp_path, "straight", *flags) == 0
    name, epoch = point
    save, write_csv = handlers.checkpoint.save, handlers.fileio.write_csv

    def killing_save(path, model, meta):
        if Path(path).name == name and meta["epoch"] == epoch:
            raise RuntimeError("killed")
        return save(path, model, meta)

    def killing_write_csv(path, frame):
        if Path(path).name == name and len(frame) == epoch:
            raise RuntimeError("killed")
        return write_csv(path, frame)

    with monkeypatch.context() as m:
        m.setattr(handlers.checkpoint, "save", killing_save)
        m.setattr(handlers.fileio, "write_csv", killing_write_csv)
        with pytest.raises(RuntimeError, match="killed"):
            train(synth_dir, tmp_path, "killed", *flags)
    committed = (tmp_path / "killed" / "last.pt").is_file()
    assert committed == (epoch == 2)
    assert train(synth_dir, tmp_path, "killed", *(["--resume", "--workers", "0"] if committed else flags)) == 0
    a, b = history(tmp_path / "straight"), history(tmp_path / "killed")
    assert b["epoch"].tolist() == [1, 2]
    cols = ["lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-4, atol=1e-5)
    assert checkpoint.read(tmp_path / "killed" / "last.pt")["history"][-1]["epoch"] == 2


def test_resume_on_a_machine_that_needs_fp16_and_a_grad_scaler(synth_dir, tmp_path, monkeypatch, capsys):
    """A run started in bf16 / fp32 (empty scaler state) resumed where AMP means fp16 + GradScaler (an older GPU)."""
    import skinlesion.training.builders as builders

    flags = [*FAST, "--epochs", "2", "--max-train-batches", "2"]
    assert train(synth_dir, tmp_path, "moved", *flags, "--stop-after-epochs", "1") == 0
    assert checkpoint.read(tmp_path / "moved" / "last.pt")["scaler"] in ({}, None)
    monkeypatch.setattr(builders, "amp_dtype", lambda device: torch.float16)  # what a V100 / T4 gets
    assert train(synth_dir, tmp_path, "moved", "--resume") == 0
    assert "the scaler starts fresh" in capsys.readouterr().err
    assert history(tmp_path / "moved")["epoch"].tolist() == [1, 2]
    assert checkpoint.read(tmp_path / "moved" / "last.pt")["scaler"]  # the fp16 epoch saved its scaler state


def test_device_resident_cache_trains_exactly_like_the_loader(synth_dir, tmp_path, capsys):
    """--device-cache (pixels held on the device, the preset run there per sample under the same seeds) gives the
    DataLoader path's history on the CPU, dermoscopy augmentation included; without the image cache it is refused."""
    flags = [*FAST, "--epochs", "2", "--augment", "dermoscopy", "--logger", "none"]
    assert train(synth_dir, tmp_path, "loader", *flags, "--workers", "2") == 0
    assert train(synth_dir, tmp_path, "device", *flags, "--device-cache") == 0
    a, b = history(tmp_path / "loader"), history(tmp_path / "device")
    cols = [c for c in HISTORY_COLUMNS if c not in ("seconds", "images_per_s")]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert json.loads((tmp_path / "device/config.json").read_text())["device_cache"] is True
    assert train(synth_dir, tmp_path, "nocache", *flags, "--device-cache", "--no-cache") == 2
    assert "--device-cache" in capsys.readouterr().err
