"""Safe to load, hard to crash: checkpoints never run code, numeric flags are checked when parsed, export refuses an
opset it cannot write, serve says a port is busy, files respect the umask, stale temp files are swept."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from skinlesion import fileio
from skinlesion.cli import build_parser, main
from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint
from skinlesion.model.factory import read_state_dict


class Payload:
    """Unpickling this writes ``marker``: what a hostile checkpoint would do with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def error_after_progress(capsys) -> str:
    """The one error line of a command that may have drawn progress bars first: on a line of its own."""
    err = capsys.readouterr().err
    segments = [s for s in err.replace("\r", "\n").splitlines() if s.strip()]
    errors = [s for s in segments if "error:" in s]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors  # not glued to a tqdm bar
    assert "Traceback" not in err
    return errors[0]


def image(synth_dir: Path) -> str:
    return str(sorted((synth_dir / "images").glob("*.jpg"))[0])


@pytest.fixture
def hostile_run(tiny_run, tmp_path) -> tuple[Path, Path]:
    """A run folder whose best.pt and last.pt carry one extra pickled object that writes a marker file."""
    run, marker = tmp_path / "runs" / "tiny", tmp_path / "pwned"
    run.mkdir(parents=True)
    shutil.copy(tiny_run / "config.json", run / "config.json")
    shutil.copy(tiny_run / "splits.csv", run / "splits.csv")
    for name in ("best.pt", "last.pt"):
        ckpt = checkpoint.read(tiny_run / name)
        ckpt["extra"] = Payload(marker)
        torch.save(ckpt, run / name)  # raw torch.save: fileio.torch_save would refuse the object
    return run, marker


# ------------------------------------------------------------------------------- 1. checkpoints cannot run code
def test_a_hostile_checkpoint_is_refused_without_running(hostile_run, synth_dir, capsys):
    run, marker = hostile_run
    assert main(["predict", "--run-dir", str(run), image(synth_dir)]) == 2
    line = one_error_line(capsys)
    assert "not a plain-data checkpoint and cannot be loaded safely" in line and "builtins.exec" in line
    assert "convert-checkpoint" not in line  # never invite converting a file that is not an old skinlesion one
    for argv in (["evaluate", "--run-dir", str(run)], ["export", "--run-dir", str(run)],
                 ["train", "--out", str(run.parent), "--run-name", run.name, "--resume"]):  # fmt: skip
        assert main(argv) == 2, argv
        assert "cannot be loaded safely" in one_error_line(capsys)
    # the converter refuses without the explicit flag, and with it a file no skinlesion version wrote
    assert main(["convert-checkpoint", str(run / "best.pt")]) == 2
    assert "--i-trust-this-file" in one_error_line(capsys)
    assert main(["convert-checkpoint", str(run / "best.pt"), "--i-trust-this-file"]) == 2
    assert "would import builtins.exec" in one_error_line(capsys)
    assert not marker.exists()


def test_an_old_numpy_checkpoint_names_the_conversion_and_converts_on_trust(tiny_run, tmp_path, capsys):
    run = tmp_path / "old"
    run.mkdir()
    ckpt = checkpoint.read(tiny_run)
    ckpt["metrics"] = {**ckpt["metrics"], "val_loss": np.float64(0.5), "per_class": np.arange(3)}
    ckpt["versions"]["torch"] = torch.__version__  # a TorchVersion (str subclass), as old files held
    torch.save(ckpt, run / "best.pt")
    with pytest.raises(SkinLesionError, match="not a plain-data checkpoint") as e:
        checkpoint.read(run)
    assert f"skinlesion convert-checkpoint {run / 'best.pt'} --i-trust-this-file" in str(e.value)
    assert main(["convert-checkpoint", str(run / "best.pt")]) == 2
    one_error_line(capsys)
    assert main(["convert-checkpoint", str(run), "--i-trust-this-file"]) == 0
    assert "rewritten as tensors and plain data" in capsys.readouterr().out
    converted = checkpoint.read(run)  # weights_only=True now
    assert type(converted["metrics"]["val_loss"]) is float and converted["metrics"]["per_class"] == [0, 1, 2]
    assert type(converted["versions"]["torch"]) is str
    assert not list(run.glob(".*.tmp"))


