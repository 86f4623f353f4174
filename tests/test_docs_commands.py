"""Every `skinlesion ...` command written in README.md and docs/ parses with the real argument parser, so a renamed
or removed flag fails here instead of in a reader's terminal."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from skinlesion import cli
from skinlesion.errors import SkinLesionError

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PREFIXES = ("skinlesion ", ".venv/bin/skinlesion ", "python -m skinlesion ")
LAUNCHERS = ("torchrun ", "srun ")  # lines that start skinlesion through `-m skinlesion`
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTION = re.compile(r"(?<!\S)\d*(?:>>?|<)(?:&\d+|\s*[^\s;&|<>]+)")  # `2>&1`, `> out.txt`, `< in`


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with `\\` continuations joined, and a usage synopsis's indented `[...]` lines
    joined to it."""
    out: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, line = i + 1, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        while "[--" in line and i + 1 < len(lines) and re.match(r"\s+\[", lines[i + 1]):
            i += 1
            line += " " + lines[i].strip()
        out.append((start, line))
        i += 1
    return out


def command_text(line: str) -> str | None:
    """The shell text of a line that starts a skinlesion command (after optional whitespace, `$ ` or a code
    fence), else None. Inline code in prose names commands, it does not spell them out, so it is not read."""
    text = re.sub(r"^(```\w*)?\s*(\$\s+)?", "", line.strip())
    if text.startswith(PREFIXES) or text.startswith(LAUNCHERS) and "-m skinlesion " in text:
        return text
    return None


def skinlesion_argvs(text: str) -> list[list[str]]:
    """The skinlesion argument lists in one shell line: comments, pipes, `&&` chains and redirections handled."""
    lexer = shlex.shlex(REDIRECTION.sub(" ", text), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for tok in lexer:
        if tok in OPERATORS:
            commands.append([])
        else:
            commands[-1].append(tok)
    return [argv for argv in map(after_program, commands) if argv is not None]


def after_program(words: list[str]) -> list[str] | None:
    """The arguments after `skinlesion` / `python -m skinlesion` / `torchrun ... -m skinlesion`."""
    for i, w in enumerate(words):
        if w in ("skinlesion", ".venv/bin/skinlesion") and i == 0:
            return words[1:]
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "skinlesion":
            return words[i + 2 :]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for number, line in logical_lines(path.read_text(encoding="utf-8")):
            text = command_text(line)
            if text is None:
                continue
            for argv in skinlesion_argvs(text):
                found.append((f"{path.relative_to(REPO)}:{number}", argv))
    return found


COMMANDS = documented_commands()


def parse_like_the_cli(argv: list[str]) -> argparse.Namespace:
    """What `skinlesion` itself does with argv; a --config file that is not in the repository (an example name
    such as mine.yaml) is not read."""
    argv = cli.normalise_argv(argv)
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    if config is not None and not (REPO / config).is_file():
        return cli.build_parser().parse_args(argv)
    return cli.parse(argv)


def is_synopsis(argv: list[str]) -> bool:
    """A usage line (`skinlesion split [--seed 42] ...`): optional parts in brackets."""
    return any(a.startswith("[") for a in argv)


def unknown_synopsis_flags(argv: list[str]) -> list[str]:
    """The flags of a usage line that its subcommand does not have (the subcommand itself must exist)."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = {o for action in subparsers.choices[argv[0]]._actions for o in action.option_strings}
    flags = [re.sub(r"[\[\]]", "", a) for a in argv[1:] if a.lstrip("[").startswith("-")]
    return [f for f in flags if f not in known]


def test_the_docs_have_commands_to_check():
    """The extraction finds the documented commands (a broken extractor would pass every check below)."""
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "docs/training.md", "docs/usage.md", "docs/results.md", "docs/data.md"} <= where
    subcommands = {argv[0] for _, argv in COMMANDS if argv and not argv[0].startswith("-")}
    assert {"prepare", "train", "evaluate", "calibrate", "report", "export", "predict", "serve"} <= subcommands
    assert any(
        w.startswith("README.md") and argv[:1] == ["train"] and "--global-batch-size" in argv for w, argv in COMMANDS
    )  # the torchrun line
    assert any(is_synopsis(argv) for _, argv in COMMANDS)


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, argv, monkeypatch):
    monkeypatch.chdir(REPO)  # --config paths in the docs are relative to the repository root
    if is_synopsis(argv):
        unknown = unknown_synopsis_flags(argv)
        assert not unknown, f"{where}: skinlesion {shlex.join(argv)}: no such flag {unknown}"
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse_like_the_cli(argv)
    except SystemExit as e:
        if e.code not in (0, None):  # `--help` / `--version` exit 0
            pytest.fail(f"{where}: skinlesion {shlex.join(argv)}\n{err.getvalue().strip()}")
    except SkinLesionError as e:
        pytest.fail(f"{where}: skinlesion {shlex.join(argv)}\nerror: {e}")


def test_the_extractor_handles_shell_syntax():
    text = "skinlesion calibrate --run-dir r && skinlesion evaluate --run-dir r --tta 2>&1 | tee log  # note"
    assert skinlesion_argvs(text) == [["calibrate", "--run-dir", "r"], ["evaluate", "--run-dir", "r", "--tta"]]
    shell = "```bash\n$ torchrun --nproc_per_node 2 \\\n    -m skinlesion train --epochs 1 > out.txt\n```"
    lines = logical_lines(shell)
    texts = [command_text(line) for _, line in lines]
    assert [skinlesion_argvs(t) for t in texts if t] == [[["train", "--epochs", "1"]]]
    synopsis = logical_lines("skinlesion split [--seed 42]\n                 [--folds K --fold i]\nnext")
    assert skinlesion_argvs(synopsis[0][1]) == [["split", "[--seed", "42]", "[--folds", "K", "--fold", "i]"]]
    assert command_text("`skinlesion export` writes model.onnx") is None
    assert command_text("tensorboard --logdir outputs") is None


def test_a_stale_flag_is_caught():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parse_like_the_cli(["train", "--no-such-flag"])
    assert unknown_synopsis_flags(["split", "[--seed", "42]", "[--no-such-flag]"]) == ["--no-such-flag"]
