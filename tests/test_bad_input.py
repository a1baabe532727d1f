"""The README's bad-input table, row by row: what a user sees for each kind of bad input.

Every row ends in a named error (naming the file, folder or key, and no traceback from inside a
library) or in a reported exclusion; no row changes a file the user owns.
"""

from __future__ import annotations

import io as stdio
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, make, sem_like
from lib import data, leakage, params
from lib.data import DataError
from userdata import snapshot, user_folder


def clean_error(out, *needles):
    """A failed make run whose stderr names what is wrong, without a Python traceback."""
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for n in needles:
        assert n in out.stderr, (n, out.stderr[-3000:])


def inventory_of(tmp_path, files: dict[str, bytes | Image.Image]):
    """An unsplit folder: three classes of good images plus the given files in `clean`."""
    root = tmp_path / "data"
    for k, cls in enumerate(("bridge", "clean", "vias")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(sem_like(100 * k + i, 64)).save(root / cls / f"{cls}_{i}.png")
    for name, content in files.items():
        f = root / "clean" / name
        if isinstance(content, Image.Image):
            content.save(f)
        else:
            f.write_bytes(content)
    inv, _ = data.inventory(root, ["bridge", "clean", "vias"], workers=1)
    return inv.set_index(inv["path"].map(lambda p: p.rsplit("/", 1)[-1]))


def png_bytes(img: np.ndarray, fmt="PNG") -> bytes:
    buf = stdio.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


# --- files ---------------------------------------------------------------------------------


def test_zero_byte_truncated_and_non_image_files_are_excluded_with_the_reason(tmp_path):
    good = png_bytes(sem_like(7, 64))
    inv = inventory_of(tmp_path, {"zero.png": b"", "truncated.png": good[: len(good) // 2],
                                  "notes.png": b"this is text, not an image"})
    assert not inv.loc[["zero.png", "truncated.png", "notes.png"], "readable"].any()
    assert inv.loc["zero.png", "reason"] == "empty file (0 bytes)"
    assert inv.loc["truncated.png", "reason"] == "OSError: image file is truncated"
    assert "cannot identify image file" in inv.loc["notes.png", "reason"]
    assert inv["readable"].sum() == 9


def test_a_png_that_is_a_jpeg_is_read_by_its_content_and_listed(tmp_path):
    inv = inventory_of(tmp_path, {"really_a_jpeg.png": png_bytes(sem_like(8, 64), "JPEG")})
    row = inv.loc["really_a_jpeg.png"]
    assert row["readable"] and row["format"] == "JPEG" and row["extension_matches"] == False  # noqa: E712
    assert inv.drop(index="really_a_jpeg.png")["extension_matches"].all()


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "CMYK", "P"])
def test_16_bit_rgba_cmyk_and_palette_files_are_read_as_grayscale(tmp_path, mode):
    gray = sem_like(9, 64)
    im = Image.fromarray(gray.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(gray).convert(mode)
    name = "odd.tif" if mode in ("I;16", "CMYK") else "odd.png"
    inv = inventory_of(tmp_path, {name: im})
    assert inv.loc[name, "readable"] and inv.loc[name, "bit_depth"] == (16 if mode == "I;16" else 8)
    loaded = data.load_gray(tmp_path / "data" / "clean" / name, 64)
    tolerance = 0.08 if mode == "P" else 0.02  # a palette quantises the gray levels
    assert np.abs(loaded - gray / 255).mean() < tolerance


def test_a_decompression_bomb_is_excluded_before_it_is_decoded(tmp_path):
    bomb = Image.new("1", (12000, 9000))  # 108 million pixels in a few kilobytes
    inv = inventory_of(tmp_path, {"bomb.png": bomb})
    assert not inv.loc["bomb.png", "readable"]
    assert inv.loc["bomb.png", "reason"].startswith("too many pixels")


# --- folders -------------------------------------------------------------------------------


def test_an_unknown_class_folder_is_named_or_listed(image_tree):
    root, classes = image_tree(n=2)
    (root / "misc").mkdir()
    Image.fromarray(sem_like(5, 32)).save(root / "misc" / "a.png")
    with pytest.raises(DataError, match=f"match no class.*{root / 'misc'}"):
        data.list_images(root, classes)
    _, unmatched = data.list_images(root, classes, unknown_folders="ignore")
    assert unmatched["folder"].tolist() == [str(root / "misc")]


def test_an_empty_class_folder_is_named(image_tree):
    root, classes = image_tree(n=2)
    (root / "open").mkdir()
    with pytest.raises(DataError, match=r"no image files for class\(es\) \['open'\].*remove the class"):
        data.list_images(root, classes + ["open"])


def audited(root, classes):
    inv, _ = data.inventory(root, classes, workers=1)
    df, _ = leakage.audit(inv[inv["readable"]], 6, 6, workers=1)
    return df


def split(df, **kw):
    return leakage.make_split(df, **{"val_ratio": 0.15, "test_ratio": 0.15, "seed": 0, "on_leak": "fail",
                                     "phash_threshold": 6, "dhash_threshold": 6, **kw})


def test_an_empty_train_folder_of_a_class_is_named(tmp_path):
    root = user_folder(tmp_path / "d", per_split={"train": 3, "validate": 1, "test": 1})
    for f in (root / "train" / "open").iterdir():
        f.unlink()
    (root / "README.txt").unlink()
    with pytest.raises(DataError, match=r"class\(es\) \['open'\] have no training images"):
        split(audited(root, ["bridge", "clean", "open", "vias", "CMP(scratch)", "cracks", "LER", "others"]))


def test_a_class_with_a_single_image_is_named(image_tree):
    root, classes = image_tree(n=4)
    for f in sorted((root / "vias").iterdir())[1:]:
        f.unlink()
    with pytest.raises(DataError, match="class 'vias' has 1 group"):
        split(audited(root, classes))


def test_the_same_image_under_two_classes_is_left_out_and_listed(image_tree):
    root, classes = image_tree(n=5)
    (root / "vias" / "copied.png").write_bytes((root / "bridge" / "bridge_000.png").read_bytes())
    result = split(audited(root, classes))
    assert sorted(result.conflicts["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["bridge_000.png", "copied.png"]
    assert not result.df["path"].str.endswith(("bridge_000.png", "copied.png")).any()
    assert len(result.df) == 3 * 5 - 1


def test_a_presplit_tree_without_test_gets_a_test_split_carved_from_train(tmp_path):
    root = user_folder(tmp_path / "d", splits=("train", "val"), per_split={"train": 6, "val": 2})
    result = split(audited(root, ["bridge", "clean", "CMP(scratch)", "cracks", "LER", "open", "others", "vias"]))
    assert result.carved == ["test"] and set(result.df["split"]) == {"train", "val", "test"}
    assert (result.df.loc[result.df["split"] == "test", "given_split"] == "train").all()
    assert len(result.remaining) == 0


def test_a_presplit_tree_without_train_is_named(tmp_path):
    root = tmp_path / "d"
    for s in ("val", "test"):
        (root / s / "clean").mkdir(parents=True)
        Image.fromarray(sem_like(1, 32)).save(root / s / "clean" / "a.png")
    with pytest.raises(DataError, match=r"pre-split tree \(test/, val/\) without a train/ folder"):
        data.list_images(root, ["clean"])


# --- parameters ------------------------------------------------------------------------------


def run_with(tmp_path, text: str, target: str = "data"):
    """`make <target>` with one parameter file holding `text`; returns (the run, the file)."""
    f = tmp_path / "my.yaml"
    f.write_text(text)
    return make(target, f"PARAMS={f}", f"BUILD={tmp_path / 'b'}", f"REPORTS={tmp_path / 'r'}"), f


@pytest.mark.e2e
def test_a_mistyped_key_stops_the_run_naming_it_and_its_file(tmp_path):
    out, f = run_with(tmp_path, "epoch: 3\n", "all")
    clean_error(out, "unknown parameter 'epoch'", str(f))
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_a_wrong_type_stops_the_run_naming_the_key(tmp_path):
    clean_error(run_with(tmp_path, "epochs: ten\n")[0], "parameter 'epochs'", "must be int", "'ten'")


@pytest.mark.e2e
def test_a_value_out_of_range_stops_the_run_before_any_stage_naming_the_key_and_range(tmp_path):
    out, f = run_with(tmp_path, "dropout: 1.5\n", "all")
    clean_error(out, "parameter 'dropout'", str(f), "must be at least 0 and below 1", "got 1.5")
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_a_removed_key_says_what_replaced_it(tmp_path):
    out, _ = run_with(tmp_path, "synthetic: false\ndata_dir: /somewhere\n")
    clean_error(out, "parameter 'synthetic'", "was removed", "data_dir alone")


@pytest.mark.e2e
def test_a_missing_data_dir_is_named(tmp_path):
    out, _ = run_with(tmp_path, f"data_dir: {tmp_path / 'nowhere'}\n", "all")
    clean_error(out, f"dataset folder not found: {tmp_path / 'nowhere'}")


@pytest.mark.e2e
def test_a_build_folder_inside_the_image_folder_is_refused(tmp_path):
    root = user_folder(tmp_path / "d", splits=())
    before = snapshot(root)
    own = tmp_path / "own.yaml"
    own.write_text(f"data_dir: {root}\n")
    out = make("data", f"PARAMS={own}", f"BUILD={root / 'build'}")
    clean_error(out, f"build_dir {root / 'build'} lies inside data_dir {root}")
    assert snapshot(root) == before


# --- a user's folder where the project would write ---------------------------------------------


@pytest.mark.e2e
def test_a_data_only_overlay_on_the_base_params_reads_the_folder_and_never_writes_it(tmp_path):
    """The overlay that once had the generator replace a user's images: now it means "use my images"."""
    root = user_folder(tmp_path / "my-sem", splits=())
    before = snapshot(root)
    only = tmp_path / "only_data.yaml"
    only.write_text(f"data_dir: {root}\n")
    out = make("audit", f"PARAMS={only}", f"BUILD={tmp_path / 'b'}", f"REPORTS={tmp_path / 'r'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert snapshot(root) == before
    split_csv = pd.read_csv(tmp_path / "b" / "split" / "split.csv")
    assert split_csv["path"].str.startswith(str(root)).all() and len(split_csv) == 8 * 7


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["synthetic_dir", "BUILD", "REPORTS"])
def test_a_folder_of_the_users_given_as_an_output_is_refused_untouched(tmp_path, key):
    root = user_folder(tmp_path / "my-sem", splits=())
    before = snapshot(root)
    args = [f"BUILD={tmp_path / 'b'}", f"REPORTS={tmp_path / 'r'}"]
    target = "data"
    if key == "synthetic_dir":
        overlay = tmp_path / "o.yaml"
        overlay.write_text(f"synthetic_dir: {root}\nsynthetic_per_class: 4\nsynthetic_size: 48\n")
        args.append(f"PARAMS={overlay}")
    elif key == "BUILD":
        args[0] = f"BUILD={root}"
    else:
        args[1] = f"REPORTS={root}"
        args.append(f"PARAMS=params/smoke.yaml {tmp_path / 'o.yaml'}")
        (tmp_path / "o.yaml").write_text(f"synthetic_dir: {tmp_path / 'synthetic'}\n")
        target = "eda"
    out = make(target, *args)
    clean_error(out, str(root), "did not create")
    assert snapshot(root) == before


# --- a run killed in the middle of training ------------------------------------------------------


@pytest.mark.e2e
def test_a_training_killed_midway_reruns_and_nothing_half_written_looks_done(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text(f"synthetic_dir: {tmp_path / 'data'}\nsynthetic_per_class: 8\nepochs: 15\npatience: 15\n")
    args = [f"PARAMS=params/smoke.yaml {overlay}", f"BUILD={tmp_path / 'b'}", f"REPORTS={tmp_path / 'r'}"]
    assert make("audit", *args).returncode == 0
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.Popen(["make", "train", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    build = tmp_path / "b"
    deadline = time.time() + 300
    while not list(build.glob(".train.staging-*/model.pt")):  # a best checkpoint of the running training
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing of the killed stage looks finished: no outputs under the final name, no report
    assert not (build / "train").exists() and not (tmp_path / "r" / "03_training.html").exists()
    assert make("-q", "train", *args).returncode != 0  # make knows the stage is not up to date
    rerun = make("train", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "notebooks/03_training.ipynb" in rerun.stdout
    assert (build / "train" / "model.pt").is_file() and (tmp_path / "r" / "03_training.html").is_file()
    assert not list(build.glob(".train.staging-*"))  # the killed run's leftovers are swept
