"""Dataset discovery, image decoding and the one definition of preprocessing.

An image becomes a network input in two steps, used identically by training, evaluation,
export and inference:

1. `load_gray(path, size, resize=, background=)`: decode (first frame, EXIF orientation
   applied), convert to one grayscale channel on a 0-1 scale by the file's bit depth, bring
   to size × size by the resize policy (stretch, letterbox or centre crop).
2. `normalize(gray)`: replicate to 3 channels and apply the ImageNet mean/std, giving the
   float32 [N, 3, H, W] tensor the model (and its ONNX export) takes.

Training inserts its augmentation between the two steps.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
# The file extensions that name each format Pillow reads (a .png that holds a JPEG is read by its content).
FORMAT_EXTENSIONS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg"), "BMP": (".bmp",),
                     "TIFF": (".tif", ".tiff"), "GIF": (".gif",)}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Refuse images that decode to more pixels than this (a decompression bomb guard).
MAX_PIXELS = 100_000_000


class DataError(ValueError):
    """The dataset cannot be used as given; the message names the folder or file."""


def _decode(path: str | Path) -> Image.Image:
    """Open and fully decode an image (first frame), with EXIF orientation applied.

    More than MAX_PIXELS pixels is refused (DecompressionBombError) before decoding.
    """
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its limit; here the limit is the limit
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _open(path)


def _open(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        im.load()
        return im.copy()


def _bit_depth(im: Image.Image) -> int:
    return {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(im.mode, 8)


RESIZE_POLICIES = ("stretch", "letterbox", "crop")


def to_gray(im: Image.Image, background: float = 0.0) -> np.ndarray:
    """Grayscale float32 array on 0-1 from any PIL mode (alpha composited onto `background`, 0-1)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float32)
        hi = 65535.0 if a.max(initial=0) > 255 else 255.0
        return np.clip(a / hi, 0.0, 1.0)
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        level = int(round(255 * background))
        bg = Image.new("RGBA", im.size, (level, level, level, 255))
        im = Image.alpha_composite(bg, im.convert("RGBA"))
    if im.mode != "L":
        im = im.convert("RGB").convert("L")  # ITU-R 601-2 luma
    return np.asarray(im, dtype=np.float32) / 255.0


def _resize(gray: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(gray, mode="F").resize((w, h), Image.Resampling.BILINEAR))


def fit_square(gray: np.ndarray, size: int, resize: str = "stretch") -> np.ndarray:
    """Bring a grayscale array to size x size by one of RESIZE_POLICIES.

    stretch: ignore the aspect ratio; letterbox: fit the long side, pad the rest with the
    image's mean; crop: fit the short side, cut the centre.
    """
    h, w = gray.shape
    if resize == "stretch" or (h == w):
        return gray if gray.shape == (size, size) else _resize(gray, size, size)
    if resize == "letterbox":
        f = size / max(h, w)
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        out = np.full((size, size), gray.mean(), np.float32)
        y, x = (size - nh) // 2, (size - nw) // 2
        out[y : y + nh, x : x + nw] = _resize(gray, nw, nh)
        return out
    if resize == "crop":
        f = size / min(h, w)
        nw, nh = max(size, round(w * f)), max(size, round(h * f))
        big = _resize(gray, nw, nh)
        y, x = (nh - size) // 2, (nw - size) // 2
        return big[y : y + size, x : x + size]
    raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")


def load_gray(path: str | Path, size: int, *, resize: str = "stretch", background: float = 0.0) -> np.ndarray:
    """Decode `path` to a (size, size) float32 grayscale array on 0-1 (bilinear, antialiased)."""
    gray = fit_square(to_gray(_decode(path), background), size, resize)
    return np.clip(gray, 0.0, 1.0).astype(np.float32, copy=False)


