"""Hostile and careless inputs (issue 30), as a table: every case ends with exit code 2 and one error line
(`error: …`; a value refused while the command line is parsed gives argparse's usage lines and one
`skinlesion CMD: error: argument …` line instead), no traceback, no file written outside the folder the case
names, and nothing already written changed or lost.

Most cases run in this process (``cli.main``). Subprocesses only where the process itself is the point: a kill -9
in the middle of a write, and the full disk, which is a small tmpfs mounted in a user namespace (``unshare -rm``)
and skipped with the reason where the host does not allow one. Run as a script, this file is the driver that runs
the disk-full cases inside that namespace.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--backbone", "efficientnet_b0", "--no-pretrained", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
         "--workers", "0", "--max-train-batches", "1"]  # fmt: skip
# A YAML bomb under a string key: 9**9 strings once its aliases are expanded.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
) + "run_name: *i\n"


# --------------------------------------------------------------------------------------------------- fixtures
@dataclass(frozen=True)
class Fixtures:
    """Read-only inputs of every case (built once): a run folder, data folders, hostile files."""

    root: Path
    run: Path  # a copy of tiny_run
    data: Path  # the synthetic HAM10000 folder
    image: Path  # one of its images

    def __getattr__(self, name: str) -> Path:  # fx.tiny_png -> root/tiny.png etc.
        return self.root / HOSTILE_FILES.get(name, name)


HOSTILE_FILES = {"tiny_png": "tiny.png", "gif_jpg": "gif.jpg", "strip_png": "strip.png", "ages_csv": "ages.csv",
                 "loop": "loopA", "file": "a_file", "folder": "a_folder"}  # fmt: skip


def broken_configs(run: Path, root: Path) -> None:
    """Copies of the run whose config.json is truncated, a JSON list, 2 MiB, or names a number as data_dir."""
    text = (run / "config.json").read_text(encoding="utf-8")
    for kind, content in {"truncated": text[: len(text) // 3], "list": "[1, 2, 3]\n",
                          "big": '{"pad": "' + "x" * (2 << 20) + '"}', "typed": '{"data_dir": 5}'}.items():  # fmt: skip
        copy = root / f"run_config_{kind}"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tensorboard", "best.pt", "last.pt"))
        os.symlink(run / "best.pt", copy / "best.pt")  # the checkpoint is fine; only config.json is broken
        (copy / "config.json").write_text(content, encoding="utf-8")


def hostile_images(root: Path, data: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.new("RGB", (1, 1), (200, 100, 50)).save(root / "tiny.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(root / "gif.jpg",
                                                                                                  "GIF")  # fmt: skip
    Image.new("L", (100_000, 1)).save(root / "strip.png")
    for name, bad in (("data_tiny", "tiny.png"), ("data_strip", "strip.png")):  # one image of the set replaced
        copy = Path(shutil.copytree(data, root / name))
        first = sorted((copy / "images").glob("*.jpg"))[0]
        first.unlink()
        shutil.copy(root / bad, first.with_suffix(".png"))


@pytest.fixture(scope="module")
def fx(tiny_run, synth_dir, tmp_path_factory) -> Fixtures:
    import pandas as pd

    root = tmp_path_factory.mktemp("hostile")
    run = Path(shutil.copytree(tiny_run, root / "run", ignore=shutil.ignore_patterns("tensorboard", "eval_*")))
    data = synth_dir
    hostile_images(root, data)
    broken_configs(run, root)
    meta = pd.read_csv(data / "HAM10000_metadata.csv", dtype=str)
    meta.loc[:2, "age"] = ["-5", "1e309", "-inf"]  # not ages: unknown, counted
    meta.to_csv(root / "ages.csv", index=False)
    os.symlink("loopB", root / "loopA")
    os.symlink("loopA", root / "loopB")
    (root / "a_file").write_text("not a folder\n")
    (root / "a_folder").mkdir()
    shutil.copytree(run, root / "run_copy", ignore=shutil.ignore_patterns("tensorboard", "eval_*", "last.pt"))
    return Fixtures(root, run, data, sorted((data / "images").glob("*.jpg"))[5])


# ------------------------------------------------------------------------------------------ running one case
def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folders`` (links not followed): size and mtime."""
    out = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for n in names:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


@dataclass
class Outcome:
    rc: int | str
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:") or ": error: " in line]


