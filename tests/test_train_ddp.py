"""`torchrun --nproc_per_node 2 -m skinlesion train` on the CPU (gloo): same run-folder contract as a
single process, rank 0 alone writes, validation metrics over the whole val set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from skinlesion.model import checkpoint


def test_two_process_ddp_run(synth_dir, tiny_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "skinlesion", "train", "--data-dir", str(synth_dir), "--out", str(tmp_path), "--run-name", "ddp",
           "--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--epochs", "2",
           "--batch-size", "16", "--lr", "3e-3", "--workers", "0", "--sampler", "balanced"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"

    def files(folder):
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))

    assert files(run) == files(tiny_run)
    assert proc.stdout.count("epoch 2/2") == 1  # rank 0 alone reports (and writes)
    h = pd.read_csv(run / "history.csv")
    assert list(h.columns) == list(pd.read_csv(tiny_run / "history.csv").columns)
    assert h["epoch"].tolist() == [1, 2]

    cfg = json.loads((run / "config.json").read_text())
    n_val = int((pd.read_csv(run / "splits.csv")["split"] == "val").sum())
    assert cfg["world_size"] == 2 and cfg["global_batch_size"] == 32 and cfg["n_val"] == n_val
    last = checkpoint.read(run / "last.pt")
    assert last["metrics"]["n_val"] == n_val  # gathered from both ranks, not one shard
    assert len(last["rng"]) == 2
    correct = h["val_acc"] * n_val  # accuracy over the whole val set is k / n_val
    assert (correct - correct.round()).abs().max() < 1e-6
    assert checkpoint.load(run).model.training is False
