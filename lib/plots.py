"""Figures the reports share: image grids, confusion heatmaps, training curves, recall bars."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from lib.data import load_gray


def image_grid(paths, titles=None, *, ncols: int = 6, size: int = 128, cell: float = 1.8, row_labels=None):
    """Show images (decoded the way the model sees them, at `size` px) in a grid."""
    paths = list(paths)
    nrows = max(1, int(np.ceil(len(paths) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, p in enumerate(paths):
        ax = axes.flat[k]
        ax.imshow(load_gray(p, size), cmap="gray", vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            axes[r, 0].text(-0.08, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def confusion_heatmaps(counts: pd.DataFrame, normalized: pd.DataFrame, title: str = ""):
    """Counts and row-normalised confusion matrices side by side (rows: true class)."""
    n = len(counts)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (1.0 + 0.75 * n), 0.75 * n + 1.2))
    sns.heatmap(counts, annot=True, fmt="d", cmap="Blues", cbar=False, ax=axes[0], square=True)
    axes[0].set_title(f"{title} counts".strip())
    sns.heatmap(normalized, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1, cbar=False, ax=axes[1], square=True)
    axes[1].set_title(f"{title} row-normalised (recall on the diagonal)".strip())
    for ax in axes:
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def history_curves(history: pd.DataFrame, best_epoch: int | None = None):
    """Train/validation loss, accuracy and validation macro recall per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    e = history["epoch"]
    axes[0].plot(e, history["train_loss"], label="train")
    axes[0].plot(e, history["val_loss"], label="validation")
    axes[0].set_title("loss (weighted cross-entropy)")
    axes[1].plot(e, history["train_accuracy"], label="train (augmented)")
    axes[1].plot(e, history["val_accuracy"], label="validation")
    axes[1].set_title("accuracy")
    axes[2].plot(e, history["val_macro_recall"], color="C2", label="validation")
    axes[2].set_title("macro recall")
    for ax in axes:
        ax.set_xlabel("epoch")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
        ax.legend(fontsize=8)
    axes[1].set_ylim(0, 1.02)
    axes[2].set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def recall_bars(table: pd.DataFrame, lower, upper):
    """Per-class recall with 95% interval whiskers."""
    recall = table["recall"].to_numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(table), 3.4))
    ax.bar(table.index, recall, color="C0")
    # a Wilson bound can sit a rounding error on the wrong side of the recall: clip at 0
    yerr = np.clip([recall - np.asarray(lower), np.asarray(upper) - recall], 0, None)
    ax.errorbar(table.index, recall, yerr=yerr,
                fmt="none", ecolor="black", capsize=3, lw=1)
    for i, (r, n) in enumerate(zip(recall, table["support"])):
        ax.text(i, 0.03, f"{r:.2f}\nn={n}", ha="center", va="bottom", fontsize=8, color="white")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall (capture rate)")
    ax.set_title("per-class recall on the test split, with 95% Wilson intervals")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    return fig


def shift_bars(recall: pd.Series, err: pd.Series | None = None, title: str = ""):
    """Macro recall per named shift (first entry: unshifted), the unshifted level as a line."""
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(recall) + 1))
    ax.barh(recall.index[::-1], recall.values[::-1], xerr=None if err is None else err.values[::-1],
            color=["C1" if n != recall.index[0] else "C0" for n in recall.index[::-1]])
    ax.axvline(recall.iloc[0], color="k", ls="--", lw=1, label="unshifted")
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("macro recall")
    ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig
