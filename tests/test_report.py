"""``skinlesion report`` writes one self-contained report.html embedding every figure; ``grid`` tiles."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.classes import CLASSES, FULL_NAMES
from skinlesion.cli import main
from skinlesion.data.ham10000 import load_table
from skinlesion.reporting import grid

IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def reported(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run, run)
    common = ["--run-dir", str(run), "--device", "cpu"]
    assert main(["calibrate", *common]) == 0
    assert main(["evaluate", *common, "--lesion-level", "--bootstrap", "100"]) == 0
    assert main(["report", *common, "--grid-size", "64"]) == 0
    return run


def test_report_embeds_every_figure(reported):
    html = (reported / "report.html").read_text(encoding="utf-8")
    pngs = sorted((reported / "figures").glob("*.png"))
    names = {p.name for p in pngs}
    assert {
        "confusion_matrix.png",
        "roc.png",
        "precision_recall.png",
        "reliability.png",
        "confidence.png",
        "per_class_f1.png",
        "learning_curves.png",
        "class_counts.png",
        "lesion_grid.png",
    } <= names
    assert any(n.startswith("cam_") for n in names)  # the Grad-CAM gallery
    embedded = IMG.findall(html)
    assert len(embedded) == len(pngs) == html.count("<img")
    decoded = sorted(base64.b64decode(b) for b in embedded)
    assert decoded == sorted(p.read_bytes() for p in pngs)  # each file embedded exactly once
    for blob in decoded:
        with Image.open(io.BytesIO(blob)) as im:
            assert im.format == "PNG" and im.width > 50
    # Self-contained: nothing fetched from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', html)


def test_report_shows_metrics_calibration_and_split(reported):
    html = (reported / "report.html").read_text(encoding="utf-8")
    m = json.loads((reported / "metrics.json").read_text())
    cal = json.loads((reported / "calibration.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        entry = m[key]
        assert f"{entry['value']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]" in html, key
    assert f"{m['lesion_level']['accuracy']['value']:.3f}" in html
    assert f"{cal['temperature']:.3f}" in html and f"{cal['after']['ece']:.4f}" in html
    assert FULL_NAMES["mel"] in html
    splits = pd.read_csv(reported / "splits.csv")
    n_val = int((splits["split"] == "val").sum())
    assert re.search(rf"<td>val</td>(<td>\d+</td>){{{len(CLASSES)}}}<td>{n_val}</td>", html)
    assert "predictions.csv was made with temperature" not in html  # evaluate ran after calibrate


def test_report_without_predictions_is_a_one_line_error(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "predictions.csv").unlink(missing_ok=True)
    assert main(["report", "--run-dir", str(run), "--device", "cpu"]) == 2
    assert "skinlesion evaluate" in capsys.readouterr().err


def test_grid_has_one_tile_per_class_and_example(synth_dir, tmp_path):
    table = load_table(str(synth_dir))
    image, tiles = grid.make_grid(table, n_per_class=2, size=48, seed=0)
    assert len(tiles) == 2 * len(CLASSES)
    assert image.width == len(CLASSES) * (48 + grid.PAD) + grid.PAD
    header = tiles[0].box[1]
    assert image.height == header + 2 * (48 + grid.PAD) + grid.PAD
    pixels = np.asarray(image)
    for t in tiles:
        assert t.image_id is not None
        assert table.set_index("image_id").loc[t.image_id, "dx"] == t.dx
        left, top, right, bottom = t.box
        assert pixels[top:bottom, left:right].std() > 5  # an image, not the white background
    assert pixels[:header].min() < 100  # labels were drawn in the header

    # A class with fewer images than asked for gets a placeholder tile, and the CLI writes the PNG.
    few = table[(table["dx"] != "df") | (table.index == table.index[table["dx"] == "df"][0])]
    _, tiles = grid.make_grid(few, n_per_class=2, size=48)
    assert [t.image_id is None for t in tiles if t.dx == "df"] == [False, True]
    out = tmp_path / "g.png"
    assert main(["grid", "--data-dir", str(synth_dir), "--size", "40", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.width == len(CLASSES) * (40 + grid.PAD) + grid.PAD


def test_report_reads_well(reported):
    """Wide figures span the page and are large enough to read, config.json starts collapsed, the research-tool
    note is there, and numbers on the val split that also fitted T are flagged as optimistic."""
    html = (reported / "report.html").read_text(encoding="utf-8")
    figures = re.findall(r'<figure( class="wide")?><img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', html)
    sizes = {alt: (bool(wide), Image.open(io.BytesIO(base64.b64decode(data))).size) for wide, data, alt in figures}
    wide = {alt: size for alt, (is_wide, size) in sizes.items() if is_wide}
    assert any(alt.startswith("Confusion matrix") for alt in wide)
    assert any(alt.startswith("Learning curves") for alt in wide)
    assert all(w >= 1000 for w, _ in wide.values())  # drawn large enough to fill the full width
    metric_figures = {alt: size for alt, (_, size) in sizes.items() if not alt.startswith("Example lesions")}
    assert all(w >= 600 for w, _ in metric_figures.values()), metric_figures
    assert "<details><summary>config.json" in html and "<details open><summary>config.json" not in html
    assert "Research tool, not a diagnosis." in html
    assert "which picked best.pt&#39;s epoch, and the temperature was fitted on it: they are optimistic" in html
    assert "Two ECE numbers, two questions" in html
