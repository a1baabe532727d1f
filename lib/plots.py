"""Figures the reports share: image grids, confusion heatmaps, training curves, recall bars."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from lib.preprocess import load_gray


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


def cam_grid(gray: np.ndarray, maps: np.ndarray, titles, *, ncols: int = 6, cell: float = 1.8):
    """Decoded images [N, 1, H, W] (or [N, H, W]) with their class-activation maps [N, H, W] (0-1)
    overlaid: the image in gray, the map in colour where it is strong."""
    gray = np.asarray(gray).reshape(len(maps), *maps.shape[-2:])
    nrows = max(1, int(np.ceil(len(maps) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(len(maps)):
        ax = axes.flat[k]
        ax.imshow(gray[k], cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_less(maps[k], 0.2), cmap="jet", vmin=0, vmax=1, alpha=0.45)
        ax.set_title(titles[k], fontsize=7)
    fig.tight_layout()
    return fig


def samples_per_class(readable: pd.DataFrame, classes: list[str], n: int, seed: int):
    """A grid of up to n images per class (one row per class), decoded as the model sees them."""
    sample = readable.sample(frac=1.0, random_state=seed).groupby("class").head(n)
    paths, titles = [], []
    for c in classes:
        rows = sample[sample["class"] == c]
        paths += list(rows["path"])
        titles += list(rows["class"])
    return image_grid(paths, titles, ncols=n, size=128)


def intensity_per_class(readable: pd.DataFrame, classes: list[str], seed: int):
    """Pixel-intensity histograms (up to 40 images per class) and per-image mean and std boxes by class."""
    from lib.preprocess import load_gray as load

    rng = np.random.default_rng(seed)
    bins = np.linspace(0, 1, 65)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for cls in classes:
        paths = readable.loc[readable["class"] == cls, "path"].to_numpy()
        pick = rng.choice(paths, size=min(40, len(paths)), replace=False)
        hist, _ = np.histogram(np.concatenate([load(p, 128).ravel() for p in pick]), bins=bins, density=True)
        axes[0].plot(bins[:-1] + 0.5 / 64, hist, label=cls)
    axes[0].set_title("pixel intensity (up to 40 images per class)")
    axes[0].set_xlabel("intensity")
    axes[0].legend(fontsize=7)
    for ax, col, what in ((axes[1], "mean", "mean intensity"), (axes[2], "std", "intensity std")):
        sns.boxplot(data=readable, x="class", y=col, order=classes, ax=ax)
        ax.set_title(f"per-image {what}")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    return fig


def pca_by_class(readable: pd.DataFrame, classes: list[str], seed: int, per_class: int = 150):
    """Each image downsampled to 32x32 and projected onto its first two principal components, by class."""
    from sklearn.decomposition import PCA

    pick = readable.sample(frac=1.0, random_state=seed).groupby("class").head(per_class)
    pixels = np.stack([load_gray(p, 32).ravel() for p in pick["path"]])
    xy = PCA(n_components=2, random_state=seed).fit_transform(pixels - pixels.mean(1, keepdims=True))
    fig, ax = plt.subplots(figsize=(7, 5))
    sns.scatterplot(x=xy[:, 0], y=xy[:, 1], hue=pick["class"].to_numpy(), hue_order=classes, s=14, ax=ax)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=1.5)
    return fig


def bars(series: pd.Series, title: str, ylabel: str):
    """A bar chart of one value per category (e.g. images per class)."""
    ax = series.plot.bar(figsize=(8, 3), color="C0", title=title)
    ax.set_ylabel(ylabel)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return ax.figure


def hamming_histogram(nearest: np.ndarray, threshold: int):
    """Each image's Hamming distance to its nearest other image, against the near-duplicate threshold."""
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.hist(nearest, bins=np.arange(0, 40) - 0.5, color="C0")
    ax.axvline(threshold + 0.5, color="red", ls="--", label=f"threshold {threshold}")
    ax.set_xlabel("Hamming distance to the nearest other image")
    ax.set_ylabel("images")
    ax.legend()
    return fig


def pair_grid(file_pairs, titles_a, titles_b, size: int = 96):
    """Image pairs side by side, two pairs per row."""
    paths = [p for a, b in file_pairs for p in (a, b)]
    titles = [t for ta, tb in zip(titles_a, titles_b) for t in (ta, tb)]
    return image_grid(paths, titles, ncols=4, size=size)


