"""Decoding, preprocessing and dataset discovery, including bad input."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import sem_like
from lib import data
from lib.data import DataError


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
    g = data.load_gray(f, 80)
    assert g.shape == (80, 80) and g.dtype == np.float32
    assert np.abs(g - gray8 / 255.0).max() < 0.02, mode


def test_alpha_is_composited_onto_black(tmp_path):
    im = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    im.save(tmp_path / "t.png")
    assert data.load_gray(tmp_path / "t.png", 10).max() == 0.0


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40), np.uint8)
    a[:, :5] = 255  # bright stripe on the left
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    g = data.to_gray(data._decode(tmp_path / "r.jpg"))
    assert g.shape == (40, 20)
    assert g[:5].mean() > 0.8  # the stripe is now on top


def test_resize_and_normalize_shapes(tmp_path, gray8):
    Image.fromarray(gray8).save(tmp_path / "a.png")
    x = data.load_input([tmp_path / "a.png"] * 2, 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    # all three channels carry the same image, normalised per channel
    back = x[0] * np.asarray(data.STD)[:, None, None] + np.asarray(data.MEAN)[:, None, None]
    assert np.allclose(back[0], back[1], atol=1e-5) and np.allclose(back[1], back[2], atol=1e-5)


def test_numpy_and_torch_normalisation_agree(gray8):
    import torch

    g = (gray8[None, None] / 255.0).astype(np.float32)
    assert np.allclose(data.normalize(g), data.normalize(torch.from_numpy(g)).numpy(), atol=1e-6)


def bad_files(folder):
    good = io.BytesIO()
    Image.fromarray(sem_like(3, 64)).save(good, format="PNG")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    (folder / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    return {"zero.png": "empty file", "text.png": "cannot identify", "truncated.png": ""}


def test_bad_files_are_reported_with_a_reason_not_raised(image_tree):
    root, classes = image_tree(n=3)
    expected = bad_files(root / classes[0])
    inv, _ = data.inventory(root, classes, workers=1)
    bad = inv[~inv["readable"]].set_index(inv.loc[~inv["readable"], "path"].map(lambda p: p.rsplit("/", 1)[-1]))
    assert set(bad.index) == set(expected)
    for name, reason in expected.items():
        assert bad.loc[name, "reason"], name
        assert reason.lower() in bad.loc[name, "reason"].lower(), bad.loc[name, "reason"]
    assert inv["readable"].sum() == 3 * len(classes)


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found: .*nowhere"):
        data.list_images(tmp_path / "nowhere", ["a", "b"])


def test_missing_and_empty_class_folders_are_named(image_tree):
    root, classes = image_tree(n=2)
    with pytest.raises(DataError, match=r"no image files for class\(es\) \['open'\]"):
        data.list_images(root, classes + ["open"])
    (root / "open").mkdir()
    with pytest.raises(DataError, match=r"no image files for class\(es\) \['open'\]"):
        data.list_images(root, classes + ["open"])


def test_class_folders_match_case_insensitively_and_nested_files_count(image_tree):
    root, classes = image_tree(n=2)
    (root / "bridge").rename(root / "Bridge")
    (root / "Bridge" / "sub").mkdir()
    Image.fromarray(sem_like(9, 32)).save(root / "Bridge" / "sub" / "nested.png")
    files, unmatched = data.list_images(root, classes)
    assert (files["class"] == "bridge").sum() == 3 and unmatched.empty
    assert files["given_split"].isna().all()


def test_aliases_map_folders_and_bad_aliases_are_named(image_tree):
    root, classes = image_tree(classes=("CMP", "Vias", "clean"), n=2)
    files, _ = data.list_images(root, ["CMP(scratch)", "vias", "clean"], aliases=["cmp:CMP(scratch)"])
    assert sorted(files["class"].unique()) == ["CMP(scratch)", "clean", "vias"]
    assert set(files.loc[files["class"] == "vias", "folder"]) == {"Vias"}
    with pytest.raises(DataError, match="alias 'cmp:scratches'"):
        data.list_images(root, ["CMP(scratch)", "vias", "clean"], aliases=["cmp:scratches"])


def test_unknown_folders_fail_or_are_listed(image_tree):
    root, classes = image_tree(n=2)
    (root / "misc").mkdir()
    Image.fromarray(sem_like(5, 32)).save(root / "misc" / "a.png")
    with pytest.raises(DataError, match="match no class.*misc"):
        data.list_images(root, classes)
    files, unmatched = data.list_images(root, classes, unknown_folders="ignore")
    assert len(files) == 2 * len(classes)
    assert unmatched["folder"].str.endswith("misc").all() and unmatched["image_files"].tolist() == [1]


@pytest.mark.parametrize("val_name", ["val", "valid", "validate", "validation", "Val"])
def test_presplit_layout_keeps_the_given_split(tmp_path, val_name):
    for split, folder_case in (("train", "vias"), (val_name, "Vias"), ("test", "VIAS")):
        for cls in (folder_case, "clean"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(sem_like(hash((split, cls)) % 1000, 32)).save(tmp_path / split / cls / "x.png")
    assert data.detect_layout(tmp_path) == "presplit"
    files, _ = data.list_images(tmp_path, ["vias", "clean"])
    assert sorted(files["given_split"]) == ["test", "test", "train", "train", "val", "val"]
    assert set(files["class"]) == {"vias", "clean"}


def test_label_order_is_label_encoder_order():
    from sklearn.preprocessing import LabelEncoder

    classes = ["bridge", "clean", "CMP(scratch)", "cracks", "LER", "open", "others", "vias"]
    assert data.label_order(classes) == list(LabelEncoder().fit(classes).classes_)
    with pytest.raises(DataError, match="duplicate"):
        data.label_order(["a", "a"])


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop"])
def test_resize_policies_on_a_wide_image(resize):
    gray = np.zeros((50, 100), np.float32)
    gray[:, :50] = 1.0  # left half bright
    out = data.fit_square(gray, 40, resize)
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
    g = data.load_gray(tmp_path / "clear.png", 10, resize="letterbox", background=0.5)
    assert np.allclose(g, 128 / 255, atol=1e-3)
    spec = data.preprocessing_spec(10, resize="letterbox", background=0.5)
    assert spec["resize"] == "letterbox" and spec["alpha_background"] == 0.5
    with pytest.raises(ValueError, match="resize"):
        data.fit_square(np.zeros((4, 8), np.float32), 4, "squash")


def test_gif_first_frame_and_bmp(tmp_path):
    a, b = sem_like(1, 48), sem_like(2, 48)
    frames = [Image.fromarray(a).convert("P"), Image.fromarray(b).convert("P")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = data.load_gray(tmp_path / "anim.gif", 48)
    assert np.abs(first - a / 255.0).mean() < np.abs(first - b / 255.0).mean()
    Image.fromarray(a).save(tmp_path / "x.bmp")
    assert np.allclose(data.load_gray(tmp_path / "x.bmp", 48), a / 255.0, atol=1e-6)
