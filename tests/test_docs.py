"""The docs are runnable: docs/api.md's notebook session runs as written (in a temporary folder)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_notebook_session_in_the_api_docs_runs(tmp_path, capsys):
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    section = text.split("## A notebook session", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    here, names = os.getcwd(), {}
    os.chdir(tmp_path)  # `out="outputs"` lands in the temporary folder
    try:
        exec(compile(code, "docs/api.md", "exec"), names)  # noqa: S102 - our own documentation
    finally:
        os.chdir(here)
    assert names["run_dir"] == Path("outputs") / "notebook"
    written = json.loads((tmp_path / "outputs" / "notebook" / "metrics.json").read_text())
    assert names["result"].metrics["balanced_accuracy"] == written["balanced_accuracy"]
    assert "with_tta" in written and len(names["result"].predictions) == written["n_images"] == 140
    table = names["table"]
    assert len(table) == 20 and table["error"].isna().all() and set(table["prediction"]) <= set(names["model"].classes)