def run_cli(argv: list[str], capsys) -> Outcome:
    from skinlesion.cli import main

    capsys.readouterr()
    try:
        rc: int | str = main(argv)
    except SystemExit as e:  # argparse refuses a value while parsing
        rc = e.code
    except BaseException:  # noqa: BLE001 - a traceback is the failure this file looks for
        rc = "traceback"
        print(traceback.format_exc(), file=sys.stderr)
    captured = capsys.readouterr()
    return Outcome(rc, captured.out, captured.err)


def assert_one_error(outcome: Outcome, expect: str, parse_time: bool) -> None:
    assert outcome.rc == 2, f"exit {outcome.rc}\n{outcome.err[-3000:]}"
    assert "Traceback" not in outcome.err
    lines = outcome.error_lines
    assert len(lines) == 1, outcome.err
    last = [x for x in outcome.err.splitlines() if x.strip()][-1].split("\r")[-1].strip()
    assert last == lines[0], f"the error is not the last line: {outcome.err[-2000:]}"
    if parse_time:  # argparse: usage lines, then one 'skinlesion CMD: error: argument --FLAG: ...' line
        assert lines[0].startswith("skinlesion ") and ": error: argument " in lines[0], lines[0]
    else:
        assert lines[0].startswith("error: "), lines[0]
    assert expect.lower() in lines[0].lower(), (expect, lines[0])


@dataclass(frozen=True)
class Case:
    """One hostile command line: what it must say (a piece of the error line) and which new files it may leave
    (paths under the case's tmp folder; none by default)."""

    argv: Callable[[Fixtures, Path], list[str]]
    expect: str
    parse_time: bool = False
    may_write: tuple[str, ...] = ()
    # Makes the case's files; returns what to do right before the command runs (a patch), if anything.
    setup: Callable[[Fixtures, Path, pytest.MonkeyPatch], Callable[[], None] | None] | None = None


def config_file(text: str, name: str = "c.yaml") -> Callable[[Fixtures, Path], str]:
    def make(fx: Fixtures, tmp: Path) -> str:
        (tmp / name).write_text(text, encoding="utf-8")
        return str(tmp / name)

    return make


