"""Published numbers have one source: the README's and docs/results.md's generated blocks equal what
scripts/demo_numbers.py and scripts/results_tables.py render from the tracked files the measuring commands wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import demo_numbers  # noqa: E402
import doc_blocks  # noqa: E402
import results_tables  # noqa: E402


# ------------------------------------------------------------------------------------------ the committed pages
def test_readme_demo_block_is_what_the_generator_makes_of_demo_numbers_json():
    numbers = json.loads((REPO / "docs" / "demo_numbers.json").read_text(encoding="utf-8"))
    assert doc_blocks.stale(REPO / "README.md", {"demo-numbers": demo_numbers.render(numbers)}) == []
    assert numbers["host"] in doc_blocks.block((REPO / "README.md").read_text(encoding="utf-8"), "demo-numbers")


def test_results_and_readme_blocks_are_what_the_tracked_files_give():
    assert doc_blocks.stale(results_tables.RESULTS, results_tables.results_blocks()) == []
    assert doc_blocks.stale(results_tables.README, results_tables.readme_blocks()) == []
    assert results_tables.main(["--check"]) == 0


def test_results_page_is_short_and_has_only_chain_scored_lines():
    text = results_tables.RESULTS.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "<!-- preprocessing-shift:start -->" in text
    frame = pd.read_csv(results_tables.ABLATION)
    assert set(frame["scoring"]) == {"chain"}  # the old scoring is re-scored or dropped, never shown
    assert len(results_tables.chain_lines(frame)) == len(frame)


# ------------------------------------------------------------------------------------------ the generators
def fake_run(run: Path, balanced: float = 0.5714) -> Path:
    run.mkdir()
    value = lambda v: {"value": v, "ci95": [v - 0.05, v + 0.05]}  # noqa: E731
    metrics = {
        "split": "val",
        "n_images": 140,
        "n_lesions": 131,
        "temperature": 1.2,
        "tta_views": 4,
        "accuracy": value(0.6071),
        "balanced_accuracy": value(balanced),
        "macro_f1": value(0.58),
        "macro_auc": value(0.857),
        "with_tta": {
            "accuracy": value(0.6),
            "balanced_accuracy": value(0.5571),
            "macro_f1": value(0.55),
            "macro_auc": value(0.861),
        },
    }
    config = {
        "backbone": "tf_efficientnet_lite0",
        "img_size": 128,
        "epochs": 5,
        "lr": 1e-3,
        "n_train": 560,
        "n_val": 140,
        "device_used": "cpu",
        "amp_dtype": None,
        "versions": {"torch": "2.14.1", "timm": "1.0"},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_demo_numbers_come_from_the_runs_metrics_and_name_the_host(tmp_path):
    run = fake_run(tmp_path / "demo")
    numbers = demo_numbers.collect(run, "a 2-core Test CPU, fp32 (no bf16)", 151.0)
    text = " ".join(demo_numbers.render(numbers).split())  # one line: the paragraph is wrapped
    assert "a 2-core Test CPU, fp32 (no bf16)" in text and "2.5 min" in text
    assert "balanced accuracy 0.571 [0.521, 0.621]" in text and "macro AUC 0.857 [0.807, 0.907]" in text
    assert "4-view TTA balanced accuracy 0.557" in text and "560 training images" in text
    # another run, another sentence: nothing in it is fixed text
    other = " ".join(demo_numbers.render(demo_numbers.collect(fake_run(tmp_path / "b", 0.6), "host B", None)).split())
    assert "balanced accuracy 0.600" in other and "host B" in other and "min in all" not in other
    noted = demo_numbers.render(demo_numbers.collect(run, "host C", None, "other jobs shared it"))
    assert "host C; other jobs shared it;" in " ".join(noted.split())


def test_demo_numbers_writes_the_json_and_only_its_readme_block(tmp_path):
    run = fake_run(tmp_path / "demo")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- demo-numbers:start -->\nold numbers\n<!-- demo-numbers:end -->\nafter\n")
    out = tmp_path / "demo_numbers.json"
    assert demo_numbers.main([str(run), "--json", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- demo-numbers:start -->\n")
    assert text.endswith("<!-- demo-numbers:end -->\nafter\n")
    assert "old numbers" not in text and "0.571" in text
    assert demo_numbers.main(["--check", "--json", str(out), "--readme", str(readme)]) == 0
    readme.write_text(text.replace("0.571", "0.586"))  # a hand edit of a generated number is caught
    assert demo_numbers.main(["--check", "--json", str(out), "--readme", str(readme)]) == 1


def test_host_names_the_precision_the_run_trained_in():
    assert demo_numbers.host({"device_used": "cpu", "amp_dtype": "torch.bfloat16"}).endswith("bf16 autocast")
    assert demo_numbers.host({"device_used": "cpu", "amp_dtype": None}).endswith("fp32 (no bf16)")
    assert "-core" in demo_numbers.host({"device_used": "cpu"})


def test_fill_replaces_exactly_one_block():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n"
    assert doc_blocks.fill(text, "x", "new") == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb\n"
    assert doc_blocks.block(doc_blocks.fill(text, "x", "new\n"), "x") == "new\n"
    with pytest.raises(ValueError):
        doc_blocks.fill("no markers", "x", "new")
    with pytest.raises(ValueError):
        doc_blocks.fill(text + text, "x", "new")


def test_result_tables_render_the_files_numbers():
    frame = pd.read_csv(results_tables.ABLATION)
    shipped = frame[frame["variant"] == results_tables.SHIPPED].iloc[0]
    table = results_tables.chain_table(frame)
    assert f"{shipped['balanced_accuracy']:.3f} [{shipped['balanced_accuracy_lo']:.3f}," in table
    assert len(table.splitlines()) == len(frame) + 2
    deltas = results_tables.delta_table(frame)
    assert "`plain`" not in deltas and len(deltas.splitlines()) == len(frame) + 1
    assert results_tables.signed(0.02, 0.01, 0.03).startswith("**")  # the interval excludes 0
    assert not results_tables.signed(0.0, -0.1, 0.1).startswith("**")
    metrics = json.loads((results_tables.CV / "metrics.json").read_text())
    readme = results_tables.readme_blocks()["results-table"]
    assert f"{metrics['with_tta']['balanced_accuracy']['value']:.3f}" in readme
    assert results_tables.host_text("vm: Some CPU, avx512_bf16 no") == "an Some CPU without avx512_bf16"


def test_confusion_and_tau_tables_come_from_their_csvs():
    cm = pd.read_csv(results_tables.CONFUSION_CSV)
    text = results_tables.confusion_table(cm)
    mel = cm[cm["true"] == "mel"].iloc[0]
    assert f"| **mel** | {' | '.join(str(int(mel[c])) for c in cm.columns[1:])} |" in text
    assert cm.drop(columns="true").to_numpy().sum() == 2004
    sweep = pd.read_csv(results_tables.TAU_CSV)
    assert len(results_tables.tau_table(sweep).splitlines()) == len(sweep) + 2
