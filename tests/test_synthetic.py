"""Unit tests for lib.synthetic, the procedural SEM defect-image generator."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib import synthetic as S  # noqa: E402
from lib.io import MARKER, OwnershipError  # noqa: E402

DEFECT_CLASSES = [c for c in S.CLASSES if c != "clean"]


def _sha(img: np.ndarray) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def sample():
    """20 images per class at 128 px: (image, params) lists, shared by several tests."""
    return {c: [S.render_image(0, c, i, size=128) for i in range(20)] for c in S.CLASSES}


# ------------------------------------------------------------------------------ interface
def test_public_names():
    assert S.CLASSES == ("bridge", "clean", "CMP(scratch)", "cracks", "LER", "open", "others", "vias")
    assert S.LAYOUTS == ("line_space", "contact_array", "planar")
    assert S.__doc__ and len(S.__doc__) < 1000


def test_unknown_class_raises_naming_it():
    with pytest.raises(ValueError, match="scratch"):
        S.render_image(0, "scratch", 0)
    with pytest.raises(ValueError, match="Vias"):
        S.image_seed(0, "Vias", 0)


# ------------------------------------------------------------------------------ determinism
def test_image_seed_is_stable_and_distinct():
    # pinned value: changing it silently would change every dataset rendered with seed 0
    assert S.image_seed(0, "clean", 0) == 2551235113066858146
    seeds = {S.image_seed(s, c, i) for s in (0, 1) for c in S.CLASSES for i in range(5)}
    assert len(seeds) == 2 * len(S.CLASSES) * 5
    assert all(isinstance(x, int) and 0 <= x < 2**63 for x in seeds)


def test_render_is_deterministic_and_index_dependent():
    a, pa = S.render_image(5, "vias", 3, size=96)
    b, pb = S.render_image(5, "vias", 3, size=96)
    assert a.tobytes() == b.tobytes() and pa == pb
    c, _ = S.render_image(5, "vias", 4, size=96)
    d, _ = S.render_image(6, "vias", 3, size=96)
    assert a.tobytes() != c.tobytes() and a.tobytes() != d.tobytes()


def test_same_bytes_in_another_process_and_import_has_no_side_effects(tmp_path):
    """A fresh interpreter (different hash seed, empty cwd) renders the same bytes; importing
    the module creates no files and configures no logging."""
    cases = [("CMP(scratch)", 2), ("others", 1)]
    code = (
        "import hashlib, json, logging, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import lib.synthetic as S\n"
        "handlers = len(logging.getLogger().handlers)\n"
        f"out = [(S.image_seed(3, c, i), hashlib.sha256(S.render_image(3, c, i, size=64)[0].tobytes()).hexdigest())"
        f" for c, i in {cases!r}]\n"
        "print(json.dumps({'handlers': handlers, 'out': out}))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True)
    got = json.loads(res.stdout)
    assert got["handlers"] == 0
    assert list(tmp_path.iterdir()) == []
    want = [[S.image_seed(3, c, i), _sha(S.render_image(3, c, i, size=64)[0])] for c, i in cases]
    assert got["out"] == want


# ------------------------------------------------------------------------------ images and parameters
@pytest.mark.parametrize("size", [96, 224])
def test_every_class_renders(size):
    for i, cls in enumerate(S.CLASSES):
        img, params = S.render_image(1, cls, i, size=size)
        assert img.dtype == np.uint8 and img.shape == (size, size)
        assert img.std() > 2  # not blank
        json.dumps(params)
        assert all(isinstance(v, (str, int, float, bool)) or (v is None and cls == "clean") for v in params.values())
        assert params["image_seed"] == S.image_seed(1, cls, i)
        assert (params["visibility"] is None) == (cls == "clean")
        for key in ("layout", "pixel_nm", "defect", "n_defects", "electrons_per_px", "frames",
                    "noise_model", "beam_sigma_nm", "detector_sigma", "charging", "black_level",
                    "white_level", "gamma"):
            assert key in params, key


def test_parameter_ranges(sample):
    for cls, items in sample.items():
        for _, p in items:
            assert 0.7 <= p["pixel_nm"] <= 1.5
            assert p["frames"] in (1, 2, 4, 8, 16, 32) and 3 <= p["electrons_per_px"] <= 15
            assert p["noise_model"] in ("poisson", "gamma") and 1 <= p["beam_sigma_nm"] <= 3
            assert 5 <= p["black_level"] <= 30 and 200 <= p["white_level"] <= 250
            assert 1.5 <= p["snr_nominal"] <= 15
            if p["layout"] == "line_space":
                assert 28 <= p["pitch_nm"] <= 80 and 0.4 <= p["cd_nm"] / p["pitch_nm"] <= 0.6
                assert abs(p["tilt_deg"]) <= 2 and 1.5 <= p["ler_3sigma_nm"] <= 4
            if cls == "LER":
                assert 7 <= p["ler_defect_3sigma_nm"] <= 14 and p["ler_rough_fraction"] >= 0.5


def test_defect_labels(sample):
    for cls, items in sample.items():
        for _, p in items:
            if cls == "clean":
                assert p["defect"] == "none" and p["n_defects"] == 0
            else:
                assert p["n_defects"] >= 1, (cls, p)
                assert p["defect"].startswith(cls), (cls, p["defect"])


def test_class_layouts(sample):
    allowed = {"bridge": {"line_space"}, "open": {"line_space"}, "LER": {"line_space"},
               "vias": {"contact_array"}, "CMP(scratch)": {"line_space", "planar"},
               "clean": set(S.LAYOUTS), "others": set(S.LAYOUTS), "cracks": set(S.LAYOUTS)}
    for cls, items in sample.items():
        assert {p["layout"] for _, p in items} <= allowed[cls], cls


def test_clean_covers_every_layout(sample):
    layouts = {p["layout"] for _, p in sample["clean"]}
    layouts |= {S.render_image(0, "clean", i, size=48)[1]["layout"] for i in range(20, 40)}
    assert layouts == set(S.LAYOUTS)


def _auc(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.mean(a[:, None] > b[None, :]) + 0.5 * np.mean(a[:, None] == b[None, :]))


def _noise(img: np.ndarray) -> float:
    d = np.diff(img.astype(float), axis=1)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def test_brightness_and_noise_do_not_separate_clean_from_defects(sample):
    """No shortcut: image mean and a robust noise estimate overlap broadly between clean and the
    defect classes (loose bounds; a class drawn with another noise or brightness model fails)."""
    for stat in (lambda im: float(im.mean()), _noise):
        clean = np.array([stat(im) for im, _ in sample["clean"]])
        pooled = []
        for cls in DEFECT_CLASSES:
            vals = np.array([stat(im) for im, _ in sample[cls]])
            pooled.extend(vals)
            sd = np.sqrt(0.5 * (vals.var() + clean.var()))
            assert abs(vals.mean() - clean.mean()) < 1.5 * sd, cls
            assert 0.1 < _auc(vals, clean) < 0.9, cls
        assert 0.3 < _auc(pooled, clean) < 0.7


# ------------------------------------------------------------------------------ dataset
def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_render_dataset_tree_manifest_and_worker_independence(tmp_path):
    a = S.render_dataset(tmp_path / "a", n_per_class=2, seed=4, size=64, workers=1)
    b = S.render_dataset(tmp_path / "b", n_per_class=2, seed=4, size=64, workers=2)
    for df, root in ((a, tmp_path / "a"), (b, tmp_path / "b")):
        assert list(df.columns[:4]) == ["path", "class", "index", "image_seed"]
        assert len(df) == 2 * len(S.CLASSES)
        assert df["class"].value_counts().to_dict() == {c: 2 for c in S.CLASSES}
        man = pd.read_csv(root / "manifest.csv")
        assert list(man.columns) == list(df.columns) and len(man) == len(df)
        assert sorted(p.name for p in root.iterdir()) == sorted(list(S.CLASSES) + ["manifest.csv", MARKER])
        for rel in df["path"]:
            with Image.open(root / rel) as im:
                assert im.mode == "L" and im.size == (64, 64)
    assert "CMP(scratch)/cmp_scratch_0001.png" in set(a["path"])
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)
    # manifest rows reproduce their images
    row = a.iloc[5]
    img, params = S.render_image(4, row["class"], int(row["index"]), size=64)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / row["path"])), img)
    assert int(row["image_seed"]) == params["image_seed"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_render_dataset_imbalanced_counts(tmp_path):
    df = S.render_dataset(tmp_path / "d", n_per_class={"clean": 3, "vias": 1}, size=48, workers=1)
    assert df["class"].value_counts().to_dict() == {"clean": 3, "vias": 1}
    assert sorted(p.name for p in (tmp_path / "d" / "clean").iterdir()) == [
        "clean_0000.png", "clean_0001.png", "clean_0002.png"]
    assert not (tmp_path / "d" / "bridge").exists()


def test_render_dataset_refuses_a_folder_it_did_not_create(tmp_path):
    out = tmp_path / "data"
    (out / "vias").mkdir(parents=True)
    (out / "vias" / "mine.png").write_bytes(b"a user's image")
    (out / "notes.txt").write_text("old")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OwnershipError, match=f"{out} .*holds files the project did not create.*notes.txt"):
        S.render_dataset(out, n_per_class=1, classes=("clean",), size=48, workers=1)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left behind


def test_render_dataset_fills_an_empty_folder_in_place_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    S.render_dataset(out, n_per_class=1, classes=("clean",), size=48, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "clean", "manifest.csv"]
    S.render_dataset(out, n_per_class=1, classes=("vias",), size=48, workers=1)  # its own: replaced whole
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "manifest.csv", "vias"]
    (out / "vias" / "added_by_hand.png").write_bytes(b"x")  # a file the project did not write
    with pytest.raises(OwnershipError, match="added_by_hand.png"):
        S.render_dataset(out, n_per_class=1, classes=("clean",), size=48, workers=1)
    assert (out / "vias" / "added_by_hand.png").read_bytes() == b"x"


def test_render_dataset_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "data"
    S.render_dataset(out, n_per_class=1, classes=("clean",), size=48, workers=1)
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # invalid request: nothing touched
    with pytest.raises(ValueError, match="nope"):
        S.render_dataset(out, n_per_class=1, classes=("clean", "nope"), size=48, workers=1)
    # failure in the middle of rendering: old folder intact, staging folder removed
    real = S.render_image

    def flaky(seed, cls, index, **kwargs):
        if cls == "open":
            raise RuntimeError("boom")
        return real(seed, cls, index, **kwargs)

    monkeypatch.setattr(S.render, "render_image", flaky)  # where the workers look it up
    for workers in (1, 2) if "fork" in mp.get_all_start_methods() else (1,):
        with pytest.raises(RuntimeError, match="boom"):
            S.render_dataset(out, n_per_class=2, size=48, workers=workers)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # success replaces the old folder completely
    S.render_dataset(out, n_per_class=1, classes=("vias",), size=48, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "manifest.csv", "vias"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_defects_are_redrawn_until_visible_and_the_noise_never_is():
    """A defect below the visibility floor is redrawn (same layout and imaging), and when no draw
    reaches it, the most visible one's contrast is raised to it; clean images and the imaging
    parameters do not depend on the floor."""
    for cls, i in (("cracks", 2), ("cracks", 9), ("CMP(scratch)", 4), ("cracks", 19)):
        _, loose = S.render_image(0, cls, i, size=96, min_visibility=0.0)
        _, strict = S.render_image(0, cls, i, size=96, min_visibility=1.5, subtle_share=0.0)
        assert loose["visibility_draws"] == 1
        assert strict["visibility"] >= min(1.5, loose["visibility"]) - 1e-9
        assert strict["visibility"] >= 1.5  # redrawn, or when twelve draws fall short, the best one's contrast raised
        assert (strict["contrast_gain"] > 1) == (loose["visibility"] < 1.5 and strict["visibility_draws"] == 12)
        for key in ("snr_nominal", "frames", "electrons_per_px", "detector_sigma", "layout", "pixel_nm"):
            assert strict[key] == loose[key], key
    a, pa = S.render_image(0, "clean", 3, size=96, min_visibility=0.0)
    b, pb = S.render_image(0, "clean", 3, size=96, min_visibility=3.0)
    assert np.array_equal(a, b) and pa == pb