def test_not_a_skinlesion_checkpoint_is_one_line(tiny_run, tmp_path, synth_dir, capsys):
    state = checkpoint.read(tiny_run)["model"]
    partial = {"backbone": "efficientnet_b0", "model": state}
    for name, obj, says in (("sd", state, "no 'backbone' key"), ("tensor", torch.zeros(3), "it holds a Tensor"),
                            ("partial", partial, "no 'num_classes' key")):  # fmt: skip
        run = tmp_path / name
        run.mkdir()
        torch.save(obj, run / "best.pt")
        assert main(["predict", "--run-dir", str(run), image(synth_dir)]) == 2
        line = one_error_line(capsys)
        assert f"is not a skinlesion checkpoint ({says})" in line, line
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "best.pt").write_bytes(b"not a zip")
    assert main(["predict", "--run-dir", str(tmp_path / "junk"), image(synth_dir)]) == 2
    assert "could not read checkpoint" in one_error_line(capsys)


def test_run_files_are_plain_data(tiny_run):
    for name in ("best.pt", "last.pt"):  # written by train: load with weights_only=True
        ckpt = torch.load(tiny_run / name, map_location="cpu", weights_only=True)
        assert ckpt["backbone"] == "efficientnet_b0"
    last = fileio.torch_load(tiny_run / "last.pt")
    assert isinstance(last["rng"][0]["numpy"]["keys"], torch.Tensor)


def test_rng_state_round_trips_through_a_plain_file(tmp_path):
    from skinlesion.training.rng import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    fileio.torch_save(tmp_path / "rng.pt", {"rng": [rng_state()]})
    expected = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    set_rng_state(fileio.torch_load(tmp_path / "rng.pt")["rng"][0])
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == expected


def test_plain_converts_numpy_and_refuses_objects():
    data = fileio.plain({"a": np.float32(1.5), "b": np.arange(2), "c": (np.int64(3), Path("x")), "d": {2, 1}})
    assert data == {"a": 1.5, "b": [0, 1], "c": (3, "x"), "d": [1, 2]} and type(data["c"][0]) is int
    with pytest.raises(TypeError, match=r"x\.y is a .*Payload"):
        fileio.plain({"x": {"y": Payload(Path("unused"))}})


