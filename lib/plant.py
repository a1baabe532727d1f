"""Planted duplicates: known copies of known originals, so the leakage audit can be scored.

Kinds, after what real SEM datasets hold:
- exact: the same file under another name;
- reencoded: the same pixels in another format (BMP or TIFF);
- resized: rescaled by 0.5-2x;
- brightness: brightness and contrast shifted by 8-20%;
- crop: 3-8% cut off the edges;
- augmented: `<original>_aug<N>.png` with added noise, as offline augmentation writes them.

Copies other than `augmented` get random names, so only content can give them away.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from lib.io import write_text_atomic

KINDS = ("exact", "reencoded", "resized", "brightness", "crop", "augmented")


def _copy(src: Path, kind: str, rng: np.random.Generator) -> tuple[Path, str]:
    """Write one copy of src beside it; return (path, what was done)."""
    im = Image.open(src)
    name = f"p{rng.integers(0, 2**40):010x}"
    if kind == "exact":
        dst = src.with_name(name + src.suffix)
        dst.write_bytes(src.read_bytes())
        return dst, "byte copy"
    if kind == "reencoded":
        fmt = ("BMP", "TIFF")[int(rng.integers(2))]
        dst = src.with_name(f"{name}.{fmt.lower()}")
        im.save(dst, format=fmt)
        return dst, fmt
    if kind == "resized":
        f = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        dst = src.with_name(name + ".png")
        im.resize((max(8, round(im.width * f)), max(8, round(im.height * f))), Image.Resampling.BICUBIC).save(dst)
        return dst, f"x{f:.2f}"
    if kind == "brightness":
        b, c = (1 + rng.choice([-1, 1]) * rng.uniform(0.08, 0.2) for _ in range(2))
        dst = src.with_name(name + ".png")
        ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b)).enhance(c).save(dst)
        return dst, f"brightness x{b:.2f}, contrast x{c:.2f}"
    if kind == "crop":
        w, h = im.size
        cut = rng.uniform(0.03, 0.08, 4)
        box = (round(cut[0] * w), round(cut[1] * h), w - round(cut[2] * w), h - round(cut[3] * h))
        dst = src.with_name(name + ".png")
        im.crop(box).save(dst)
        return dst, f"crop {box}"
    if kind == "augmented":
        n = int(rng.integers(1, 5))
        dst = src.with_name(f"{src.stem}_aug{n}.png")
        a = np.asarray(im.convert("L"), np.float32) + rng.normal(0, 6, (im.height, im.width))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(dst)
        return dst, f"noise std 6, _aug{n}"
    raise ValueError(f"unknown planted-copy kind {kind!r}")


def plant_copies(root: str | Path, manifest: pd.DataFrame, n_per_kind: int, seed: int) -> pd.DataFrame:
    """Plant n_per_kind copies of each kind of distinct originals under root; write root/planted.csv.

    Each original gets at most one copy, so every planted family is (original, copy).
    """
    root = Path(root)
    rng = np.random.default_rng([seed, 0x9E3779B9])
    need = n_per_kind * len(KINDS)
    if need > len(manifest):
        raise ValueError(f"cannot plant {need} copies among {len(manifest)} originals")
    originals = manifest["path"].to_numpy()[rng.choice(len(manifest), size=need, replace=False)]
    rows = []
    for k, kind in enumerate(KINDS):
        for rel in originals[k * n_per_kind : (k + 1) * n_per_kind]:
            dst, detail = _copy(root / rel, kind, rng)
            rows.append({"copy": dst.relative_to(root).as_posix(), "original": rel, "kind": kind, "detail": detail})
    planted = pd.DataFrame(rows, columns=["copy", "original", "kind", "detail"])
    write_text_atomic(root / "planted.csv", planted.to_csv(index=False))
    return planted


def score(df: pd.DataFrame, pairs: dict[str, np.ndarray], planted: pd.DataFrame, root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How well the audit found the planted copies, and how many pairs it made between distinct images.

    df: the audited files (path, group); pairs: linked index pairs per detector.
    Returns (per-kind detection table, per-detector false-pair table).
    """
    root = Path(root)
    index = {p: i for i, p in enumerate(df["path"])}
    family = {i: i for i in range(len(df))}  # every file is its own original unless planted
    for r in planted.itertuples():
        c, o = index.get(str(root / r.copy)), index.get(str(root / r.original))
        if c is not None and o is not None:
            family[c] = o
    linked = {det: {frozenset(map(int, p)) for p in ps} for det, ps in pairs.items()}
    rows = []
    for kind, grp in planted.groupby("kind", sort=False):
        found = {det: 0 for det in pairs}
        grouped = 0
        for r in grp.itertuples():
            c, o = index[str(root / r.copy)], index[str(root / r.original)]
            grouped += int(df["group"].iat[c] == df["group"].iat[o])
            for det in pairs:
                found[det] += int(frozenset((c, o)) in linked[det])
        rows.append({"kind": kind, "planted": len(grp), **{f"found by {d}": found[d] for d in pairs},
                     "grouped with original": grouped, "detection rate": grouped / len(grp)})
    detection = pd.DataFrame(rows)
    false_rows = []
    for det, ps in pairs.items():
        false = sum(family[int(i)] != family[int(j)] for i, j in ps)
        false_rows.append({"detector": det, "linked pairs": len(ps), "false pairs (distinct images)": false})
    return detection, pd.DataFrame(false_rows)


def score_dataset(df: pd.DataFrame, pairs: dict[str, np.ndarray], root: str | Path):
    """`score` against the dataset's own planted.csv, or None when it holds no planted copies."""
    planted = Path(root) / "planted.csv"
    if not planted.is_file():
        return None
    detection, false_pairs = score(df, pairs, pd.read_csv(planted), root)
    return detection.round(3), false_pairs