def train(fx: Fixtures, tmp: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["train", "--data-dir", str(data or fx.data), "--out", str(tmp / "out"), *TRAIN,
            "--cache-dir", str(tmp / "cache"), *extra]  # fmt: skip


def train_config(text: str) -> Callable[[Fixtures, Path], list[str]]:
    return lambda fx, tmp: train(fx, tmp, "--config", config_file(text)(fx, tmp))


def unreadable(which: str) -> Callable[[Fixtures, Path, pytest.MonkeyPatch], Callable[[], None]]:
    """A copy of the data folder whose ``which`` ('' = the folder itself, 'images') cannot be listed: chmod 000,
    and where the tests run as root (who reads anything), os.scandir refused for it as the kernel would."""

    def setup(fx: Fixtures, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
        data = Path(shutil.copytree(fx.data, tmp / "locked"))
        target = data / which if which else data
        real = os.scandir

        def scandir(path=".", *a, **k):  # noqa: ANN001, ANN002, ANN003 - os.scandir's signature
            if os.path.realpath(path) == str(target.resolve()):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *a, **k)

        def lock() -> None:
            target.chmod(0)
            if os.geteuid() == 0:
                monkeypatch.setattr(os, "scandir", scandir)

        return lock

    return setup


def locked(tmp: Path) -> str:
    return str(tmp / "locked")


def bad_config_run(kind: str) -> Callable[[Fixtures, Path], str]:
    return lambda fx, tmp: str(fx.root / f"run_config_{kind}")


def non_utf8_image(fx: Fixtures, tmp: Path) -> list[str]:
    name = os.fsdecode(b"\xff\xfe lesion.jpg")
    try:
        shutil.copy(fx.image, tmp / name)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    return ["predict", "--run-dir", str(fx.run), str(tmp / name), "--isic-csv", str(tmp / "isic.csv")]


CASES: dict[str, Case] = {
    # -- a run folder outside --out
    "train --run-name ../../escape_run": Case(lambda fx, t: train(fx, t, "--run-name", "../../escape_run"),
                                              "not a plain folder name"),
    "train --config run_name: ../escape": Case(train_config("run_name: ../escape\n"), "not a plain folder name"),
    # -- data folders that cannot be read
    **{f"{cmd} --data-dir <symlink loop>": Case(argv, "symbolic links") for cmd, argv in {
        "prepare": lambda fx, t: ["prepare", "--data-dir", str(fx.loop), "--no-cache"],
        "split": lambda fx, t: ["split", "--data-dir", str(fx.loop), "--out", str(t / "s.csv")],
        "train": lambda fx, t: train(fx, t, data=fx.loop),
    }.items()},
    **{f"{cmd} --data-dir <unreadable>": Case(argv, "permission denied", setup=unreadable("")) for cmd, argv in {
        "prepare": lambda fx, t: ["prepare", "--data-dir", locked(t), "--no-cache"],
        "split": lambda fx, t: ["split", "--data-dir", locked(t), "--out", str(t / "s.csv")],
        "train": lambda fx, t: train(fx, t, data=Path(locked(t))),
    }.items()},
    "split, images/ unreadable": Case(lambda fx, t: ["split", "--data-dir", locked(t), "--out", str(t / "s.csv")],
                                      "permission denied", setup=unreadable("images")),
    "prepare --metadata <a folder>": Case(lambda fx, t: ["prepare", "--data-dir", str(fx.data), "--metadata",
                                                         str(fx.folder), "--no-cache"], "is a folder"),  # fmt: skip
    # -- seeds outside 0..2**32-1, everywhere
    **{f"{cmd} --seed {seed}": Case(argv(seed), "--seed", parse_time=True) for seed in ("-1", str(2**32))
       for cmd, argv in {
           "split": lambda s: lambda fx, t: ["split", "--data-dir", str(fx.data), "--out", str(t / "s.csv"),
                                             f"--seed={s}"],  # fmt: skip
           "train": lambda s: lambda fx, t: train(fx, t, f"--seed={s}"),
           "evaluate": lambda s: lambda fx, t: ["evaluate", "--run-dir", str(fx.run), f"--seed={s}"],
           "grid": lambda s: lambda fx, t: ["grid", "--data-dir", str(fx.data), "--out", str(t / "g.png"),
                                            f"--seed={s}"],  # fmt: skip
           "calibrate": lambda s: lambda fx, t: ["calibrate", "--run-dir", str(fx.run), f"--seed={s}"],
           "synth": lambda s: lambda fx, t: ["synth", "--out", str(t / "syn"), f"--seed={s}"],
       }.items()},  # fmt: skip
    "train --config seed: -1": Case(train_config("seed: -1\n"), "seed"),
    # -- an output path that is a folder where a file is written, or a file where a folder is
    **{f"{cmd} --out <a folder>": Case(argv, "is a folder") for cmd, argv in {
        "split": lambda fx, t: ["split", "--data-dir", str(fx.data), "--out", str(fx.folder)],
        "gradcam": lambda fx, t: ["gradcam", "--run-dir", str(fx.run), "--image", str(fx.image), "--out",
                                  str(fx.folder)],  # fmt: skip
        "export": lambda fx, t: ["export", "--run-dir", str(fx.run), "--out", str(fx.folder)],
        "grid": lambda fx, t: ["grid", "--data-dir", str(fx.data), "--out", str(fx.folder)],
    }.items()},
    "evaluate --isic-csv <a folder>": Case(lambda fx, t: ["evaluate", "--run-dir", str(fx.run), "--isic-csv",
                                                          str(fx.folder)], "is a folder"),  # fmt: skip
    "predict --isic-csv <a folder>": Case(lambda fx, t: ["predict", "--run-dir", str(fx.run), str(fx.image),
                                                         "--isic-csv", str(fx.folder)], "is a folder"),  # fmt: skip
    **{f"{cmd} --out <a file>": Case(argv, "is a file") for cmd, argv in {
        "ensemble": lambda fx, t: ["ensemble", str(fx.run), "--out", str(fx.file)],
        "train": lambda fx, t: train(fx, t)[:-4] + ["--out", str(fx.file)],
        "synth": lambda fx, t: ["synth", "--out", str(fx.file)],
    }.items()},
    "prepare --cache-dir <a file>": Case(lambda fx, t: ["prepare", "--data-dir", str(fx.data), "--cache-dir",
                                                        str(fx.file)], "is a file"),  # fmt: skip
    "split --out <under a file>": Case(lambda fx, t: ["split", "--data-dir", str(fx.data), "--out",
                                                      str(fx.file / "s.csv")], "is a file"),  # fmt: skip
    # -- absurd finite numbers
    "train --lr 1e300": Case(lambda fx, t: train(fx, t, "--lr", "1e300"), "--lr", parse_time=True),
    "train --std 1e-300 x3": Case(lambda fx, t: train(fx, t, "--std", "1e-300", "1e-300", "1e-300"), "--std",
                                  parse_time=True),  # fmt: skip
    "train --img-size 100000": Case(lambda fx, t: train(fx, t, "--img-size", "100000"), "--img-size",
                                    parse_time=True),  # fmt: skip
    "prepare --img-size 100000": Case(lambda fx, t: ["prepare", "--img-size", "100000"], "--img-size",
                                      parse_time=True),  # fmt: skip
    "evaluate --bootstrap 1e9": Case(lambda fx, t: ["evaluate", "--run-dir", str(fx.run), "--bootstrap",
                                                    "1000000000"], "--bootstrap", parse_time=True),  # fmt: skip
    "report --grid-size 100000": Case(lambda fx, t: ["report", "--run-dir", str(fx.run), "--grid-size", "100000"],
                                      "--grid-size", parse_time=True),  # fmt: skip
    "grid --size 100000": Case(lambda fx, t: ["grid", "--size", "100000", "--out", str(t / "g.png")], "--size",
                               parse_time=True),  # fmt: skip
    "train --config lr: 1e300": Case(train_config("lr: 1.0e+300\n"), "lr"),
    "train --config img_size: 100000": Case(train_config("img_size: 100000\n"), "img_size"),
    # -- --config values of the wrong type, a YAML bomb, a huge file
    "train --config epochs: [1, 2]": Case(train_config("epochs: [1, 2]\n"), "epochs"),
    "train --config mean: 0.5": Case(train_config("mean: 0.5\n"), "mean"),
    "train --config data_dir: 5": Case(train_config("data_dir: 5\n"), "data_dir"),
    "train --config backbone: {x: 1}": Case(train_config("backbone: {x: 1}\n"), "backbone"),
    "train --config <alias bomb>": Case(train_config(ALIAS_BOMB), "aliases"),
    "train --config <2 MiB>": Case(train_config("# " + "x" * (2 << 20) + "\n"), "bytes"),
    # -- a file name that is not UTF-8 in an ISIC file
    "predict --isic-csv, image name not UTF-8": Case(non_utf8_image, "not UTF-8"),
    # -- a run folder's config.json truncated, a list, huge, mistyped
    **{f"{cmd} <config.json {kind}>": Case(lambda fx, t, c=cmd, k=kind, e=extra: [c, "--run-dir",
                                                                                    bad_config_run(k)(fx, t), *e],
                                           expect)  # fmt: skip
       for cmd, extra in {"calibrate": [], "report": [], "evaluate": [], "fit-metadata-prior": [],
                          "operating-point": ["--min-sensitivity", "mel=0.5"]}.items()  # fmt: skip
       for kind, expect in {"truncated": "not valid JSON", "list": "JSON list", "big": "bytes",
                            "typed": "data_dir must be text or null"}.items()},  # fmt: skip
    # -- images: too small, a GIF named .jpg, a thin strip (by content, the same rule everywhere)
    "prepare, a 1x1 image": Case(lambda fx, t: ["prepare", "--data-dir", str(fx.data_tiny), "--no-cache"],
                                 "under the minimum"),  # fmt: skip
    "prepare, a 1x100000 image": Case(lambda fx, t: ["prepare", "--data-dir", str(fx.data_strip), "--no-cache"],
                                      "short side"),  # fmt: skip
    "predict a 1x1 image": Case(lambda fx, t: ["predict", "--run-dir", str(fx.run), str(fx.tiny_png)],
                                "under the minimum of 16 pixels"),  # fmt: skip
    "predict a GIF named .jpg": Case(lambda fx, t: ["predict", "--run-dir", str(fx.run), str(fx.gif_jpg)],
                                     "a GIF image, not a JPEG or PNG"),  # fmt: skip
    "predict a 1x100000 image": Case(lambda fx, t: ["predict", "--run-dir", str(fx.run), str(fx.strip_png)],
                                     "times its short side"),  # fmt: skip
    "gradcam a 1x1 image": Case(lambda fx, t: ["gradcam", "--run-dir", str(fx.run), "--image", str(fx.tiny_png),
                                               "--out", str(t / "g.png")], "under the minimum"),  # fmt: skip
    "evaluate, a 1x1 image": Case(lambda fx, t: ["evaluate", "--run-dir", str(fx.run), "--data-dir",
                                                 str(fx.data_tiny), "--keep-overlap", "--name", "tiny",
                                                 "--cache-dir", str(t / "cache")], "under the minimum",
                                  may_write=("cache",)),  # fmt: skip
    "evaluate --no-cache, a 1x1 image": Case(lambda fx, t: ["evaluate", "--run-dir", str(fx.run), "--data-dir",
                                                            str(fx.data_tiny), "--keep-overlap", "--name", "tiny",
                                                            "--no-cache"], "under the minimum"),  # fmt: skip
    "train, a 1x1 image": Case(lambda fx, t: train(fx, t, data=fx.data_tiny), "under the minimum",
                               may_write=("cache",)),  # fmt: skip
    # -- the same member twice
    "ensemble A A": Case(lambda fx, t: ["ensemble", str(fx.run), str(fx.run), "--out", str(t / "ens")],
                         "listed twice"),  # fmt: skip
    "ensemble A copy-of-A": Case(lambda fx, t: ["ensemble", str(fx.run), str(fx.run_copy), "--out", str(t / "ens")],
                                 "the same model"),  # fmt: skip
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case_is_one_error_line(name, fx, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    activate = case.setup(fx, work, monkeypatch) if case.setup is not None else None
    argv = case.argv(fx, work)
    watched = (fx.root, tmp_path, fx.data)
    before = snapshot(*watched)
    siblings = set(os.listdir(tmp_path.parent))
    if activate is not None:
        activate()
    outcome = run_cli(argv, capsys)
    monkeypatch.undo()  # before anything else reads the folders
    for p in (work / "locked", work / "locked" / "images"):
        if p.exists():
            p.chmod(0o755)
    assert_one_error(outcome, case.expect, case.parse_time)
    after = snapshot(*watched)
    changed = [p for p, v in before.items() if after.get(p) != v]
    assert not changed, f"files changed or lost: {changed[:10]}"
    allowed = tuple(str(work / w) for w in case.may_write)
    new = [p for p in set(after) - set(before) if not p.startswith(allowed)]
    assert not new, f"files written: {new[:10]}"
    assert set(os.listdir(tmp_path.parent)) <= siblings | {tmp_path.name}  # nothing beside the test's folder


# --------------------------------------------------------------------- garbage made unknown, with a count
def test_ages_that_are_not_ages_are_unknown_and_counted(fx, tmp_path, capsys):
    """-5, 1e309 and -inf in a metadata CSV: prepare counts them, the metadata prior fits without them, predict
    --metadata takes them as unknown and says how many, as --age refuses them."""
    import pandas as pd

    from skinlesion.data.clinical import read_metadata_csv

    given = read_metadata_csv(str(fx.ages_csv))
    assert given.attrs["ages_refused"] == 3 and given["age"].iloc[:3].isna().all()
    assert given["age"].iloc[3:].notna().all()

    out = run_cli(["prepare", "--data-dir", str(fx.data), "--metadata", str(fx.ages_csv), "--no-cache"], capsys)
    assert out.rc == 0 and "ages outside 0-120 or not numbers (unknown): 3" in out.out

    run = Path(shutil.copytree(fx.run_copy, tmp_path / "prior"))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "metadata": str(fx.ages_csv)}))
    out = run_cli(["fit-metadata-prior", "--run-dir", str(run)], capsys)
    assert out.rc == 0, out.err

    rows = pd.read_csv(fx.ages_csv, dtype=str)
    image = next((fx.data / "images").glob(f"{rows['image_id'][0]}.*"))  # its age is -5
    out = run_cli(["predict", "--run-dir", str(run), str(image), "--metadata", str(fx.ages_csv), "--format", "json"],
                  capsys)  # fmt: skip
    assert out.rc == 0 and "3 age(s) outside 0-120 or not a number taken as unknown" in out.err
    # The row's sex and site still count; its age does not: the same as leaving the age blank.
    blank = rows.copy()
    blank.loc[0, "age"] = ""
    blank.to_csv(tmp_path / "blank.csv", index=False)
    same = run_cli(["predict", "--run-dir", str(run), str(image), "--metadata", str(tmp_path / "blank.csv"),
                    "--format", "json"], capsys)  # fmt: skip
    probs = [json.loads(o.out)["predictions"][0]["probabilities"] for o in (out, same)]
    assert probs[0] == pytest.approx(probs[1], abs=1e-9)