def test_weights_files_load_as_plain_tensors_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv.weight": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(SkinLesionError, match="not a plain-data weights file"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.save({"conv.weight": torch.zeros(1), "n": np.float64(1)}, tmp_path / "old.pth")
    with pytest.raises(SkinLesionError, match="convert-checkpoint"):
        read_state_dict(tmp_path / "old.pth")
    torch.save({"conv.weight": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(SkinLesionError, match="'epoch' is not a tensor"):
        read_state_dict(tmp_path / "mixed.pth")


# ------------------------------------------------------------------------------- 2. numeric flags checked at parse
BASE = {
    "train": ["train"], "prepare": ["prepare"], "split": ["split"], "evaluate": ["evaluate", "--run-dir", "r"],
    "calibrate": ["calibrate", "--run-dir", "r"], "operating-point": ["operating-point", "--run-dir", "r"],
    "predict": ["predict", "--run-dir", "r", "x.jpg"], "serve": ["serve", "--run-dir", "r"],
    "export": ["export", "--run-dir", "r"],
}  # fmt: skip
BAD = [
    ("train", "--lr", "0"), ("train", "--lr", "-1e-3"), ("train", "--lr", "nan"), ("train", "--lr", "inf"),
    ("train", "--lr", "abc"), ("train", "--img-size", "0"), ("train", "--img-size", "7"),
    ("prepare", "--img-size", "7"),
    ("train", "--workers", "-1"), ("evaluate", "--workers", "-1"), ("train", "--label-smoothing", "1"),
    ("train", "--label-smoothing", "-0.1"), ("train", "--batch-size", "0"), ("train", "--batch-size", "1.5"),
    ("evaluate", "--batch-size", "0"), ("calibrate", "--batch-size", "0"), ("operating-point", "--batch-size", "0"),
    ("predict", "--batch-size", "-2"), ("evaluate", "--bootstrap", "-1"), ("calibrate", "--folds", "1"),
    ("serve", "--port", "0"), ("serve", "--port", "65536"), ("train", "--epochs", "0"),
    ("train", "--weight-decay", "-1e-4"), ("train", "--weight-decay", "nan"), ("predict", "--top-k", "0"),
    ("serve", "--max-upload-mb", "0"), ("serve", "--max-upload-mb", "inf"), ("serve", "--max-megapixels", "-5"),
    ("serve", "--max-megapixels", "nan"), ("train", "--val-frac", "0"), ("train", "--val-frac", "1"),
    ("split", "--val-frac", "1.5"), ("split", "--test-frac", "1"), ("split", "--test-frac", "-0.1"),
    ("export", "--opset", "0"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "flag", "value"), BAD, ids=[" ".join(b) for b in BAD])
def test_bad_numbers_are_refused_when_parsed(command, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*BASE[command], f"{flag}={value}"])  # "--lr=-1e-3": argparse reads "-1e-3" alone as an option
    assert e.value.code == 2
    err = capsys.readouterr().err
    # "argument --workers/-j": an option with a timm-style alias is named with both spellings
    assert "Traceback" not in err and re.search(rf"error: argument {re.escape(flag)}(/\S+)?: expected ", err)
    assert value in err


def test_edge_values_are_accepted():
    parse = build_parser().parse_args
    args = parse(["train", "--img-size", "32", "--workers", "0", "--label-smoothing", "0", "--weight-decay", "0",
                  "--epochs", "1", "--batch-size", "1", "--lr", "1e-9", "--val-frac", "0.5"])  # fmt: skip
    assert (args.img_size, args.workers, args.label_smoothing, args.lr) == (32, 0, 0.0, 1e-9)
    assert parse(["serve", "--run-dir", "r", "--port", "65535"]).port == 65535
    assert parse(["evaluate", "--run-dir", "r", "--bootstrap", "0"]).bootstrap == 0
    assert parse(["calibrate", "--run-dir", "r", "--folds", "2"]).folds == 2


# ------------------------------------------------------------------------------- 3. export --opset
def test_export_refuses_an_opset_it_cannot_write_before_loading(tmp_path, capsys):
    for opset in ("17", "999"):
        assert main(["export", "--run-dir", str(tmp_path), "--opset", opset]) == 2
        line = one_error_line(capsys)
        assert f"--opset {opset} cannot be written" in line and "no checkpoint" not in line


def test_to_onnx_bytes_writes_the_requested_opset_or_refuses():
    from skinlesion.inference import onnx_export

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    assert onnx_export.written_opset(onnx_export.to_onnx_bytes(model, 8, 19)) == 19
    with pytest.raises(SkinLesionError):  # the exporter writes another opset (or fails): never silently
        onnx_export.to_onnx_bytes(model, 8, onnx_export.max_opset() + 1)


def test_export_reports_the_opset_in_the_file(tmp_path, monkeypatch, capsys):
    import onnx
    from onnx import TensorProto, helper

    from skinlesion.commands import export as export_command

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])])  # fmt: skip
    target = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(target))
    monkeypatch.setattr(export_command, "export_onnx", lambda run, out, opset: (target, 0.0, 0.0, 1.0))
    assert main(["export", "--run-dir", str(tmp_path), "--opset", "20"]) == 0
    assert "opset 20, dynamic batch" in capsys.readouterr().out


