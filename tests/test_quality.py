"""Data-quality flags fire on the images they describe and stay quiet on a normal one."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from conftest import sem_like
from lib import data, params, preprocess, quality


def inventory_of(tmp_path, images: dict) -> pd.DataFrame:
    rows = []
    for name, arr in images.items():
        f = tmp_path / f"{name}.png"
        Image.fromarray(arr).save(f)
        rows.append({"path": str(f), "class": "c", **data.inspect_file(str(f))})
    return pd.DataFrame(rows).set_index(pd.Index(list(images)))


def test_each_flag_fires_on_its_image(tmp_path):
    normal = sem_like(0, 128)
    images = {
        "normal": normal,
        "blurry": ndimage.gaussian_filter(normal.astype(float), 6).astype(np.uint8),
        "dark": (normal * 0.1).astype(np.uint8),
        "bright": (255 - normal * 0.05).astype(np.uint8),
        "constant": np.full((128, 128), 120, np.uint8),
        "wide": sem_like(1, 128)[:40],
        "tiny": sem_like(2, 32),
    }
    inv = inventory_of(tmp_path, images)
    flags = quality.flag(inv, params.read_file(params.BASE))
    assert not flags.loc["normal"].any(), flags.loc["normal"]
    assert flags.loc["blurry", "blurry"]
    assert flags.loc["dark", "dark"] and flags.loc["bright", "bright"]
    assert flags.loc["constant", "near constant"] and flags.loc["constant", "low information"]
    assert flags.loc["wide", "odd aspect ratio"] and flags.loc["wide", "small"]
    assert flags.loc["tiny", "small"]


def test_decompression_bomb_is_refused_with_a_reason(tmp_path, monkeypatch):
    Image.fromarray(sem_like(3, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 100 * 100)
    info = data.inspect_file(str(tmp_path / "big.png"))
    assert not info["readable"] and "pixels" in info["reason"]
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        preprocess.load_gray(tmp_path / "big.png", 64)