def test_prepare_allow_missing_drops_too_small_and_too_thin_images(fx, capsys):
    for data, reason in ((fx.data_tiny, "under the minimum"), (fx.data_strip, "times its short side")):
        out = run_cli(["prepare", "--data-dir", str(data), "--no-cache", "--allow-missing"], capsys)
        assert out.rc == 0 and reason in out.out


def test_the_image_rules_bounds():
    """The size rules' edges, from the header (data/images.check_size): the minimum short side and the aspect."""
    from PIL import Image

    from skinlesion.data.images import MAX_ASPECT, MIN_IMAGE_SIDE, ImageTooLargeError, ImageTooSmallError, open_rgb

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, "PNG")
        return buf.getvalue()

    assert open_rgb(png(MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)).size == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)
    assert open_rgb(png(int(MAX_ASPECT * 20), 20)).size == (int(MAX_ASPECT * 20), 20)
    with pytest.raises(ImageTooSmallError, match=f"minimum of {MIN_IMAGE_SIDE} pixels"):
        open_rgb(png(100, MIN_IMAGE_SIDE - 1))
    with pytest.raises(ImageTooLargeError, match="times its short side"):
        open_rgb(png(int(MAX_ASPECT * 20) + 1, 20))


# ------------------------------------------------------------------------------- the API and the server
def test_the_python_api_applies_the_same_image_rules(fx):
    from PIL import Image

    import skinlesion
    from skinlesion.data.images import ImageTooLargeError, ImageTooSmallError

    model = skinlesion.load(fx.run)
    table = model.predict_files([fx.tiny_png, fx.gif_jpg, fx.strip_png, fx.image])
    assert table["error"].iloc[:3].str.contains("minimum|GIF|short side").all() and table["error"].isna().iloc[3]
    with pytest.raises(ImageTooSmallError):
        model.predict([Image.new("RGB", (1, 1))])
    with pytest.raises(ImageTooLargeError):
        model.predict([Image.new("RGB", (1000, 20))])


