"""benchmarks/gpu_session.sh --smoke: every section runs on the CPU and summary.json says what it measured or why not.

One smoke session (about a minute on 2 cores) is shared by the tests of this file; bench_data.py's report line is
checked on the synthetic folder the session wrote.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("deps", "env", "data", "train_speed", "loader", "train", "infer")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> tuple[Path, Path, dict]:
    out = tmp_path_factory.mktemp("gpu_session_out")
    work = tmp_path_factory.mktemp("gpu_session_work")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SESSION_WORK": str(work), "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["nice", "-n", "10", "bash", "benchmarks/gpu_session.sh", "--smoke", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, work, json.loads((out / "summary.json").read_text())


def positive(value) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_every_section_has_numbers_or_a_reason(session):
    _, _, summary = session
    assert summary["mode"] == "smoke"
    assert set(SECTIONS) <= set(summary["sections"])
    for name in SECTIONS:
        entry = summary["sections"][name]
        assert entry["status"] in ("ok", "partial", "skipped", "failed"), name
        if entry["status"] != "ok":
            assert entry["reason"], name
            assert summary["skipped"][name] == entry["reason"]
        assert entry["status"] in ("ok", "partial"), f"{name}: {entry['reason']}"  # on the CPU every section runs
        for row in entry.get("results", []):
            parts = [row[p] for p in ("originals", "cache") if p in row] or [row]  # loader rows: one part per path
            measured = [part.get("images_per_s") for part in parts]
            if any(v is not None for v in measured):
                assert all(positive(v) for v in measured), (name, row)
            else:
                assert row.get("reason"), (name, row)
    for key, reason in summary["skipped"].items():
        assert isinstance(reason, str) and reason, key


def test_env_and_gpu_only_numbers_are_null_with_a_reason(session):
    _, _, summary = session
    env = summary["sections"]["env"]
    assert env["torch"] and env["python"] and positive(env["cpu_count"])
    if not env["cuda_available"]:  # a smoke run on a GPU machine still lists the GPU; its numbers stay CPU ones
        assert env["gpu"] is None and summary["skipped"]["env.gpu"]
    speed = {(r["variant"], r["batch_size"]): r for r in summary["sections"]["train_speed"]["results"]}
    assert {v for v, _ in speed} == {"fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile"}
    assert positive(speed[("fp32", 2)]["images_per_s"]) and positive(speed[("fp32", 2)]["step_ms"])
    assert all(r["images_per_s"] is None and r["reason"] for (v, _), r in speed.items() if v.endswith("compile"))
    util = summary["sections"]["train"]["gpu_util"]
    assert util["mean"] is None and util["p50"] is None and util["reason"]
    assert summary["skipped"]["infer.torch_compile"]


def test_loader_section_measures_worker_cpu(session):
    _, _, summary = session
    loader = summary["sections"]["loader"]
    (row,) = loader["results"]
    assert row["workers"] == 1
    for path in ("originals", "cache"):
        assert positive(row[path]["images_per_s"]) and positive(row[path]["images_per_worker_cpu_s"])
    assert positive(row["cache_vs_originals"])


def test_train_section_ran_and_reports_history_csv(session):
    out, _, summary = session
    train = summary["sections"]["train"]
    assert train["status"] == "ok" and train["returncode"] == 0
    assert train["history_csv"].endswith("history.csv")
    rows = list(csv.DictReader((out / "train_history.csv").open()))
    assert len(rows) == len(train["epochs"]) == 2
    assert train["images_per_s"] == pytest.approx(float(rows[-1]["images_per_s"]))
    assert train["epoch_seconds"] == pytest.approx([float(r["seconds"]) for r in rows])
    assert all(positive(e["images_per_s"]) and positive(e["seconds"]) for e in train["epochs"])
    assert train["run_config"]["device_used"] == "cpu"


def test_infer_section_times_the_trained_run(session):
    _, _, summary = session
    infer = summary["sections"]["infer"]
    eager = [r for r in infer["results"] if r["backend"] == "torch_eager"]
    assert [r["batch_size"] for r in eager] == [1, 4]
    assert all(positive(r["latency_ms_p50"]) and positive(r["images_per_s"]) for r in eager)
    ort = [r for r in infer["results"] if r["backend"].startswith("onnxruntime")]
    assert ort or summary["skipped"].get("infer.onnxruntime")


def test_output_folder_fits_the_device_tool(session):
    out, _, _ = session
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    assert {"summary.json", "session.log", "train_history.csv"} <= {p.name for p in files}


def test_bench_data_reports_cache_vs_originals(session, tmp_path, capsys):
    _, work, _ = session
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_data
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    result = bench_data.main(
        ["--data-dir", str(work / "synth"), "--img-size", "64", "--batch-size", "8", "--workers", "0",
         "--rounds", "1", "--paths", "originals,cache", "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"cache vs originals: \d+\.\d\dx .*", lines[-1])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["ratios"] == result["ratios"]
    assert positive(saved["paths"]["cache"]["images_per_worker_cpu_s"])
