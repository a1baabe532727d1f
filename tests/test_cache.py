"""The on-disk arrays: reading by rows, atomic writing, the decoded-image cache and its keys, and the
partial recipe's trunk activations on disk."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lib import cache, data, engine, presets, recipes
from tests.test_recipes import tiny_data, tiny_params

KEYS = [3, -1, slice(2, 9), slice(None, None, 3), slice(5, 5), np.array([5, 1, 1, 30, 2]), np.array([], int),
        (4, 2), (4, 2, 1), (-2, -1), (slice(3, 7), 0), (np.array([3, 0]), slice(None), 1)]


@pytest.fixture
def stored(tmp_path):
    a = np.random.default_rng(0).standard_normal((37, 3, 4, 5)).astype(np.float16)
    cache.write(tmp_path / "a.npy", a.shape, a.dtype, (a[i : i + 8] for i in range(0, len(a), 8)))
    return a, cache.DiskArray(tmp_path / "a.npy")


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_disk_array_reads_what_numpy_indexing_gives(stored, key):
    a, d = stored
    assert np.array_equal(d[key], a[key])


def test_disk_array_is_a_plain_npy_and_survives_pickle_and_fork(stored):
    a, d = stored
    assert np.array_equal(np.load(d.path), a) and np.array_equal(np.asarray(d), a) and len(d) == 37
    assert np.array_equal(d[a[:, 0, 0, 0] > 0], a[a[:, 0, 0, 0] > 0])
    assert np.array_equal(pickle.loads(pickle.dumps(d))[5], a[5])
    pid = os.fork()
    if pid == 0:  # a DataLoader worker reads through its own descriptor
        os._exit(0 if np.array_equal(d[7], a[7]) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    with pytest.raises(IndexError, match="out of bounds"):
        d[37]


def test_write_is_atomic_and_checks_the_row_count(tmp_path, stored):
    a, _ = stored
    target = tmp_path / "a.npy"  # written by the fixture

    def failing():
        yield a[:8]
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        cache.write(target, a.shape, a.dtype, failing())
    assert np.array_equal(np.load(target), a)  # the earlier file is intact
    with pytest.raises(ValueError, match="rows written"):
        cache.write(tmp_path / "b.npy", a.shape, a.dtype, [a[:8]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]  # no partial file left


def test_a_truncated_cache_file_is_named(stored):
    _, d = stored
    with open(d.path, "r+b") as f:
        f.truncate(os.path.getsize(d.path) - 10)
    with pytest.raises(ValueError, match=r"a\.npy.*bytes where its header promises"):
        cache.DiskArray(d.path)


def test_gray_images_equal_the_preprocessing_and_are_reused_until_a_file_changes(image_tree, tmp_path):
    root, _ = image_tree(n=4, size=80)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    d = cache.gray_images(paths, 48, tmp_path / "cache", resize="letterbox", background=0.25)
    ref = data.cache_gray(paths, 48, resize="letterbox", background=0.25)
    assert d.shape == ref.shape and d.dtype == np.float32
    assert np.abs(np.asarray(d) - ref).max() <= 0.5 / 65535 + 1e-7
    written = d.path.stat().st_ino
    again = cache.gray_images(paths, 48, tmp_path / "cache", resize="letterbox", background=0.25)
    assert again.path == d.path and again.path.stat().st_ino == written  # read back, not written again
    assert cache.gray_images(paths, 48, tmp_path / "cache", resize="stretch").path != d.path  # other preprocessing
    Image.fromarray(np.zeros((80, 80), np.uint8)).save(paths[0])  # a changed file gives a new key
    changed = cache.gray_images(paths, 48, tmp_path / "cache", resize="letterbox", background=0.25)
    assert changed.path != d.path and changed[0].max() == 0 and np.array_equal(changed[1:], d[1:])


def test_gray_images_keep_16_bit_depth(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 7).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    d = cache.gray_images([tmp_path / "deep.png"], 64, tmp_path / "cache")
    assert np.abs(d[0, 0] - ramp / 65535).max() < 1e-6  # uint8 would be off by up to 1 / 510


def test_load_part_with_a_cache_dir_reads_from_disk(image_tree, tmp_path):
    root, classes = image_tree(n=3, size=64)
    files, _ = data.list_images(root, classes)
    split = files.assign(split=["train", "val", "test"] * 3)
    part = data.load_part(split, "val", classes, 32, cache_dir=tmp_path / "cache")
    plain = data.load_part(split, "val", classes, 32)
    assert isinstance(part.gray, cache.DiskArray) and np.array_equal(part.y, plain.y)
    assert np.abs(np.asarray(part.gray) - plain.gray).max() < 1e-5
    ds = engine.GrayDataset(part.gray, part.y)
    assert ds[1][0].shape == (3, 32, 32)


def test_partial_recipe_on_disk_trains_as_in_memory_and_leaves_no_scratch(tmp_path):
    gray, y = tiny_data()
    P = tiny_params(arch="efficientnet_lite0", weights="imagenet", recipe="partial", freeze_blocks=14, cache_views=3,
                    epochs=2)
    runs = []
    for scratch in (None, tmp_path / "scratch"):
        out = recipes.train_recipe(P, {"train": gray, "val": gray}, {"train": y, "val": y}, 3, device="cpu",
                                   generator=engine.seed_everything(0), progress=False, scratch_dir=scratch)
        runs.append(out)
    figures = [[{k: v for k, v in row.items() if k != "seconds"} for row in r.fit.history] for r in runs]
    assert figures[0] == figures[1]
    for (k, v0), v1 in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        assert torch.equal(v0, v1), k
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == [".sem-defects.json"]  # the marker only
    model = runs[0].model
    acts = recipes.trunk_views(model, gray[:5], 14, 2, presets.augmentation(P), path=tmp_path / "t.npy")
    torch.manual_seed(1)
    again = recipes.trunk_views(model, gray[:5], 14, 1)
    assert isinstance(acts, cache.DiskArray) and acts.shape[:2] == (5, 2)
    assert np.array_equal(acts[:, 0], again[:, 0])  # view 0 is the image itself either way


def test_scratch_of_a_killed_process_is_removed(tmp_path):
    from lib import io

    root = io.claim(tmp_path / "scratch", "training scratch")
    dead = root / ".trunk-999999999-abc"
    dead.mkdir()
    (dead / "trunk_train.npy").write_bytes(b"x")
    with recipes._scratch(root) as mine:
        assert mine.is_dir() and not dead.exists()
    assert not mine.exists()


def test_unused_cached_decodings_are_pruned_when_a_new_one_is_written(image_tree, tmp_path):
    root, _ = image_tree(n=2, size=64)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    old = cache.gray_images(paths[:3], 32, tmp_path / "cache")
    used = cache.gray_images(paths[3:], 32, tmp_path / "cache")
    stale = time.time() - (cache.KEEP_DAYS + 1) * 86400
    for d in (old, used):
        os.utime(d.path, (stale, stale))
    cache.gray_images(paths[3:], 32, tmp_path / "cache")  # a use refreshes it
    new = cache.gray_images(paths, 32, tmp_path / "cache")  # a new decoding prunes the unused one
    assert not old.path.exists() and used.path.exists() and new.path.exists()
    assert (tmp_path / "cache" / ".sem-defects.json").exists()  # nothing else is touched


def test_the_probe_is_fit_on_a_bounded_class_stratified_sample(monkeypatch):
    y = np.repeat(np.arange(3), [40, 20, 10])
    assert recipes.probe_rows(y, 70, 0) is None  # up to the limit: every image
    rows = recipes.probe_rows(y, 35, 0)
    assert len(rows) == 35 and np.all(np.diff(rows) > 0)
    assert np.bincount(y[rows]).tolist() == [20, 10, 5]  # the classes' shares kept
    assert len(recipes.probe_rows(np.r_[y, 3], 35, 0)) == 35  # a class of one image: a plain sample
    gray, y = tiny_data(per_class=8)
    monkeypatch.setattr(recipes, "PROBE_MAX_IMAGES", 12)
    P = tiny_params(arch="efficientnet_lite0", weights="imagenet", recipe="partial", freeze_blocks=14, cache_views=1,
                    epochs=1)
    out = recipes.train_recipe(P, {"train": gray, "val": gray}, {"train": y, "val": y}, 3, device="cpu",
                               generator=engine.seed_everything(0), progress=False)
    assert any("sample of 12 of the 24 training images" in n for n in out.notes)
