"""Shared fixtures: small image files built on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def sem_like(seed: int, size: int = 96) -> np.ndarray:
    """A distinct textured 8-bit image (lines at a random pitch and angle plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, pitch = rng.uniform(0, np.pi), rng.uniform(6, 20)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    img = 0.5 + 0.3 * np.sign(np.sin(2 * np.pi * u / pitch + rng.uniform(0, 6)))
    blobs = rng.normal(0, 1, (6, 6))
    img += 0.15 * np.kron(blobs, np.ones((size // 6 + 1, size // 6 + 1)))[:size, :size]
    img += rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def image_tree(tmp_path):
    """<tmp>/data/<class>/<class>_<i>.png with n distinct images per class; returns (root, classes)."""

    def make(classes=("bridge", "clean", "vias"), n: int = 6, size: int = 96):
        root = tmp_path / "data"
        for k, cls in enumerate(classes):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(sem_like(1000 * k + i, size)).save(root / cls / f"{cls}_{i:03d}.png")
        return root, list(classes)

    return make
