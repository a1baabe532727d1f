"""lib.predict: files, folders and globs; bad files become rows; the bundle's preprocessing is lib.data's."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax

import conftest
from conftest import ROOT, sem_like
from lib import export, predict, preprocess, runtime

SIZE = 32
CLASSES = ["bridge", "clean", "vias"]


def make_bundle(folder, arch="mobilenet_v2", size=SIZE, threshold=0.5):
    return conftest.make_bundle(folder, CLASSES, arch=arch, size=size, threshold=threshold)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Good images in nested folders (mixed sizes and modes) and every kind of bad file."""
    root = tmp_path_factory.mktemp("images")
    (root / "lot1" / "deep").mkdir(parents=True)
    good = []
    for i in range(5):
        arr = sem_like(i, 40 + 8 * i)
        f = root / ("lot1/deep" if i % 2 else "lot1") / f"img_{i}.png"
        im = Image.fromarray(arr)
        (im.convert("RGBA") if i == 3 else im).save(f)
        good.append(f)
    Image.fromarray(sem_like(9, 48)).save(root / "lot1" / "img_9.jpg")
    good.append(root / "lot1" / "img_9.jpg")
    (root / "lot1" / "notes.txt").write_text("not an image, and not an image extension")
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("this is text named .png")
    whole = good[0].read_bytes()
    (bad / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return root, good


def test_expand_folders_recursively_globs_and_missing(images):
    root, good = images
    items = predict.expand([str(root / "lot1"), str(root / "lot1" / "img_0.png"), str(root / "**" / "*.jpg"),
                            str(root / "nowhere.png"), str(root / "*.tif")])
    files = [f for f, _ in items]
    assert sorted(files[:6]) == sorted(map(str, good))  # folder, recursive, image extensions only
    assert len(files) == len(set(files)) == 8  # the file and the glob repeat folder entries: no duplicates
    errors = dict(items)
    assert errors[str(root / "nowhere.png")] == "file not found"
    assert errors[str(root / "*.tif")] == "no file matches this pattern"


def test_predictions_use_the_bundle_preprocessing(bundle, images):
    root, good = images
    b = predict.Bundle.load(bundle)
    assert (b.size, b.resize, b.background, b.classes) == (SIZE, "letterbox", 0.25, CLASSES)
    rows = predict.predict(b, [(str(f), "") for f in good], batch_size=4, workers=0)
    x = preprocess.load_input(good, SIZE, resize="letterbox", background=0.25)
    prob = softmax(runtime.run(runtime.session(bundle), x).astype(np.float64), axis=1)
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in prob.argmax(1)]
    np.testing.assert_allclose([r["confidence"] for r in rows], prob.max(1), rtol=1e-5)
    for r in rows:
        assert len(r["top3"]) == 3 and r["top3"][0] == (r["predicted"], r["confidence"]) and not r["error"]
        assert [p for _, p in r["top3"]] == sorted((p for _, p in r["top3"]), reverse=True)


def test_worker_pool_gives_the_same_rows_in_order(bundle, images):
    root, good = images
    items = predict.expand([str(root)])
    b = predict.Bundle.load(bundle)
    serial = predict.predict(b, items, workers=0, batch_size=3)
    pooled = predict.predict(b, items, workers=2, batch_size=3)
    assert [(r["file"], r["predicted"], r["error"]) for r in serial] == [(r["file"], r["predicted"], r["error"])
                                                                        for r in pooled]


def test_bad_files_become_rows_and_the_exit_status_says_so(bundle, images, tmp_path, capsys):
    root, good = images
    out = tmp_path / "rows.json"
    code = predict.main([str(bundle), str(root), str(root / "missing.png"), "--out", str(out), "--workers", "2"])
    assert code == 1
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in json.loads(out.read_text())}
    assert len(rows) == len(good) + 4
    assert rows["empty.png"]["error"] == "empty file (0 bytes)"
    assert "cannot identify image file" in rows["text.png"]["error"]
    assert rows["truncated.png"]["error"] and rows["truncated.png"]["predicted"] is None
    assert rows["missing.png"]["error"] == "file not found"
    assert all(rows[f.name]["predicted"] in CLASSES and not rows[f.name]["error"] for f in good)
    assert rows["img_0.png"]["top3"][0]["class"] == rows["img_0.png"]["predicted"]
    captured = capsys.readouterr()
    assert "4 failed" in captured.err and "empty.png" in captured.out


