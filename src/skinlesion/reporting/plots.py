"""Every report figure: one pure function each (arrays in, PNG file out), matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from skinlesion import fileio  # noqa: E402

# Readable at the report's width: figures are shown at 560-1200 px, where matplotlib's 10-pt default is small.
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
                     "xtick.labelsize": 10, "ytick.labelsize": 10})  # fmt: skip


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fileio.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Counts and row-normalised (recall per true class) side by side."""
    cm = np.asarray(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, data, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        im = ax.imshow(data, cmap="Blues", vmin=0)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set(
            xticks=range(len(classes)),
            yticks=range(len(classes)),
            xticklabels=classes,
            yticklabels=classes,
            xlabel="predicted",
            ylabel="true",
            title=f"Confusion matrix ({title})",
        )
        top = data.max() if data.size else 0
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    format(data[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if data[i, j] > top / 2 else "black",
                )
    return _save(fig, path)


def roc_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """One-vs-rest ROC per class plus the macro average (mean TPR on a common FPR grid)."""
    fig, ax = plt.subplots(figsize=(6.5, 6))
    grid = np.linspace(0, 1, 201)
    tprs, aucs = [], []
    for i, c in enumerate(classes):
        pos = y_true == i
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, i])
        auc = np.trapezoid(tpr, fpr)
        tprs.append(np.interp(grid, fpr, tpr))
        aucs.append(auc)
        ax.plot(fpr, tpr, lw=1.2, label=f"{c} (AUC {auc:.3f})")
    if tprs:
        ax.plot(grid, np.mean(tprs, 0), "k--", lw=2, label=f"macro (AUC {np.mean(aucs):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one-vs-rest)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for i, c in enumerate(classes):
        pos = y_true == i
        if not pos.any():
            continue
        precision, recall, _ = precision_recall_curve(pos, probs[:, i])
        ax.plot(recall, precision, lw=1.2, label=f"{c} (AP {average_precision_score(pos, probs[:, i]):.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision–recall (one-vs-rest)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


@dataclass
class ReliabilityCurve:
    """One curve of a reliability diagram: per bin its mean confidence, accuracy and image count (empty bins
    NaN / 0); ``lo`` / ``hi``, when given, the lowest and highest confidence in each bin (drawn as a bar)."""

    label: str
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


def reliability_figure(curves: Sequence[ReliabilityCurve], title: str = "Reliability diagram"):
    """Accuracy vs confidence per bin, each point labelled with its image count (a bin of 20 images has an
    accuracy interval of about ±0.2, so the count says how far to trust the point)."""
    fig, ax = plt.subplots(figsize=(6.5, 6.2))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    for k, curve in enumerate(curves):
        conf, acc, n = (np.asarray(a, dtype=float) for a in (curve.confidence, curve.accuracy, curve.count))
        ok = (n > 0) & np.isfinite(conf) & np.isfinite(acc)
        color = f"C{k}"
        if curve.lo is not None and curve.hi is not None:
            lo, hi = np.asarray(curve.lo, dtype=float)[ok], np.asarray(curve.hi, dtype=float)[ok]
            ax.errorbar(conf[ok], acc[ok], xerr=[conf[ok] - lo, hi - conf[ok]], fmt="none", ecolor=color, alpha=0.35,
                        capsize=2)  # fmt: skip
        ax.plot(conf[ok], acc[ok], "o-", color=color, label=curve.label)
        for x, y, count in zip(conf[ok], acc[ok], n[ok], strict=True):
            # The first curve's counts above its points, the second's below (flipped at the plot's edges).
            dy = 7 if k % 2 == 0 else -14
            dy = -14 if dy > 0 and y > 0.93 else 7 if dy < 0 and y < 0.07 else dy
            ax.annotate(f"{int(count)}", (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                        fontsize=8, color=color)  # fmt: skip
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.04), title=title)
    ax.legend(loc="upper left", fontsize=8)
    ax.text(0.98, 0.02, "numbers: images per bin", transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
            color="#555")  # fmt: skip
    return fig


def reliability_diagram(
    curves: Sequence[ReliabilityCurve], path: str | Path, title: str = "Reliability diagram"
) -> Path:
    return _save(reliability_figure(curves, title), path)


def confidence_histogram(confidence: np.ndarray, correct: np.ndarray, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    bins = np.linspace(0, 1, 21)
    ax.hist(confidence[correct], bins=bins, alpha=0.7, label=f"right ({int(correct.sum())})", color="tab:green")
    ax.hist(confidence[~correct], bins=bins, alpha=0.7, label=f"wrong ({int((~correct).sum())})", color="tab:red")
    ax.set(xlabel="confidence (top-1 probability)", ylabel="images", title="Confidence: right vs wrong")
    ax.legend()
    return _save(fig, path)


def per_class_f1(f1: np.ndarray, lo: np.ndarray, hi: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """F1 bars with their 95 % interval as error bars (NaN intervals drawn without a bar)."""
    f1, lo, hi = (np.asarray(a, dtype=float) for a in (f1, lo, hi))
    err = np.nan_to_num(np.vstack([f1 - lo, hi - f1]).clip(min=0))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(classes, f1, yerr=err, capsize=4, color="tab:blue")
    for i, (v, top) in enumerate(zip(f1, np.where(np.isfinite(hi), np.maximum(hi, f1), f1), strict=True)):
        ax.text(i, top + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=10)  # above the error bar
    ax.set(ylim=(0, 1.15), ylabel="F1", title="Per-class F1 (95 % lesion-bootstrap interval)")
    return _save(fig, path)


LOSS_COLUMNS = {"train": ("train_loss",), "val": ("val_loss",)}
SCORE_COLUMNS = {"train": ("train_acc",), "val": ("val_acc", "val_balanced_acc", "val_macro_f1", "val_macro_auc")}


def learning_curves_figure(history: pd.DataFrame, best_epoch: int | None = None, select_column: str | None = None):
    """history.csv per epoch: training (left) and validation (right), loss (top, one y scale for both so they
    compare) and accuracy-type scores (bottom); integer epoch ticks; ``best_epoch`` (the one best.pt holds) marked
    on every panel, with a star on ``select_column`` (the metric that chose it)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.6), sharex=True, sharey="row")
    for col_k, part in enumerate(("train", "val")):
        for row_k, (family, ylabel) in enumerate(((LOSS_COLUMNS, "loss"), (SCORE_COLUMNS, "score"))):
            ax = axes[row_k, col_k]
            for k, col in enumerate(c for c in family[part] if c in history):
                ax.plot(history["epoch"], history[col], "o-", color=f"C{k}", label=col)
                if col == select_column and best_epoch is not None and (history["epoch"] == best_epoch).any():
                    value = history.loc[history["epoch"] == best_epoch, col].iloc[0]
                    ax.plot([best_epoch], [value], "*", color=f"C{k}", markersize=16, markeredgecolor="black",
                            zorder=5, label=f"{col} at best epoch ({value:.3f})")  # fmt: skip
            if best_epoch is not None:
                ax.axvline(best_epoch, color="grey", ls="--", lw=1)
            ax.set(ylabel=ylabel if col_k == 0 else None, title=f"{'Training' if part == 'train' else 'Validation'} "
                   f"{ylabel}")  # fmt: skip
            ax.legend(fontsize=8, loc="best")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelbottom=True)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    if best_epoch is not None:
        fig.suptitle(f"dashed line: best epoch {best_epoch}, the one best.pt holds"
                     + (f" ({'lowest' if select_column == 'val_loss' else 'highest'} {select_column}, starred)"
                        if select_column else ""), fontsize=11)  # fmt: skip
    return fig


def learning_curves(
    history: pd.DataFrame, path: str | Path, best_epoch: int | None = None, select_column: str | None = None
) -> Path:
    return _save(learning_curves_figure(history, best_epoch, select_column), path)


def class_counts(counts: pd.DataFrame, path: str | Path) -> Path:
    """Grouped bars: images per class (rows) for each split (columns)."""
    fig, ax = plt.subplots(figsize=(11, 4.5))  # shown across the report's full width
    width = 0.8 / max(1, counts.shape[1])
    x = np.arange(len(counts.index))
    for k, split in enumerate(counts.columns):
        bars = ax.bar(x + k * width, counts[split].to_numpy(), width, label=split)
        ax.bar_label(bars, fontsize=9)
    ax.set_xticks(x + width * (counts.shape[1] - 1) / 2, counts.index)
    ax.set(ylabel="images", title="Images per class and split")
    ax.margins(y=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the axes, off the bars
    return _save(fig, path)
