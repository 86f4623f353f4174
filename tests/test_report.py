"""``skinlesion report`` writes one self-contained report.html embedding every figure; ``grid`` tiles."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion import metrics
from skinlesion.classes import CLASSES, FULL_NAMES
from skinlesion.cli import main
from skinlesion.data.ham10000 import load_table
from skinlesion.reporting import grid, plots, report

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
        "calibration_reliability.png",
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


def _history(n_epochs: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    epochs = np.arange(1, n_epochs + 1)
    return pd.DataFrame({
        "epoch": epochs, "lr": 1e-3 / epochs, "train_loss": 2.0 / epochs, "train_acc": 1 - 0.5 / epochs,
        "val_loss": 1.5 / np.sqrt(epochs), "val_acc": rng.uniform(0.4, 0.7, n_epochs),
        "val_balanced_acc": rng.uniform(0.4, 0.7, n_epochs), "val_macro_f1": rng.uniform(0.3, 0.6, n_epochs),
        "val_macro_auc": rng.uniform(0.7, 0.9, n_epochs), "seconds": 10.0, "images_per_s": 50.0,
    })  # fmt: skip


def test_learning_curves_split_train_and_val_with_integer_epochs_and_the_best_epoch():
    history = _history(7)
    fig = plots.learning_curves_figure(history, best_epoch=4, select_column="val_macro_f1")
    fig.canvas.draw()
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {"Training loss", "Validation loss", "Training score", "Validation score"}

    def curves(ax):  # the plotted history columns (not the best-epoch marks)
        return {line.get_label(): line for line in ax.get_lines() if line.get_label() in history.columns}

    assert set(curves(axes["Training loss"])) == {"train_loss"}
    assert set(curves(axes["Training score"])) == {"train_acc"}  # train accuracy is not among the val metrics
    assert set(curves(axes["Validation loss"])) == {"val_loss"}
    assert set(curves(axes["Validation score"])) == {"val_acc", "val_balanced_acc", "val_macro_f1", "val_macro_auc"}
    line = curves(axes["Validation score"])["val_macro_f1"]
    assert list(line.get_xdata()) == list(range(1, 8))
    assert list(line.get_ydata()) == pytest.approx(history["val_macro_f1"].tolist())
    for ax in axes.values():
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # whole epochs only
        assert any(list(ln.get_xdata()) == [4, 4] for ln in ax.get_lines())  # the best epoch's vertical line
    star = [ln for ln in axes["Validation score"].get_lines() if ln.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_xdata()) == [4]
    assert star[0].get_ydata()[0] == pytest.approx(history.loc[3, "val_macro_f1"])
    assert "best epoch 4" in fig._suptitle.get_text()
    plt.close(fig)


def test_reliability_bins_adapt_to_the_set_size_and_ece_uses_the_shown_bins():
    assert [report.reliability_bin_count(n) for n in (10, 60, 140, 299, 5000)] == [3, 3, 7, 14, 15]
    rng = np.random.default_rng(1)
    n = 140
    logits = rng.normal(size=(n, 7)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.where(rng.random(n) < 0.6, probs.argmax(1), rng.integers(0, 7, n))
    bins = report.equal_mass_bins(y, probs)
    assert bins["count"].tolist() == [20.0] * 7  # equal mass: every bin 20 images
    conf, correct = probs.max(1), probs.argmax(1) == y
    order = np.argsort(conf)
    for k in range(7):
        part = order[20 * k : 20 * (k + 1)]
        assert bins["confidence"][k] == pytest.approx(conf[part].mean())
        assert bins["accuracy"][k] == pytest.approx(correct[part].mean())
        assert bins["lo"][k] == pytest.approx(conf[part].min()) and bins["hi"][k] == pytest.approx(conf[part].max())
    manual = sum(len(g) / n * abs(correct[g].mean() - conf[g].mean()) for g in np.array_split(order, 7))
    assert report.binned_ece(bins) == pytest.approx(manual)
    # On metrics' own equal-width bins, binned_ece is metrics.json's ECE.
    assert report.binned_ece(metrics.reliability_bins(y, probs)) == pytest.approx(metrics.ece(y, probs))

    # calibration.json's stored bins: neighbours merged to >= 20 images, the images' statistics kept exactly.
    fine = metrics.reliability_bins(y, probs)
    stored = {k: [None if not np.isfinite(v) else float(v) for v in a] for k, a in fine.items()}
    merged = report.merge_sparse_bins(stored)
    assert merged["count"].sum() == n and (merged["count"] >= report.MIN_PER_BIN).all()
    assert len(merged["count"]) < int((fine["count"] > 0).sum())
    assert (merged["count"] * merged["confidence"]).sum() == pytest.approx(conf.sum())
    assert (merged["count"] * merged["accuracy"]).sum() == pytest.approx(correct.sum())
    assert np.all(np.diff(merged["confidence"]) > 0)  # neighbours only: still ordered by confidence

    # The figure labels every point with its bin's count.
    curve = plots.ReliabilityCurve("x", **bins)
    fig = plots.reliability_figure([curve, plots.ReliabilityCurve("y", **merged)])
    counts = sorted(int(t.get_text()) for t in fig.axes[0].texts if t.get_text().isdigit())
    assert counts == sorted([20] * 7 + merged["count"].astype(int).tolist())
    plt.close(fig)


def test_border_peak_flags_maps_that_peak_on_the_frame():
    yy, xx = np.mgrid[0:64, 0:64]

    def blob(r, c):
        return np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 50.0)

    assert not report.peak_on_border(blob(32, 32))
    assert not report.peak_on_border(blob(10, 50))  # inside the 8-px band's edge
    assert report.peak_on_border(blob(2, 60))  # a corner
    assert report.peak_on_border(blob(32, 62))  # the right edge
    assert report.peak_on_border(blob(7, 32)) and not report.peak_on_border(blob(8, 32))  # band = 1/8 of 64 px


def test_report_explains_bins_best_epoch_history_and_grad_cam(reported):
    html = (reported / "report.html").read_text(encoding="utf-8")
    m = json.loads((reported / "metrics.json").read_text())
    preds = pd.read_csv(reported / "predictions.csv")
    probs = preds[[f"p_{c}" for c in CLASSES]].to_numpy()
    y = preds["y_true"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    bins = report.equal_mass_bins(y, probs)
    # The reliability caption: the rule, the ECE on the shown bins and metrics.json's ECE with its binning.
    assert f"{len(bins['count'])} equal-mass bins" in html
    assert f"ECE on these bins {report.binned_ece(bins):.3f}" in html
    assert f"metrics.json&#39;s ECE ({m['ece']['value']:.3f}) uses 15 equal-width bins" in html
    assert "calibration.json&#39;s 15 equal-width bins, neighbours merged" in html
    # The learning curves' caption: best.pt's epoch, history.csv's and the headline's numbers, and why they differ.
    from skinlesion.model import checkpoint

    best = checkpoint.read(reported)["epoch"]
    row = pd.read_csv(reported / "history.csv").set_index("epoch").loc[best]
    assert f"Best epoch {best} (highest val_macro_f1, the epoch best.pt holds)" in html
    assert f"val_acc {row['val_acc']:.3f}" in html and f"accuracy {m['accuracy']['value']:.3f}" in html
    assert "training loop&#39;s own validation pass" in html
    # The Grad-CAM caveat under the gallery.
    assert "How to read these maps." in html and "dark corners of dermoscopy" in html


def test_history_note_names_both_numbers_and_the_steps_that_move_decisions():
    history = _history(5)
    m = {"split": "val", "accuracy": {"value": 0.607, "ci95": [0.5, 0.7]}, "macro_f1": {"value": 0.5, "ci95": None},
         "metadata_prior": {"applied": True}, "operating_point": {"bias": [0.0]}, "lesion_pooling": {"applied": False}}
    meta = {"epoch": 3, "select": "val_loss", "logit_adjustment": {"tau": 1.0}, "config": {"amp_dtype": "bfloat16"}}
    epoch, column = report.best_epoch_of(meta)
    assert (epoch, column) == (3, "val_loss")
    note = report.history_note(history, epoch, column, m, meta)
    assert f"val_acc {history.loc[2, 'val_acc']:.3f}" in note and "accuracy 0.607" in note
    assert "Best epoch 3 (lowest val_loss, the epoch best.pt holds)" in note
    for step in ("prior correction added to best.pt", "metadata prior", "operating point", "bfloat16"):
        assert step in note, step
    assert "lesion pooling" not in note
    quiet = report.history_note(history, 3, "val_macro_f1", {**m, "metadata_prior": None, "operating_point": None}, {})
    assert "only the temperature applies" in quiet
    other = report.history_note(history, 3, "val_macro_f1", {**m, "split": "test"}, {})
    assert "Different images" in other
