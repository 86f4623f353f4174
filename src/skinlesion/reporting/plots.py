"""Every report figure: one pure function each (arrays in, PNG file out), matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
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


def reliability_diagram(
    confidence: np.ndarray,
    accuracy: np.ndarray,
    count: np.ndarray,
    path: str | Path,
    after: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ece: tuple[float, float | None] | None = None,
) -> Path:
    """Accuracy vs confidence per bin (before, and after temperature scaling when given)."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    labels = ["before", "after temperature scaling"]
    for k, (conf, acc, n) in enumerate([(confidence, accuracy, count), *([after] if after else [])]):
        conf, acc, n = (np.asarray(a, dtype=float) for a in (conf, acc, n))
        ok = n > 0
        label = labels[k] if after else "model"
        if ece and ece[k] is not None:
            label += f" (ECE {ece[k]:.3f})"
        ax.plot(conf[ok], acc[ok], "o-", label=label)
    ax.set(
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Reliability diagram",
    )
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


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


def learning_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Loss and accuracy-type metrics per epoch from history.csv (columns that are present)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for col in ("train_loss", "val_loss"):
        if col in history:
            axes[0].plot(history["epoch"], history[col], "o-", label=col)
    for col in ("train_acc", "val_acc", "val_balanced_acc", "val_macro_f1", "val_macro_auc"):
        if col in history:
            axes[1].plot(history["epoch"], history[col], "o-", label=col)
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss")
    axes[1].set(xlabel="epoch", ylabel="score", title="Validation metrics")
    for ax in axes:
        ax.legend()
    return _save(fig, path)


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
