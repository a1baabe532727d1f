"""Small user image folders as real SEM datasets come: pre-split or not, class folders spelled
differently per split, mixed formats and modes, a notes file, an unreadable image. Plus a byte-for-byte
snapshot of a folder, to prove the pipeline never changes, adds or removes anything in it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import sem_like

CLASSES = ["bridge", "clean", "CMP(scratch)", "cracks", "LER", "open", "others", "vias"]
# How each split spells the class folders (the publisher's other splits spell `Vias` capitalised).
SPELLING = {"train": {"vias": "vias", "CMP(scratch)": "CMP(scratch)"},
            "validate": {"vias": "Vias", "CMP(scratch)": "cmp(scratch)"},
            "test": {"vias": "Vias", "CMP(scratch)": "CMP(SCRATCH)"}}


def _save(img: np.ndarray, path: Path, kind: str) -> None:
    """One image in one of the formats and modes real folders mix."""
    im = Image.fromarray(img)
    if kind == "jpeg":
        im.save(path.with_suffix(".jpg"), quality=90)
    elif kind == "tiff":
        im.save(path.with_suffix(".tif"))
    elif kind == "png16":
        Image.fromarray(img.astype(np.uint16) * 257).save(path.with_suffix(".png"))
    elif kind == "rgba":
        rgba = im.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.full(img.shape, 230, np.uint8)))
        rgba.save(path.with_suffix(".png"))
    elif kind == "cmyk":
        im.convert("CMYK").save(path.with_suffix(".jpg"), quality=90)
    elif kind == "palette":
        im.convert("P").save(path.with_suffix(".png"))
    elif kind == "jpeg_named_png":  # a JPEG saved under a .png name, as screenshots and exports often are
        im.save(path.with_suffix(".png"), format="JPEG", quality=90)
    else:
        im.save(path.with_suffix(".png"))


KINDS = ("png", "jpeg", "tiff", "png16", "rgba", "cmyk", "palette", "jpeg_named_png")


def user_folder(root: Path, *, splits=("train", "validate", "test"), per_split=None, seed: int = 0) -> Path:
    """<root>/<split>/<class>/... (or <root>/<class>/... when splits is empty) with distinct images."""
    per_split = per_split or {"train": 4, "validate": 2, "test": 2, None: 7}
    k = 0
    for split in splits or (None,):
        for c, cls in enumerate(CLASSES):
            folder = (root / split / SPELLING.get(split, {}).get(cls, cls)) if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_split[split]):
                k += 1
                size = (64, 80, 96)[k % 3]
                _save(sem_like(seed * 100003 + 1000 * c + 97 * k, size), folder / f"{cls[:3].lower()}_{k:04d}",
                      KINDS[k % len(KINDS)])
    (root / "README.txt").write_text("acquired on tool 7; do not modify\n")
    first = next(p for p in sorted(root.rglob("*")) if p.is_dir() and p.name.lower() == "clean")
    (first / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root: relative path -> sha256 of the bytes ('dir' for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out