def normalize(gray):
    """[N, 1, H, W] or [1, H, W] grayscale on 0-1 -> 3-channel ImageNet-normalised float32.

    Works on numpy arrays and torch tensors alike.
    """
    mean = np.asarray(MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(STD, dtype=np.float32).reshape(3, 1, 1)
    if isinstance(gray, np.ndarray):
        return ((gray.astype(np.float32) - mean) / std).astype(np.float32)
    import torch

    return (gray - torch.from_numpy(mean).to(gray.device)) / torch.from_numpy(std).to(gray.device)


def load_input(paths, size: int, *, resize: str = "stretch", background: float = 0.0) -> np.ndarray:
    """Files -> the model's input batch, float32 [N, 3, size, size]."""
    gray = np.stack([load_gray(p, size, resize=resize, background=background) for p in paths])[:, None]
    return normalize(gray)


def preprocessing_spec(size: int, *, resize: str = "stretch", background: float = 0.0) -> dict:
    """How to turn an image file into the model input, stated for other runtimes."""
    return {
        "input_name": "input",
        "layout": "NCHW",
        "dtype": "float32",
        "shape": [None, 3, size, size],
        "steps": [
            "decode the file's first frame; apply its EXIF orientation",
            "convert to one grayscale channel: 16-bit images divided by 65535, 8-bit by 255; "
            "RGB by ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B); alpha composited onto a gray "
            f"background of {background} (0-1 scale)",
            {"stretch": f"resize to {size}x{size} pixels with bilinear interpolation (antialiased when "
                        "shrinking), ignoring the aspect ratio",
             "letterbox": f"resize so the long side is {size} pixels (bilinear), then pad to {size}x{size}, "
                          "centred, with the image's mean intensity",
             "crop": f"resize so the short side is {size} pixels (bilinear), then cut the central "
                     f"{size}x{size}"}[resize],
            "replicate the grayscale channel to 3 channels",
            "per channel c: (x - mean[c]) / std[c]",
        ],
        "resize": resize,
        "alpha_background": background,
        "mean": list(MEAN),
        "std": list(STD),
        "value_range_before_normalization": [0.0, 1.0],
        "output": "logits, float32 [N, n_classes]; softmax gives probabilities; class order in labels.json",
    }


SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test"}


def class_lookup(classes: list[str], aliases=()) -> dict[str, str]:
    """Lower-cased folder name -> canonical class, from the class list and "alias:class" entries."""
    lookup = {c.lower(): c for c in classes}
    for entry in aliases:
        alias, sep, target = entry.partition(":")
        if not sep or not alias.strip() or target.strip() not in classes:
            raise DataError(f"class alias {entry!r} must read alias:class with class one of {classes}")
        lookup[alias.strip().lower()] = target.strip()
    return lookup


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(root: Path) -> str:
    """'presplit' when root holds split folders (train/, val|valid|validate|validation/, test/), else 'unsplit'."""
    return "presplit" if any(p.name.lower() in SPLIT_NAMES for p in _subfolders(root)) else "unsplit"


def list_images(root: str | Path, classes: list[str], *, aliases=(), unknown_folders: str = "fail"
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All image files of an image-folder tree, as rows (path, class, folder, given_split).

    Layouts: `<root>/<class>/...` or `<root>/{train,val|valid|validate|validation,test}/<class>/...`
    (given_split holds the split then; a missing validation or test split is carved out of
    train later, by duplicate group). Class folders match `classes` case-insensitively or
    through `aliases` ("alias:class"); files in nested folders belong to the class folder
    they sit in. Folders matching no class (and, in a pre-split tree, top-level folders that
    are no split) are returned as the second frame (path, files); with unknown_folders="fail"
    they raise instead. Raises DataError naming a missing root, a pre-split tree without
    train/, a split named by two folders, a class without any image file, or a bad alias.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (set data_dir in your params file to your image folder)")
    lookup = class_lookup(classes, aliases)
    rows, unmatched = [], []
    if detect_layout(root) == "presplit":
        parents = []
        for p in _subfolders(root):
            split = SPLIT_NAMES.get(p.name.lower())
            if split is None:
                unmatched.append({"folder": str(p), "image_files": _count_images(p)})
            else:
                parents.append((split, p))
        given = [s for s, _ in parents]
        twice = sorted({s for s in given if given.count(s) > 1})
        if twice:
            raise DataError(f"{root}: several folders name the {twice} split(s): "
                            + ", ".join(p.name for s, p in parents if s in twice))
        if "train" not in given:
            raise DataError(f"{root} is a pre-split tree ({', '.join(p.name + '/' for _, p in parents)}) without a "
                            f"train/ folder: add one, or arrange the images one folder per class")
    else:
        parents = [(None, root)]
    for split, parent in parents:
        for folder in _subfolders(parent):
            files = _image_files(folder)
            cls = lookup.get(folder.name.lower())
            if cls is None:
                unmatched.append({"folder": str(folder), "image_files": len(files)})
                continue
            rows += [{"path": str(p), "class": cls, "folder": folder.name, "given_split": split} for p in files]
    unmatched = pd.DataFrame(unmatched, columns=["folder", "image_files"])
    if len(unmatched) and unknown_folders == "fail":
        raise DataError("folders that match no class (add an alias in class_aliases, or set unknown_folders: "
                        "ignore): " + ", ".join(unmatched["folder"]))
    files = pd.DataFrame(rows, columns=["path", "class", "folder", "given_split"])
    missing = [c for c in classes if c not in set(files["class"])]
    if missing:
        raise DataError(f"no image files for class(es) {missing} under {root} "
                        f"(class folders there: {sorted({f.name for _, p in parents for f in _subfolders(p)})}); "
                        f"add images, or remove the class from `classes`")
    return files, unmatched


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _count_images(folder: Path) -> int:
    return len(_image_files(folder))


def inspect_file(path: str) -> dict:
    """Decode one file completely; report its size, mode, bit depth and intensity, or why it failed."""
    info = {"bytes": os.path.getsize(path), "width": None, "height": None, "mode": None, "bit_depth": None,
            "format": None, "extension_matches": None, "mean": None, "std": None, "readable": False, "reason": ""}
    if info["bytes"] == 0:
        info["reason"] = "empty file (0 bytes)"
        return info
    try:
        im = _decode(path)
        gray = to_gray(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        info["reason"] = f"too many pixels: {e}"
        return info
    except Exception as e:  # noqa: BLE001 - every decoder failure is reported, not raised
        info["reason"] = f"{type(e).__name__}: {e}".strip()
        return info
    from lib.quality import measures

    with Image.open(path) as raw:
        fmt = raw.format or ""
    info.update(width=im.width, height=im.height, mode=im.mode, bit_depth=_bit_depth(im), format=fmt,
                extension_matches=Path(path).suffix.lower() in FORMAT_EXTENSIONS.get(fmt, (Path(path).suffix.lower(),)),
                mean=float(gray.mean()), std=float(gray.std()), readable=True, **measures(gray))
    return info


def inventory(root: str | Path, classes: list[str], workers: int = 2, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """list_images (kwargs go to it) + inspect_file for each file, in parallel over files."""
    files, unmatched = list_images(root, classes, **kwargs)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        infos = list(pool.map(inspect_file, files["path"], chunksize=32))
    return pd.concat([files, pd.DataFrame(infos)], axis=1), unmatched


def load_split(split_csv: str | Path) -> pd.DataFrame:
    """The split manifest written by the leakage audit (path, class, split, group ...)."""
    split_csv = Path(split_csv)
    if not split_csv.is_file():
        raise DataError(f"split manifest not found: {split_csv} (run the leakage audit stage first)")
    return pd.read_csv(split_csv)


def cache_gray(paths, size: int, *, resize: str = "stretch", background: float = 0.0, workers: int = 2) -> np.ndarray:
    """Decode and resize many files once: float32 [N, 1, size, size] on 0-1."""
    from functools import partial

    load = partial(load_gray, size=size, resize=resize, background=background)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(pool.map(load, list(paths), chunksize=16))
    return np.stack(arrays)[:, None] if arrays else np.zeros((0, 1, size, size), np.float32)


def label_order(classes: list[str]) -> list[str]:
    """The class order of the network's outputs: sorted, as scikit-learn's LabelEncoder orders them."""
    if len(set(classes)) != len(classes):
        raise DataError(f"duplicate class names in {classes}")
    return sorted(classes)


def fingerprint_tree(root: str | Path) -> dict:
    """A cheap fingerprint of every file under root (relative path, size, mtime)."""
    import hashlib

    root = Path(root)
    h = hashlib.sha256()
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
    return {"root": str(root), "files": n, "sha256": h.hexdigest()}


def prepare(P: dict) -> dict:
    """Make the run's images ready and describe them.

    data_dir set: your folder, checked to exist and never written to. data_dir empty: the
    embedded synthetic dataset, rendered into synthetic_dir when that folder does not hold
    a rendering with the same settings. Rendering goes through `lib.io.replace_folder`: it
    never touches a folder the project did not create (lib.io.OwnershipError names it).
    """
    import time

    from lib import io
    from lib.params import dataset_root

    root = dataset_root(P)
    info: dict = {"data_dir": P["data_dir"], "root": str(root), "synthetic": not P["data_dir"]}
    if not P["data_dir"]:
        from lib import synthetic

        settings = {"seed": P["seed"], "n_per_class": P["synthetic_per_class"], "size": P["synthetic_size"],
                    "classes": list(P["classes"]), "plant_copies": P["synthetic_plant_copies"]}
        current = io.marker(root) or {}
        if current.get("what") != synthetic.WHAT or current.get("settings") != settings:
            t = time.perf_counter()

            def finish(folder: Path, manifest: pd.DataFrame) -> dict:
                if settings["plant_copies"]:
                    from lib.plant import plant_copies

                    plant_copies(folder, manifest, settings["plant_copies"], settings["seed"])
                return {"settings": settings, "render_seconds": time.perf_counter() - t}

            synthetic.render_dataset(root, n_per_class=settings["n_per_class"], seed=settings["seed"],
                                     size=settings["size"], classes=tuple(settings["classes"]), workers=2,
                                     progress=True, finish=finish)
            print(f"rendered the synthetic dataset into {root} in {time.perf_counter() - t:.1f} s")
        info["render_seconds"] = io.marker(root)["render_seconds"]
    elif not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (set data_dir in your params file to your image folder)")
    info["fingerprint"] = fingerprint_tree(root)
    return info


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    import yaml

    from lib.io import write_text_if_changed

    ap = argparse.ArgumentParser(description="Prepare the dataset named by a parameter file.")
    ap.add_argument("command", choices=["prepare"])
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True, help="dataset description (JSON), rewritten only when it changed")
    args = ap.parse_args(argv)
    from lib.io import OwnershipError, dumps

    try:
        info = prepare(yaml.safe_load(Path(args.params).read_text()))
    except (DataError, OwnershipError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_text_if_changed(args.out, dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
