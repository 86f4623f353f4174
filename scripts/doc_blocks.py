"""Generated blocks inside hand-written Markdown: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`
belongs to a script, everything else to its authors. Shared by demo_numbers.py and results_tables.py."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wrap(paragraph: str, width: int = 115) -> str:
    """A generated paragraph broken into lines the way the hand-written Markdown around it is."""
    return textwrap.fill(paragraph, width, break_long_words=False, break_on_hyphens=False)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def block(text: str, name: str) -> str:
    """The current content of block ``name`` (without its markers and the newline after the start marker)."""
    start, end = markers(name)
    found = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, re.S)
    if found is None:
        raise ValueError(f"no {start} ... {end} block")
    return found.group(1)


def fill(text: str, name: str, content: str) -> str:
    """``text`` with block ``name`` replaced by ``content`` (one block of that name must be there)."""
    start, end = markers(name)
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected exactly one {start} ... {end} block")
    body = content if content.endswith("\n") else content + "\n"
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + end + rest.split(end, 1)[1]


def fill_file(path: Path, blocks: dict[str, str]) -> bool:
    """Write the blocks into ``path``; True when the file changed."""
    old = path.read_text(encoding="utf-8")
    new = old
    for name, content in blocks.items():
        new = fill(new, name, content)
    if new != old:
        path.write_text(new, encoding="utf-8")
    return new != old


def stale(path: Path, blocks: dict[str, str]) -> list[str]:
    """The names of the blocks in ``path`` that differ from what the generator gives now."""
    text = path.read_text(encoding="utf-8")
    return [name for name, content in blocks.items() if fill(text, name, content) != text]
