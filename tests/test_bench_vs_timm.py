"""benchmarks/vs_timm.py (`bench_train.py --vs-timm`) without the network: the same images written twice, and the
phases read from both trainers' time-stamped output (a fake timm train.py stands in for the fetched one)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vs_timm  # noqa: E402


def test_same_images_for_both_trainers(synth_dir, tmp_path):
    ham, splits_csv, folder = vs_timm.same_images(str(synth_dir), 60, tmp_path)
    splits = pd.read_csv(splits_csv)
    assert 40 <= len(splits) <= 60 and set(splits["split"]) == {"train", "val"}
    # No lesion on both sides (the split is lesion-grouped), and every image in exactly one place of each copy.
    assert not set(splits[splits.split == "train"].lesion_id) & set(splits[splits.split == "val"].lesion_id)
    imagefolder = {p.stem: (p.parent.parent.name, p.parent.name) for p in folder.rglob("*.jpg")}
    expected = {r.image_id: ({"train": "train", "val": "validation"}[r.split], r.dx) for r in splits.itertuples()}
    assert imagefolder == expected
    metadata = pd.read_csv(ham / "HAM10000_metadata.csv")
    assert sorted(metadata["image_id"]) == sorted(splits["image_id"])
    assert sorted(p.stem for p in (ham / "images").iterdir()) == sorted(splits["image_id"])


FAKE_TIMM = """
import sys, time
time.sleep(0.3)  # start-up
for epoch in range(2):
    print(f"Train: {epoch} [   0/3 ( 33%)]  Loss: 2.0", flush=True)
    time.sleep(0.4)
    print(f"Train: {epoch} [   2/3 (100%)]  Loss: 1.9", flush=True)
    print("Test: [   1/1]  Time: 0.1", flush=True)
    print("Current checkpoints:", flush=True)
    print(" ('out/checkpoint-0.pth.tar', 10.0)", flush=True)
time.sleep(0.2)
print("--result", flush=True)
"""

FAKE_SKINLESION = """
import sys, time
time.sleep(0.2)
print("run folder r: efficientnet_b0 224px", flush=True)
for epoch in (1, 2):
    sys.stderr.write(f"\\repoch {epoch}:   0%|   | 0/3"); sys.stderr.flush()
    time.sleep(0.2 if epoch == 1 else 0.0)
    sys.stderr.write(f"\\repoch {epoch}:  33%|#  | 1/3 [00:01<00:02]"); sys.stderr.flush()
    time.sleep(0.5 if epoch == 1 else 0.3)
    sys.stderr.write(f"\\repoch {epoch}: 100%|###| 3/3"); sys.stderr.flush()
    print(f"epoch {epoch}/2  train loss 1.9 acc 0.3 | val loss 1.8", flush=True)
"""


@pytest.mark.parametrize("side", ["timm", "skinlesion"])
def test_phases_from_time_stamped_output(side, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(FAKE_TIMM if side == "timm" else FAKE_SKINLESION))
    timed = vs_timm.run_timed([sys.executable, str(script)], tmp_path, dict(os.environ))
    assert timed.returncode == 0
    markers = ((vs_timm.TIMM_FIRST_STEP, vs_timm.TIMM_EPOCH_END) if side == "timm" else
               (vs_timm.SKINLESION_FIRST_STEP, vs_timm.SKINLESION_EPOCH_END))  # fmt: skip
    p = vs_timm.phases(timed, *markers)
    assert p["epochs"] == 2
    if side == "timm":  # start-up 0.3 s, each epoch about 0.4 s, 0.2 s after the last
        assert 0.25 < p["startup"] < p["total"] and 0.35 < p["epoch1"] < 1.5 and 0.35 < p["steady"] < 1.5
    else:  # the first step of epoch 1 is 0.2 s slower; the carriage-return progress lines are read as lines
        assert 0.35 < p["startup"] < 1.5 and 0.45 < p["epoch1"] < 1.5 and 0.25 < p["steady"] < 1.2
    assert p["total"] == pytest.approx(p["startup"] + p["epoch1"] + p["steady"] + p["end"], abs=1e-6)


def test_phases_without_markers_say_what_was_printed(tmp_path):
    timed = vs_timm.Timed([(0.1, "Traceback (most recent call last):"), (0.2, "ValueError: bad")], 0.3, 1)
    with pytest.raises(RuntimeError, match="exit 1"):
        vs_timm.phases(timed, vs_timm.TIMM_FIRST_STEP, vs_timm.TIMM_EPOCH_END)


def test_commands_train_the_same_thing(tmp_path):
    args = SimpleNamespace(img_size=224, batch_size=32, epochs=2, workers=2)
    timm = vs_timm.timm_command(Path("train.py"), tmp_path / "if", tmp_path / "o", args, vs_timm.TIMM_BEST_CPU_FLAGS)
    ours = vs_timm.skinlesion_command(tmp_path / "ham", tmp_path / "s.csv", tmp_path / "o", args)
    for cmd, size, batch in ((timm, "--img-size", "-b"), (ours, "--img-size", "--batch-size")):
        assert cmd[cmd.index(size) + 1] == "224" and cmd[cmd.index(batch) + 1] == "32"
        assert cmd[cmd.index("--epochs") + 1] == "2" and cmd[cmd.index("--workers") + 1] == "2"
    assert "efficientnet_b0" in timm and "efficientnet_b0" in ours and "--no-pretrained" in ours
    assert "--pretrained" not in timm and "--amp-dtype" in timm and "--channels-last" in timm
    assert vs_timm.timm_train_py(str(tmp_path / "given.py"), tmp_path) == tmp_path / "given.py"


def test_timm_gets_its_fastest_flags_for_this_cpu(monkeypatch):
    """bf16 autocast for timm only where skinlesion itself would train in bf16 (native); else fp32 + channels_last,
    since emulated bf16 would make timm ~10x slower and the comparison meaningless."""
    import torch

    from skinlesion import device

    monkeypatch.setattr(device, "amp_dtype", lambda d: torch.bfloat16)
    assert vs_timm.best_timm_flags() == ("--amp", "--amp-dtype", "bfloat16", "--channels-last")
    monkeypatch.setattr(device, "amp_dtype", lambda d: None)
    assert vs_timm.best_timm_flags() == ("--channels-last",)
