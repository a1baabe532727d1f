"""Procedural generator of synthetic top-down SEM wafer-defect images (the embedded dataset).

Renders 8-bit grayscale images of line/space, contact-array and planar patterns with one of the
8 defect classes: nm geometry with Mack-Thorsos line-edge roughness (`geometry`), defect
geometries (`defects`) placed on a class-independent layout (`scene`), then the SEM
image-formation chain: secondary-electron yield with edge effect, texture, background, beam
blur, scan distortion, charging, shot and detector noise, output contrast (`imaging`). Every
image is a pure function of (seed, class, index) (`render`).
"""

from lib.synthetic.geometry import CLASSES, LAYOUTS, image_seed
from lib.synthetic.render import WHAT, render_dataset, render_image, visibility_summary


def source_hash() -> str:
    """SHA-256 (16 hex digits) of the generator's source files, and of lib/plant.py, which adds the
    planted copies: a rendering made by other code is stale even when its settings are the same."""
    import hashlib
    from pathlib import Path

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in [*sorted(here.glob("*.py")), here.parent / "plant.py"]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


__all__ = ["CLASSES", "LAYOUTS", "WHAT", "image_seed", "render_image", "render_dataset", "source_hash",
           "visibility_summary"]
