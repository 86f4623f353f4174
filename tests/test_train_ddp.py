"""`torchrun --nproc_per_node 2 -m skinlesion train` on the CPU (gloo): same run-folder contract as a
single process, rank 0 alone writes, validation metrics over the whole val set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import torch

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

    # What a one-process training run writes (tiny_run may have gained evaluate's files from other tests).
    assert files(run) == ["best.pt", "config.json", "history.csv", "last.pt", "splits.csv", "tensorboard"]
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


def launch_two_nodes(synth_dir, tmp_path, *extra: str) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --node-rank 0|1` on 127.0.0.1: two "nodes" with their own --out and image cache, as
    machines with node-local disks would have."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "SKINLESION_CACHE_DIR": str(tmp_path / f"cache{node}")}  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "skinlesion", "train", "--data-dir", str(synth_dir), "--out", str(tmp_path / f"node{node}"),
               "--run-name", "mn", "--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32",
               "--epochs", "2", "--global-batch-size", "32", "--lr", "3e-3", "--workers", "0", "--ema",
               "--logit-adjust-tau", "1", "--logger", "none", *extra]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:  # a hang (one node waiting for the other) must not outlive the test
            p.kill()
    return done


def test_two_nodes_without_a_shared_file_system(synth_dir, tmp_path):
    """Each node keeps its own run folder and cache; rank 0 decides the split and, on --resume, the state (a node
    that lost its copy gets it back); both copies hold the same weights, EMA included (BatchNorm buffers synced),
    and the same post-hoc best.pt. A bad start on rank 0 is an error on every node, not a hang."""
    nothing = launch_two_nodes(synth_dir, tmp_path, "--resume")  # no such run yet
    assert all(p.returncode != 0 for p in nothing)  # torchrun turns the processes' exit 2 into its own 1
    assert "no last.pt" in nothing[0].stderr
    assert "no last.pt" in nothing[1].stderr and "(on rank 0)" in nothing[1].stderr
    first = launch_two_nodes(synth_dir, tmp_path, "--stop-after-epochs", "1")
    assert all(p.returncode == 0 for p in first), first[0].stderr[-2000:] + first[1].stderr[-2000:]
    shutil.rmtree(tmp_path / "node1")  # node 1 was replaced: its disk is empty
    second = launch_two_nodes(synth_dir, tmp_path, "--resume")
    assert all(p.returncode == 0 for p in second), second[0].stderr[-2000:] + second[1].stderr[-2000:]
    node0, node1 = tmp_path / "node0/mn", tmp_path / "node1/mn"

    def files(folder):
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))

    contract = ["best.pt", "config.json", "history.csv", "last.pt", "splits.csv"]  # --logger none: no tensorboard/
    assert files(node0) == files(node1) == contract
    assert (node0 / "splits.csv").read_bytes() == (node1 / "splits.csv").read_bytes()
    assert second[0].stdout.count("epoch 2/2") == 1 and "epoch 2/2" not in second[1].stdout  # rank 0 reports
    assert pd.read_csv(node0 / "history.csv")["epoch"].tolist() == [1, 2]
    assert pd.read_csv(node1 / "history.csv")["epoch"].tolist() == [1, 2]  # the broadcast history, continued
    cfg = json.loads((node0 / "config.json").read_text())
    assert (cfg["world_size"], cfg["batch_size"], cfg["global_batch_size"]) == (2, 16, 32)
    a, b = checkpoint.read(node0 / "last.pt"), checkpoint.read(node1 / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert (node0 / "best.pt").read_bytes() == (node1 / "best.pt").read_bytes()  # logit adjustment included
    for node in (0, 1):  # each node built its own cache, under its own lock
        assert list((tmp_path / f"cache{node}").rglob("index.npz"))