def augmented_samples(gray: np.ndarray, y: np.ndarray, labels: list[str], augment, seed: int, rows: int = 4,
                      draws: int = 5):
    """A few training images (first column), each followed by augmented draws of it."""
    import torch

    pick = np.random.default_rng(seed).choice(len(y), size=min(rows, len(y)), replace=False)
    fig, axes = plt.subplots(len(pick), draws + 1, figsize=(10, 1.8 * len(pick)), squeeze=False)
    for r, i in enumerate(pick):
        img = torch.from_numpy(gray[i])
        for c in range(draws + 1):
            axes[r, c].imshow((img if c == 0 else augment(img))[0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(f"{labels[y[i]]} (original)", fontsize=8)
    fig.tight_layout()
    return fig


def coverage(curve: pd.DataFrame, point: dict | None = None):
    """Accuracy on the images kept against the share kept (the least confident go to review), with
    the operating point (`lib.calibration.auto_figures` on these images) marked when given."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(curve["coverage"], curve["accuracy"])
    if point is not None and point["auto"]:
        ax.plot([point["coverage"]], [point["auto_accuracy"]], "o", color="C3",
                label=f"operating point: confidence ≥ {point['threshold']:.3f}")
        ax.legend(loc="lower left")
    ax.set_xlabel("coverage (share of images kept)")
    ax.set_ylabel("accuracy on kept images")
    ax.set_ylim(min(0.5, curve["accuracy"].min()), 1.005)
    ax.grid(alpha=0.3)
    return fig


def reliability(tables: dict[str, pd.DataFrame], bins: int = 10):
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line per
    {name: lib.calibration.reliability table}; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    for i, (name, t) in enumerate(tables.items()):
        ax.plot(t["confidence"], t["accuracy"], "o-", color=f"C{i}", label=name, ms=4)
    ax.set_xlabel(f"mean confidence ({bins} equal-width bins)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def latency_bars(rows: pd.DataFrame):
    """p50 latency per engine (bars) with the p95 as a whisker, one panel per batch size."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, (batch, part) in zip(axes, rows.groupby("batch")):
        ax.barh(part["engine"], part["p50_ms"], xerr=[np.zeros(len(part)), part["p95_ms"] - part["p50_ms"]],
                color=["#999", "#4c72b0", "#55a868"], capsize=3)
        ax.set_xlabel("ms per call (bar p50, whisker p95)")
        ax.set_title(f"batch {batch}")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def fold_scatter(results):
    """Macro recall of every fold (dots) and the mean ± std (black) per configuration."""
    import textwrap

    labels = [textwrap.fill(r.config, 56) for r in results]  # a configuration line runs to 200 characters
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(11, 0.16 * lines + 0.35 * len(results) + 1.0))
    for i, r in enumerate(results):
        ax.scatter(r.folds["macro recall"], [i] * len(r.folds), color="C0", alpha=0.6)
        ax.errorbar(r.folds["macro recall"].mean(), i, xerr=r.folds["macro recall"].std(ddof=1), fmt="o", color="k")
    ax.set_yticks(range(len(results)), labels, fontsize=8)
    ax.invert_yaxis()  # top to bottom in the order of the tables
    ax.set_xlim(0, 1)
    ax.set_xlabel("macro recall per fold (dots), mean ± std")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def recall_heatmap(table: pd.DataFrame):
    """Per-class recall (columns) per configuration (rows)."""
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 3, 0.5 * len(table) + 1.5))
    sns.heatmap(table, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax, cbar=False)
    ax.set_ylabel("")
    plt.setp(ax.get_yticklabels(), fontsize=7)
    fig.tight_layout()
    return fig


def frontier(table: pd.DataFrame, fronts: dict[str, list[str]]):
    """Test macro recall against batch-1 latency and against file size for every (width, format) model;
    INT8 models marked not fit are hollow; the dashed line joins each frontier."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, col, label in zip(axes, ["batch-1 p50 ms", "size MB"],
                              ["ONNX Runtime batch-1 latency p50 (ms)", "file size (MB)"]):
        front = table.loc[fronts[col]]
        for fmt, marker in (("FP32", "o"), ("INT8", "s")):
            part = table[table["format"] == fmt]
            ax.scatter(part[col], part["test macro recall"], marker=marker, s=60, label=fmt,
                       facecolors=["C0" if fmt == "FP32" else "C2" if ok else "none" for ok in part["fit"]],
                       edgecolors="C0" if fmt == "FP32" else "C2")
        ax.plot(front[col], front["test macro recall"], "k--", lw=1, label="frontier")
        for name, r in table.iterrows():
            ax.annotate(name, (r[col], r["test macro recall"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("test macro recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def visibility_per_class(manifest: pd.DataFrame, floor: float):
    """Each defect image's visibility (the contrast-to-noise ratio of its defect) by class, with the floor."""
    defects = manifest[manifest["class"] != "clean"]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    sns.boxplot(data=defects, x="class", y="visibility", ax=ax, color="C0", fliersize=2)
    ax.axhline(floor, color="red", ls="--", lw=1, label=f"floor {floor:g}")
    ax.axhline(floor * 2 / 3, color="orange", ls=":", lw=1, label="subtle floor")
    ax.set_yscale("log")
    ax.set_ylabel("defect CNR (log scale)")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
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
