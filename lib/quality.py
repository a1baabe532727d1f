"""Data-quality audit: per-image measures and the flags they raise (thresholds from params)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

# flag -> (measure column, direction, parameter holding the threshold)
FLAGS = {
    "blurry": ("laplacian_var", "below", "quality_blur"),
    "dark": ("mean", "below", "quality_dark"),
    "bright": ("mean", "above", "quality_bright"),
    "low information": ("entropy", "below", "quality_entropy"),
    "near constant": ("std", "below", "quality_std"),
    "odd aspect ratio": ("aspect", "above", "quality_aspect"),
    "small": ("min_side", "below", "quality_min_side"),
    "large": ("max_side", "above", "quality_max_side"),
}


def measures(gray: np.ndarray) -> dict:
    """Sharpness, brightness, information and shape of one grayscale image on 0-1."""
    g8 = np.round(gray * 255)
    hist = np.bincount(g8.astype(np.uint8).ravel(), minlength=256) / g8.size
    nz = hist[hist > 0]
    h, w = gray.shape
    return {
        "laplacian_var": float(ndimage.laplace(g8.astype(np.float32)).var()),
        "entropy": float(-(nz * np.log2(nz)).sum()),
        "aspect": float(max(h, w) / max(1, min(h, w))),
        "min_side": int(min(h, w)),
        "max_side": int(max(h, w)),
    }


def flag(inventory: pd.DataFrame, params: dict) -> pd.DataFrame:
    """One boolean column per flag for the readable rows of an inventory."""
    out = pd.DataFrame(index=inventory.index)
    for name, (col, direction, key) in FLAGS.items():
        values = inventory[col].astype(float)
        out[name] = values < params[key] if direction == "below" else values > params[key]
    return out


def summary(readable: pd.DataFrame, params: dict, classes: list[str], root) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Flag counts per class (and over all), the flagged files (path relative to root, class, flags)
    and the flag table itself (one boolean column per flag, aligned with `readable`)."""
    import os

    flags = flag(readable, params)
    counts = flags.groupby(readable["class"]).sum().reindex(classes).astype(int)
    counts.loc["all"] = counts.sum()
    hit = flags.any(axis=1)
    flagged = pd.DataFrame({
        "path": [os.path.relpath(p, root) for p in readable.loc[hit, "path"]],
        "class": readable.loc[hit, "class"].to_numpy(),
        "flags": [", ".join(flags.columns[row]) for row in flags[hit].to_numpy()],
    })
    return counts, flagged, flags


def worst(readable: pd.DataFrame, flags: pd.DataFrame, name: str, n: int = 6) -> pd.DataFrame:
    """The n most extreme readable images raising flag `name`, by its measure."""
    col, direction, _ = FLAGS[name]
    return readable[flags[name]].sort_values(col, ascending=direction == "below").head(n)