def test_the_server_refuses_the_same_images_without_a_server_error(fx):
    from fastapi.testclient import TestClient

    from skinlesion.serve.app import create_app

    client = TestClient(create_app(fx.run, backend="torch"), raise_server_exceptions=False)
    answers = {}
    for name, path in (("tiny", fx.tiny_png), ("gif", fx.gif_jpg), ("strip", fx.strip_png), ("ok", fx.image)):
        r = client.post("/api/predict", files={"file": ("x.jpg", path.read_bytes(), "image/jpeg")})
        answers[name] = (r.status_code, r.json().get("detail", ""))
    assert answers["tiny"][0] == 422 and "minimum of 16 pixels" in answers["tiny"][1]
    assert answers["gif"][0] == 415 and answers["strip"][0] == 413 and answers["ok"][0] == 200


# ------------------------------------------------------------------------------ temp files of a killed write
RUN_DIR_COMMANDS = ["evaluate", "calibrate", "fit-metadata-prior", "operating-point", "report", "gradcam",
                    "predict", "export", "serve"]  # fmt: skip


def stale_temp(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"")  # what a kill -9 during a checkpoint write leaves
    then = time.time() - 3600  # older than the 30 s grace (fileio.remove_stale_temps): no live writer
    os.utime(path, (then, then))
    return path


