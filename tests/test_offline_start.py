"""Hub ImageNet weights without a network: one probe, then one `error:` line at once (not ~50 s of hub retries);
cached weights still load; a hub that answers is used as timm uses it. The hub here is always on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ID = "timm/test_efficientnet.r160_in1k"  # timm's pretrained tag for `test_efficientnet`
COMMIT = "0123456789abcdef0123456789abcdef01234567"



def error_lines(stderr: str) -> list[str]:
    """stderr without the data summary train prints first (what it read, how it splits): the error, and nothing
    of a traceback."""
    assert "Traceback" not in stderr, stderr
    summary = ("ham10000: ", "split groups: ")
    return [line for line in stderr.splitlines() if not line.startswith(summary)]

def closed_endpoint() -> str:
    """A loopback port nothing listens on: connections are refused, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def dropping_endpoint() -> Iterator[tuple[str, list[int]]]:
    """A loopback port that accepts each connection and closes it unanswered (a dead hub); counts them."""
    accepted: list[int] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                accepted.append(1)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@contextlib.contextmanager
def fake_hub(files: dict[str, bytes]) -> Iterator[tuple[str, list[str]]]:
    """A loopback hub serving ``files`` (path -> bytes) with the headers huggingface_hub reads; 404 otherwise."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, body: bool) -> None:
            requests.append(f"{self.command} {self.path}")
            data = files.get(self.path)
            if self.path == "/":
                data = b""
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self.answer(body=True)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def hub_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """The environment of a subprocess whose hub is ``endpoint`` and whose hub cache is empty unless filled."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}


def donor_safetensors() -> tuple[bytes, dict]:
    import timm
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    state = timm.create_model("test_efficientnet", num_classes=1000).state_dict()
    return save({k: v.contiguous() for k, v in state.items()}), state


LOAD_SCRIPT = """
import sys, torch
from skinlesion.model.factory import create_model
model = create_model("test_efficientnet", num_classes=7)
torch.save(model.state_dict(), sys.argv[1])
"""


def load_in_subprocess(env: dict[str, str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(out)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize("hub", ["refusing", "dropping"])
def test_no_network_is_one_error_line_after_one_attempt(synth_dir, tmp_path, hub):
    """Before: 12 connections, 22 retry lines and ~50 s. Now: the one probe, one line naming --weights lite0."""
    with contextlib.ExitStack() as stack:
        endpoint, accepted = (
            (closed_endpoint(), None) if hub == "refusing" else stack.enter_context(dropping_endpoint())
        )
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "skinlesion", "train", "--data-dir", str(synth_dir), "--out", str(tmp_path),
             "--run-name", "offline", "--img-size", "32", "--workers", "0"],
            capture_output=True, text=True, env=hub_env(endpoint, tmp_path / "hf"), timeout=300,
        )  # fmt: skip
        seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: could not load ImageNet weights for efficientnet_b0")
    assert f"{endpoint} is unreachable" in lines[0]
    assert "--weights lite0" in lines[0] and "--weights PATH" in lines[0] and "--no-pretrained" in lines[0]
    assert accepted is None or len(accepted) == 1  # the probe; huggingface_hub's retries would have made 12
    assert seconds < 15  # a failure path: the bound only catches back-off sleeps (1+2+4+8+8 s per file)
    assert not (tmp_path / "offline/history.csv").exists()


def test_cached_weights_load_when_the_hub_is_unreachable(tmp_path):
    data, state = donor_safetensors()
    snapshot = tmp_path / "hf/hub" / f"models--{REPO_ID.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs/main").write_text(COMMIT)
    (snapshot / "snapshots" / COMMIT).mkdir(parents=True)
    (snapshot / "snapshots" / COMMIT / "model.safetensors").write_bytes(data)
    with dropping_endpoint() as (endpoint, accepted):
        proc = load_in_subprocess(hub_env(endpoint, tmp_path / "hf"), tmp_path / "loaded.pt")
    assert proc.returncode == 0, proc.stderr
    assert len(accepted) == 1 and proc.stderr == ""
    check_loaded(tmp_path / "loaded.pt", state)


def test_a_hub_that_answers_is_downloaded_from_as_timm_does(tmp_path):
    data, state = donor_safetensors()
    files = {f"/{REPO_ID}/resolve/main/model.safetensors": data}
    with fake_hub(files) as (endpoint, requests):
        proc = load_in_subprocess(hub_env(endpoint, tmp_path / "hf"), tmp_path / "loaded.pt")
    assert proc.returncode == 0, proc.stderr
    assert f"GET /{REPO_ID}/resolve/main/model.safetensors" in requests, requests
    check_loaded(tmp_path / "loaded.pt", state)
    assert any((tmp_path / "hf/hub").rglob("model.safetensors"))  # the hub's cache, as timm leaves it


def test_hub_errors_when_it_answers_stay_one_line(tmp_path, synth_dir):
    """A reachable hub without the file (here: 404 for everything) fails with one line too, at once."""
    with fake_hub({}) as (endpoint, requests):
        proc = subprocess.run(
            [sys.executable, "-m", "skinlesion", "train", "--data-dir", str(synth_dir), "--out", str(tmp_path),
             "--run-name", "nohub", "--backbone", "test_efficientnet", "--img-size", "32", "--workers", "0"],
            capture_output=True, text=True, env=hub_env(endpoint, tmp_path / "hf"), timeout=300,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: could not load ImageNet weights for test_efficientnet")
    assert "from the Hugging Face hub or its cache" in lines[0] and "--weights lite0" in lines[0]
    assert requests[0] == "HEAD /" and any("/resolve/main/" in r for r in requests)


def check_loaded(path: Path, donor: dict) -> None:
    import torch

    loaded = torch.load(path, weights_only=True)
    for key in ("conv_stem.weight", "bn1.running_mean"):
        torch.testing.assert_close(loaded[key], donor[key], rtol=0, atol=0)
    assert loaded["classifier.weight"].shape[0] == 7


@pytest.mark.parametrize("reachable", [False, True])
def test_cache_only_mode_is_restored(reachable, monkeypatch):
    """No state is left behind: the hub's offline flag is what it was after create_pretrained, success or not."""
    from huggingface_hub import constants

    from skinlesion.model import factory

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, as a user's process is (conftest sets it)
    seen = []
    monkeypatch.setattr(factory, "hub_reachable", lambda: reachable)

    def fake_create(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("nothing")

    monkeypatch.setattr(factory.timm, "create_model", fake_create)
    with pytest.raises(factory.SkinLesionError, match="--weights lite0"):
        factory.create_pretrained("test_efficientnet", {})
    assert seen == [not reachable] and constants.HF_HUB_OFFLINE is False
