"""The one definition of preprocessing: an image file becomes the network's input in two steps.

Used identically by training, evaluation, export and inference (`lib.predict`, and stated for
other runtimes in the bundle's `preprocessing.json`):

1. `load_gray(path, size, resize=, background=)`: decode (first frame, EXIF orientation
   applied), convert to one grayscale channel on a 0-1 scale by the file's bit depth, bring
   to size × size by the resize policy (stretch, letterbox or centre crop).
2. `normalize(gray)`: replicate to 3 channels and apply the ImageNet mean/std, giving the
   float32 [N, 3, H, W] tensor the model (and its ONNX export) takes.

Training inserts its augmentation (`lib.presets`) between the two steps.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
# The file extensions that name each format Pillow reads (a .png that holds a JPEG is read by its content).
FORMAT_EXTENSIONS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg"), "BMP": (".bmp",),
                     "TIFF": (".tif", ".tiff"), "GIF": (".gif",)}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Refuse images that decode to more pixels than this (a decompression bomb guard).
MAX_PIXELS = 100_000_000


def decode(path: str | Path) -> Image.Image:
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


def bit_depth(im: Image.Image) -> int:
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
    gray = fit_square(to_gray(decode(path), background), size, resize)
    return np.clip(gray, 0.0, 1.0).astype(np.float32, copy=False)


def normalize(gray):
    """[N, 1, H, W] or [1, H, W] grayscale on 0-1 -> 3-channel ImageNet-normalised float32.

    Works on torch tensors, numpy arrays and whatever `np.asarray` reads (a `lib.cache.DiskArray`).
    """
    mean = np.asarray(MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(STD, dtype=np.float32).reshape(3, 1, 1)
    if not type(gray).__module__.startswith("torch"):
        return ((np.asarray(gray, dtype=np.float32) - mean) / std).astype(np.float32)
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
