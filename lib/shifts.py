"""Named distribution shifts for robustness tests: what other tools, recipes and file handling
do to an SEM image.

Each shift maps a grayscale float32 image on 0-1, at the network's input size, to a shifted
image of the same size. It is applied after `lib.preprocess.load_gray` and before
`lib.preprocess.normalize`, so what is tested is the model's response to the shift, not the
resize policy. Random shifts (shot noise) draw from a generator seeded per image, so a
report is reproducible.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _down_up(side: int):
    def shift(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = gray.shape
        f = min(1.0, side / max(h, w))
        small = Image.fromarray(gray, mode="F").resize((max(1, round(w * f)), max(1, round(h * f))),
                                                        Image.Resampling.BILINEAR)
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
    return shift


def _shot_noise(peak: float):
    def shift(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.poisson(gray.astype(np.float64) * peak) / peak
    return shift


def _gamma(g: float):
    return lambda gray, rng: np.power(np.clip(gray, 0, 1), g)


def _contrast(f: float):
    return lambda gray, rng: (gray - gray.mean()) * f + gray.mean()


def _blur(sigma: float):
    from scipy.ndimage import gaussian_filter

    return lambda gray, rng: gaussian_filter(gray, sigma, mode="reflect")


def jpeg(gray: np.ndarray, quality: int) -> np.ndarray:
    """8-bit JPEG round trip of a 0-1 grayscale image at `quality`."""
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8), mode="L").save(
        buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf), dtype=np.float32) / 255


def _jpeg(quality: int):
    return lambda gray, rng: jpeg(gray, quality)


SHIFTS = {
    "none": lambda gray, rng: gray,
    "down-up 128 px": _down_up(128),
    "down-up 64 px": _down_up(64),
    "shot noise (peak 30 e-)": _shot_noise(30.0),
    "gamma 0.7": _gamma(0.7),
    "gamma 1.4": _gamma(1.4),
    "contrast x0.5": _contrast(0.5),
    "blur sigma 1.5 px": _blur(1.5),
    "JPEG quality 30": _jpeg(30),
}


def apply(name: str, gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """Shift cached images [N, 1, H, W] (or one [H, W]) by the named shift; float32 on 0-1."""
    if name not in SHIFTS:
        raise KeyError(f"unknown shift {name!r}; known shifts: {list(SHIFTS)}")
    fn = SHIFTS[name]
    if gray.ndim == 2:
        return np.clip(fn(gray.astype(np.float32), np.random.default_rng(seed)), 0, 1).astype(np.float32)
    out = np.empty_like(gray, dtype=np.float32)
    for i in range(len(gray)):
        out[i, 0] = np.clip(fn(gray[i, 0].astype(np.float32), np.random.default_rng([seed, i])), 0, 1)
    return out


def robustness(predict, gray: np.ndarray, y_true: np.ndarray, classes: list[str], *, names=None,
               seed: int = 0):
    """Macro recall, accuracy and miss rate of `predict(gray) -> predicted labels` on the same images
    under each named shift (every shift of SHIFTS by default, `none` first), and the drop in macro
    recall, in points, from the unshifted images when `none` is among the names."""
    import pandas as pd

    from lib.metrics import defect_vs_clean, macro_recall

    rows = []
    for name in names if names is not None else SHIFTS:
        pred = predict(gray if name == "none" else apply(name, gray, seed=seed))
        rows.append({"shift": name, "macro recall": macro_recall(y_true, pred, len(classes)),
                     "accuracy": float((pred == y_true).mean()) if len(y_true) else None,
                     "miss rate": defect_vs_clean(y_true, pred, classes)["miss_rate"]})
    table = pd.DataFrame(rows, columns=["shift", "macro recall", "accuracy", "miss rate"]).set_index("shift")
    if "none" in table.index:
        table["drop (points)"] = 100 * (table.loc["none", "macro recall"] - table["macro recall"])
    return table
