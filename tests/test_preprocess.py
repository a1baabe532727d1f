"""The one definition of preprocessing: every image mode, the resize policies, normalisation."""

import numpy as np
import pytest
from PIL import Image

from conftest import sem_like
from lib import preprocess


@pytest.fixture
def gray8():
    return sem_like(1, 80)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_every_mode_decodes_to_gray_on_0_1(tmp_path, gray8, mode):
    if mode == "I;16":
        im = Image.fromarray(gray8.astype(np.uint16) * 257)
        assert im.mode.startswith("I;16")
    elif mode in ("RGBA", "LA"):
        im = Image.fromarray(gray8).convert(mode)
    else:
        im = Image.fromarray(gray8).convert(mode)
    f = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    im.save(f)
    g = preprocess.load_gray(f, 80)
    assert g.shape == (80, 80) and g.dtype == np.float32
    assert np.abs(g - gray8 / 255.0).max() < 0.02, mode


def test_alpha_is_composited_onto_black(tmp_path):
    im = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    im.save(tmp_path / "t.png")
    assert preprocess.load_gray(tmp_path / "t.png", 10).max() == 0.0


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40), np.uint8)
    a[:, :5] = 255  # bright stripe on the left
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    g = preprocess.to_gray(preprocess.decode(tmp_path / "r.jpg"))
    assert g.shape == (40, 20)
    assert g[:5].mean() > 0.8  # the stripe is now on top


def test_resize_and_normalize_shapes(tmp_path, gray8):
    Image.fromarray(gray8).save(tmp_path / "a.png")
    x = preprocess.load_input([tmp_path / "a.png"] * 2, 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    # all three channels carry the same image, normalised per channel
    back = x[0] * np.asarray(preprocess.STD)[:, None, None] + np.asarray(preprocess.MEAN)[:, None, None]
    assert np.allclose(back[0], back[1], atol=1e-5) and np.allclose(back[1], back[2], atol=1e-5)


def test_numpy_and_torch_normalisation_agree(gray8):
    import torch

    g = (gray8[None, None] / 255.0).astype(np.float32)
    assert np.allclose(preprocess.normalize(g), preprocess.normalize(torch.from_numpy(g)).numpy(), atol=1e-6)


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop"])
def test_resize_policies_on_a_wide_image(resize):
    gray = np.zeros((50, 100), np.float32)
    gray[:, :50] = 1.0  # left half bright
    out = preprocess.fit_square(gray, 40, resize)
    assert out.shape == (40, 40)
    if resize == "stretch":
        assert out[:, :18].min() > 0.9 and out[:, 22:].max() < 0.1
    elif resize == "letterbox":
        assert np.allclose(out[:5], gray.mean()) and np.allclose(out[-5:], gray.mean())  # padding rows
        assert out[20, :18].min() > 0.9
    else:  # the centre 50x50 of the 50x100 image: half bright, half dark
        assert out[:, :18].min() > 0.9 and out[:, 22:].max() < 0.1


def test_alpha_background_and_policy_reach_the_input(tmp_path):
    Image.new("RGBA", (30, 10), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    g = preprocess.load_gray(tmp_path / "clear.png", 10, resize="letterbox", background=0.5)
    assert np.allclose(g, 128 / 255, atol=1e-3)
    spec = preprocess.preprocessing_spec(10, resize="letterbox", background=0.5)
    assert spec["resize"] == "letterbox" and spec["alpha_background"] == 0.5
    with pytest.raises(ValueError, match="resize"):
        preprocess.fit_square(np.zeros((4, 8), np.float32), 4, "squash")


def test_gif_first_frame_and_bmp(tmp_path):
    a, b = sem_like(1, 48), sem_like(2, 48)
    frames = [Image.fromarray(a).convert("P"), Image.fromarray(b).convert("P")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = preprocess.load_gray(tmp_path / "anim.gif", 48)
    assert np.abs(first - a / 255.0).mean() < np.abs(first - b / 255.0).mean()
    Image.fromarray(a).save(tmp_path / "x.bmp")
    assert np.allclose(preprocess.load_gray(tmp_path / "x.bmp", 48), a / 255.0, atol=1e-6)