# ------------------------------------------------------------------------------- 4. serve on a busy port
def test_serve_on_a_busy_port_is_one_line(tiny_run, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        assert main(["serve", "--run-dir", str(tiny_run), "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert one_error_line(capsys) == f"error: port {port} on 127.0.0.1 is in use; pass --port N"


# ------------------------------------------------------------------------------- 5. files respect the umask
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        text = fileio.write_text(tmp_path / "a.txt", "x")
        ckpt = fileio.torch_save(tmp_path / "b.pt", {"t": torch.zeros(1)})
    finally:
        os.umask(old)
    assert (text.stat().st_mode & 0o777, ckpt.stat().st_mode & 0o777) == (mode, mode)


# ------------------------------------------------------------------------------- 6. stale temp files
def stale(folder: Path, name: str, age_s: float = 3600) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"half a checkpoint")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_remove_stale_temps_removes_only_old_temp_files(tmp_path):
    old = stale(tmp_path, ".best.pt.k2j_x9ab.tmp")
    fresh = stale(tmp_path, ".last.pt.a1b2c3d4.tmp", age_s=0)  # as if another process were writing it now
    kept = [stale(tmp_path, n) for n in ("best.pt", "notes.tmp", ".hidden.tmp", ".best.pt.short.tmp")]
    assert fileio.remove_stale_temps(tmp_path) == [old]
    assert not old.exists() and fresh.exists() and all(p.exists() for p in kept)
    assert fileio.remove_stale_temps(tmp_path / "missing") == []


@pytest.mark.parametrize("command", ["train", "export", "calibrate"])
def test_commands_sweep_the_run_folder_first(tmp_path, command, capsys):
    run = tmp_path / "run"
    old = stale(run, ".last.pt.abcd1234.tmp")
    argv = {
        "train": ["train", "--out", str(tmp_path), "--run-name", "run", "--resume"],
        "export": ["export", "--run-dir", str(run)],
        "calibrate": ["calibrate", "--run-dir", str(run)],
    }[command]
    assert main(argv) == 2  # the run folder is empty: each stops with one line, after sweeping
    one_error_line(capsys)
    assert not old.exists()


# ------------------------------------------------------------------------------- 7. one way past bad files
@pytest.fixture(scope="module")
def flawed_data(synth_dir, tmp_path_factory) -> tuple[Path, str, str]:
    """A copy of the synthetic set with one truncated JPEG and one image over the decompression limit."""
    from PIL import Image

    from skinlesion.data.images import MAX_IMAGE_PIXELS

    data = Path(shutil.copytree(synth_dir, tmp_path_factory.mktemp("flawed") / "ham"))
    images = sorted((data / "images").glob("*.jpg"))
    truncated, huge = images[3], images[40]
    truncated.write_bytes(truncated.read_bytes()[:300])  # starts like a JPEG: passes the quick check
    side = int(MAX_IMAGE_PIXELS**0.5) + 10  # a 1-bit image: a few MB to write, over the limit when decoded
    Image.new("1", (side, side)).save(huge.with_suffix(".png"))
    huge.unlink()
    return data, truncated.stem, huge.stem


def test_every_data_command_drops_what_prepare_drops(flawed_data, tmp_path, capsys):
    data, truncated, huge = flawed_data
    assert main(["prepare", "--data-dir", str(data), "--no-cache", "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert f"{truncated}: corrupt" in out and f"{huge}: too large" in out
    splits = tmp_path / "splits.csv"
    assert main(["split", "--data-dir", str(data), "--out", str(splits), "--allow-missing"]) == 0
    ids = set(splits.read_text().split())
    assert not any(truncated in line or huge in line for line in ids)
    capsys.readouterr()

    base = ["train", "--data-dir", str(data), "--out", str(tmp_path), "--backbone", "efficientnet_b0",
            "--no-pretrained", "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0",
            "--max-train-batches", "1", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main([*base, "--run-name", "strict"]) == 2  # the truncated file breaks the cache build
    line = error_after_progress(capsys)
    assert truncated in line and "--allow-missing" in line
    assert not (tmp_path / "strict").exists()  # a failed start leaves no half run folder
    assert main([*base, "--run-name", "lenient", "--allow-missing"]) == 0
    assert "dropped 2 unusable image(s)" in capsys.readouterr().err
    trained = (tmp_path / "lenient" / "splits.csv").read_text()
    assert truncated not in trained and huge not in trained
    # --splits naming the dropped files: with --allow-missing they are left out of it too.
    assert main([*base, "--run-name", "given", "--allow-missing", "--splits", str(tmp_path / "lenient" / "splits.csv"),
                 "--stop-after-epochs", "1"]) == 0  # fmt: skip


def test_a_bad_image_during_training_is_one_line_not_on_the_progress_bar(flawed_data, tmp_path, capsys):
    data, truncated, _ = flawed_data
    argv = ["train", "--data-dir", str(data), "--out", str(tmp_path), "--run-name", "r", "--no-cache",
            "--backbone", "efficientnet_b0", "--no-pretrained", "--img-size", "32", "--epochs", "1",
            "--batch-size", "64", "--workers", "1"]  # fmt: skip
    assert main(argv) == 2
    line = error_after_progress(capsys)
    assert truncated in line and "--allow-missing" in line


# ------------------------------------------------------------------------------- 8. the Host header
def test_serve_answers_only_to_its_own_host_names(tiny_run):
    from fastapi.testclient import TestClient

    from skinlesion.commands.serve import allowed_hosts
    from skinlesion.serve.app import create_app

    loopback = allowed_hosts("127.0.0.1", None)
    assert set(loopback) == {"127.0.0.1", "localhost"}
    client = TestClient(create_app(tiny_run, backend="torch", allowed_hosts=loopback))
    assert client.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200
    # DNS rebinding: a page on evil.example re-points its name at 127.0.0.1; the browser sends its Host.
    assert client.get("/api/health", headers={"host": "evil.example:8000"}).status_code == 400
    wide = allowed_hosts("0.0.0.0", ["lesions.example.org"])
    assert {"lesions.example.org", socket.gethostname(), "localhost"} <= set(wide) and "0.0.0.0" not in wide
    client = TestClient(create_app(tiny_run, backend="torch", allowed_hosts=wide))
    assert client.get("/api/health", headers={"host": "lesions.example.org"}).status_code == 200
    assert client.get("/api/health", headers={"host": "other.example.org"}).status_code == 400


# ------------------------------------------------------------------------------- 9. big uploads stay small
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_are_decoded_small_for_the_model_with_the_same_pixels(fmt):
    """A 4000x3000 photo decoded for a model resized to 257 px keeps at least twice that (reduced JPEG decode or
    a box average), never the full 12 MP, and the model input is the same up to resampling noise."""
    import io

    from PIL import Image

    from skinlesion.data.images import open_rgb
    from skinlesion.data.preprocessing import Preprocessing

    y, x = np.mgrid[0:3000, 0:4000].astype(np.float32)
    rgb = np.stack([x / 16 % 256, y / 12 % 256, (x + y) / 28 % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    small = open_rgb(buf.getvalue(), min_short_side=257)
    assert 2 * 257 <= min(small.size) < 4 * 257
    full = open_rgb(buf.getvalue())
    assert full.size == (4000, 3000)
    prep = Preprocessing(224, 257)
    as_model = prep.batch([small]).float(), prep.batch([full]).float()
    assert float((as_model[0] - as_model[1]).abs().mean()) < 0.02 * 255 * 0.229  # ~0.5 % of the normalised range
    assert prep.open(buf.getvalue()).size == small.size  # the preprocessing decodes it small


def test_byte_flipped_truncated_and_odd_format_uploads_are_never_a_server_error(tiny_run):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from skinlesion.serve.app import create_app

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8))
    jpeg, gif, tiff = io.BytesIO(), io.BytesIO(), io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    photo.save(gif, "GIF")
    photo.save(tiff, "TIFF")
    data = jpeg.getvalue()
    uploads = [data[: len(data) // k] for k in (2, 3, 10)]
    uploads += [gif.getvalue(), tiff.getvalue(), b"\xff\xd8\xff", data * 3]
    for seed in range(12):
        flipped = bytearray(data)
        for i in random.Random(seed).sample(range(20, len(data)), 32):
            flipped[i] ^= 0xFF
        uploads.append(bytes(flipped))
    client = TestClient(create_app(tiny_run, backend="torch"), raise_server_exceptions=False)
    codes = [client.post("/api/predict", files={"file": ("x.jpg", u, "image/jpeg")}).status_code for u in uploads]
    assert set(codes) <= {200, 413, 415}, codes
    assert 415 in codes  # the truncated ones at least are refused
