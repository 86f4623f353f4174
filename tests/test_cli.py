"""The CLI surface: every subcommand listed with a one-line help, seed-style aliases, python -m."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skinlesion.cli import build_parser, main, normalise_argv

SUBCOMMANDS = ["prepare", "split", "synth", "train", "evaluate", "calibrate", "fit-metadata-prior", "operating-point",
               "report", "gradcam", "grid", "predict", "export", "serve", "ensemble", "convert-checkpoint"]  # fmt: skip


def test_help_lists_every_subcommand_with_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)
    assert all(action.help for action in sub._choices_actions)


def test_seed_style_underscore_spellings_are_aliases():
    argv = normalise_argv(["train", "--data_dir", "d", "--run_name=x", "--img_size", "64", "--n_per_class", "3"])
    assert argv == ["train", "--data-dir", "d", "--run-name=x", "--img-size", "64", "--n-per-class", "3"]
    args = build_parser().parse_args(normalise_argv(["evaluate", "--run_dir", "r"]))
    assert args.run_dir == "r"
    # values are never rewritten, only option names
    assert normalise_argv(["predict", "--run_dir", "my_run", "a_b.jpg"])[2:] == ["my_run", "a_b.jpg"]


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "skinlesion", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("skinlesion ")


def test_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    rc = main(["evaluate", "--run-dir", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "train" in err[0]