def test_all_good_files_exit_zero_and_csv_has_the_columns(bundle, images, tmp_path):
    root, good = images
    out = tmp_path / "rows.csv"
    assert predict.main([str(bundle), *map(str, good), "--out", str(out), "--quiet"]) == 0
    import pandas as pd

    df = pd.read_csv(out)
    assert list(df.columns) == ["file", "predicted", "confidence", "top3", "review", "error"]
    assert len(df) == len(good) and df["predicted"].isin(CLASSES).all()


def test_review_threshold_comes_from_the_bundle_and_the_option(bundle, images):
    root, good = images
    b = predict.Bundle.load(bundle)
    items = [(str(f), "") for f in good]
    assert b.review_threshold == 0.5
    assert all(r["review"] for r in predict.predict(b, items, threshold=1.01, workers=0))
    assert not any(r["review"] for r in predict.predict(b, items, threshold=0.0, workers=0))
    default = predict.predict(b, items, workers=0)
    assert [r["review"] for r in default] == [r["confidence"] < 0.5 for r in default]


def test_a_folder_without_the_bundle_files_is_refused_by_name(tmp_path, bundle, capsys):
    lone = tmp_path / "model.onnx"
    lone.write_bytes(bundle.read_bytes())
    assert predict.main([str(lone), str(tmp_path)]) == 2
    assert "bundle.json is missing" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "absent.onnx"), str(tmp_path)]) == 2
    assert predict.main([str(bundle), str(tmp_path), "--out", str(tmp_path / "rows.txt")]) == 2


def test_efficientnet_lite0_bundle_predicts(lite0_bundle, images):
    root, good = images
    rows = predict.predict(predict.Bundle.load(lite0_bundle), [(str(f), "") for f in good[:3]], workers=0)
    assert all(r["predicted"] in CLASSES and not r["error"] for r in rows)


def test_the_command_line_entry_point(bundle, images):
    root, good = images
    out = subprocess.run([sys.executable, "-m", "lib.predict", str(bundle), str(good[0]), str(root / "bad" / "*.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "img_0.png" in out.stdout and "truncated.png" in out.stdout
    assert "4 files: 1 classified" in out.stderr


def copy_bundle(bundle, to):
    import shutil

    shutil.copytree(bundle.parent, to)
    return to / bundle.name


def test_a_model_that_does_not_match_its_digest_is_refused(tmp_path, bundle, images, capsys):
    model = copy_bundle(bundle, tmp_path / "b")
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: a damaged or swapped file
    model.write_bytes(bytes(data))
    assert predict.main([str(model), str(images[1][0])]) == 2
    err = capsys.readouterr().err
    assert "model.onnx does not match the sha256 in" in err and "bundle.json" in err


@pytest.mark.parametrize("name", ["labels.json", "preprocessing.json"])
def test_changed_labels_or_preprocessing_are_refused(tmp_path, bundle, name):
    model = copy_bundle(bundle, tmp_path / "b")
    f = model.parent / name
    f.write_text(f.read_text().replace("bridge", "bridges").replace("letterbox", "stretch"))
    with pytest.raises(predict.BundleError, match=f"{name} does not match the sha256"):
        predict.Bundle.load(model)


def test_a_model_not_listed_in_the_bundle_is_refused(tmp_path, bundle):
    model = copy_bundle(bundle, tmp_path / "b")
    other = model.with_name("other.onnx")
    other.write_bytes(model.read_bytes())
    with pytest.raises(predict.BundleError, match="not listed in .*bundle.json"):
        predict.Bundle.load(other)


def test_predict_never_unpickles():
    source = (ROOT / "lib" / "predict.py").read_text()
    assert "pickle" not in source.replace("unpickled", "")


def test_an_unfit_int8_model_is_used_with_a_warning(tmp_path, bundle, images, capsys):
    folder = copy_bundle(bundle, tmp_path / "b").parent
    (folder / "model.int8.onnx").write_bytes((folder / "model.onnx").read_bytes())
    export.write_bundle_manifest(folder, review_threshold=0.5, int8_fit=False)
    assert predict.main([str(folder / "model.int8.onnx"), str(images[1][0]), "--quiet"]) == 0
    assert "marks the INT8 model not fit" in capsys.readouterr().err