@pytest.mark.parametrize("command", RUN_DIR_COMMANDS)
def test_every_run_folder_command_removes_a_killed_writes_temp_files(command, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    temps = [stale_temp(run, ".best.pt.k2j_x9ab.tmp"), stale_temp(run, ".last.pt.a1b2c3d4.tmp")]
    extra = {"gradcam": ["--image", "x.jpg"], "predict": ["x.jpg"], "operating-point": ["--min-sensitivity", "mel=.5"],
             "serve": ["--port", "1"]}.get(command, [])  # fmt: skip
    outcome = run_cli([command, "--run-dir", str(run), *extra], capsys)
    assert outcome.rc == 2 and len(outcome.error_lines) == 1  # an empty run folder: one line, after the sweep
    assert not any(t.exists() for t in temps)


def child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, folder: Path, pattern: str, timeout: float = 120) -> list[Path]:
    """SIGKILL ``proc`` once a file matching ``pattern`` exists under ``folder`` (a write in progress)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(folder.rglob(pattern))
        if found:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return found
        if proc.poll() is not None:
            pytest.fail(f"the writer ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no temp file appeared")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_cache_build_killed_half_way_leaves_nothing_after_the_next_start(fx, tmp_path, capsys):
    cache = tmp_path / "cache"
    slow = (  # the real build, each image slowed down, so the kill lands while the pixels file is written
        "import time, sys\nfrom skinlesion.data import cache\nreal = cache.stored_pixels\n"
        "def slow(*a):\n    time.sleep(0.05)\n    return real(*a)\ncache.stored_pixels = slow\n"
        "from skinlesion.cli import main\n"
        f"sys.exit(main(['prepare', '--data-dir', {str(fx.data)!r}, '--cache-dir', {str(cache)!r}]))\n"
    )
    left = kill_when(child(slow), cache, ".pixels-*.u8.*.tmp")
    assert left and all(p.exists() for p in left)  # the kill left a half pixels file
    outcome = run_cli(["prepare", "--data-dir", str(fx.data), "--cache-dir", str(cache)], capsys)
    assert outcome.rc == 0
    assert not list(cache.rglob("*.tmp")) and len(list(cache.rglob("pixels-*.u8"))) == 1


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_checkpoint_write_killed_half_way_loses_nothing_and_is_swept(fx, tmp_path, capsys):
    run = Path(shutil.copytree(fx.run_copy, tmp_path / "run"))
    best = (run / "best.pt").read_bytes()
    slow = (  # torch.save of the real checkpoint, stalled after its first bytes
        "import time, torch\nfrom skinlesion import fileio\nreal = torch.save\n"
        "def stalled(obj, f, *a, **k):\n    f.write(b'PK')\n    f.flush()\n    time.sleep(60)\n"
        "torch.save = stalled\n"
        f"fileio.torch_save({str(run / 'best.pt')!r}, fileio.torch_load({str(run / 'best.pt')!r}))\n"
    )
    left = kill_when(child(slow), run, ".best.pt.*.tmp")
    assert (run / "best.pt").read_bytes() == best  # nothing already written was lost
    for p in left:  # later: past the grace that protects a live writer's temp file
        os.utime(p, (time.time() - 3600,) * 2)
    outcome = run_cli(["predict", "--run-dir", str(run), str(fx.image)], capsys)  # reads the run folder
    assert outcome.rc == 0, outcome.err
    assert not any(p.exists() for p in left) and (run / "best.pt").read_bytes() == best


# ------------------------------------------------------------------------------------------------- disk full
def test_a_full_disk_in_a_writer_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    """Everywhere (no tmpfs needed): a write that fails with ENOSPC half way is one line naming the file, its
    size and the free space; the temp file is gone and the file already there is untouched."""
    from skinlesion import fileio
    from skinlesion.errors import SkinLesionError

    target = tmp_path / "splits.csv"
    target.write_text("old\n")
    real = Path.write_bytes

    def half_then_full(self: Path, data: bytes) -> int:
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(SkinLesionError) as e:
        fileio.write_text(target, "x" * 5000)
    message = str(e.value)
    assert "no space left on the disk of" in message and str(target) in message
    assert "free" in message and "needs about 4.9 KiB" in message and "\n" not in message
    monkeypatch.undo()
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["splits.csv"]


DISK_FULL_CASES = {  # name: (argv with {T} = the full file system, run folder copied into it first, bytes left)
    "split --out": (["split", "--data-dir", "{data}", "--out", "{T}/s.csv"], False, 0),
    "grid --out": (["grid", "--data-dir", "{data}", "--out", "{T}/g.png"], False, 0),
    "gradcam --out": (["gradcam", "--run-dir", "{run}", "--image", "{image}", "--out", "{T}/g.png"], False, 0),
    "export --out": (["export", "--run-dir", "{run}", "--out", "{T}/m.onnx"], False, 0),
    "ensemble --out": (["ensemble", "{run}", "--out", "{T}/ens"], False, 0),
    "prepare --cache-dir": (["prepare", "--data-dir", "{data}", "--cache-dir", "{T}/cache"], False, 0),
    "train --out": (["train", "--data-dir", "{data}", "--out", "{T}/runs", "--run-name", "r", *TRAIN, "--cache-dir",
                     "{cache}"], False, 4 << 20),  # fmt: skip
    "fit-metadata-prior (best.pt rewritten on the full disk)": (["fit-metadata-prior", "--run-dir", "{T}/run",
                                                                 "--remove"], True, 0),  # fmt: skip
    "evaluate (run on the full disk)": (["evaluate", "--run-dir", "{T}/run"], True, 0),
}


# Written by a library straight to the file (matplotlib's savefig): its size is not known before it fails.
SIZE_UNKNOWN = ("gradcam --out",)


def namespace_tmpfs_works() -> str | None:
    """None when a tmpfs can be mounted in a user namespace here; else why not."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        return "no unshare (Linux util-linux) on this host"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                           capture_output=True, text=True)  # fmt: skip
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def disk_full(fx, tmp_path_factory) -> dict[str, dict]:
    why = namespace_tmpfs_works()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("diskfull")
    values = {"data": str(fx.data), "run": str(fx.run_copy), "image": str(fx.image), "cache": str(work / "cache")}
    spec = [{"name": name, "argv": argv, "copy_run": copy, "leave": leave, "mount": str(work / f"fs{i}")}
            for i, (name, (argv, copy, leave)) in enumerate(DISK_FULL_CASES.items())]  # fmt: skip
    (work / "spec.json").write_text(json.dumps({"cases": spec, "values": values}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = ["unshare", "-rm", sys.executable, __file__, str(work / "spec.json"), str(work / "results.json")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "results.json").read_text())


@pytest.mark.parametrize("name", list(DISK_FULL_CASES))
def test_a_full_disk_is_one_line_naming_the_path_and_the_space(name, disk_full):
    r = disk_full[name]
    outcome = Outcome(r["rc"], "", r["err"])
    assert_one_error(outcome, "no space left on the disk of", parse_time=False)
    assert "free" in outcome.error_lines[0]
    if name not in SIZE_UNKNOWN:
        assert "needs about" in outcome.error_lines[0]
    assert not r["temps"], f"partial files left: {r['temps']}"
    assert r["best_before"] == r["best_after"]  # a run folder's checkpoint survives a failed rewrite
    assert not r["new_run_files"], r["new_run_files"]  # a failed train / ensemble leaves no half run folder


# ------------------------------------------------------- the driver, run inside the user namespace (as root there)
def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` but ``leave`` bytes."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    with open(filler, "r+b") as f:
        f.truncate(max(0, size - leave))


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _disk_full_case(case: dict, values: dict) -> dict:
    from skinlesion.cli import main

    mount = Path(case["mount"])
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        if case["copy_run"]:
            shutil.copytree(values["run"], mount / "run", ignore=shutil.ignore_patterns("eval_*", "tensorboard"))
        before = set(snapshot(mount))
        _fill(mount, case["leave"])
        best = _sha(mount / "run" / "best.pt")
        argv = [a.format(T=mount, **values) for a in case["argv"]]
        err, start = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc: int | str = main(argv)
            except SystemExit as e:
                rc = e.code
            except BaseException:  # noqa: BLE001
                rc = "traceback"
                print(traceback.format_exc(), file=sys.stderr)
        (mount / "filler").unlink()
        files = set(snapshot(mount)) - before
        temps = [f for f in files if f.endswith(".tmp")]
        # What may stay: the image cache's lock file and empty folders; never a half run folder's files.
        new_run_files = [f for f in files if "/runs/" in f or "/ens/" in f]
        return {"rc": rc, "err": err.getvalue(), "temps": temps, "new_run_files": new_run_files,
                "seconds": time.perf_counter() - start,
                "best_before": best, "best_after": _sha(mount / "run" / "best.pt")}  # fmt: skip
    finally:
        subprocess.run(["umount", str(mount)], check=False)


if __name__ == "__main__":  # the disk-full driver: python test_hostile_inputs.py SPEC.json RESULTS.json
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = {c["name"]: _disk_full_case(c, spec["values"]) for c in spec["cases"]}
    Path(sys.argv[2]).write_text(json.dumps(results))
