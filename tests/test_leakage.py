"""Each detector finds its planted copy, distinct images stay apart, and groups never cross splits."""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageEnhance

from conftest import sem_like
from lib import data, leakage
from lib.data import DataError


def audit(paths, classes, threshold=6):
    df = pd.DataFrame({"path": [str(p) for p in paths], "class": classes})
    df = pd.concat([df, leakage.fingerprints(df["path"], workers=1)], axis=1)
    df["name_key"] = leakage.name_keys(df["path"], df["class"])
    return df, leakage.find_pairs(df, threshold, threshold)


def linked(pairs, i, j):
    return any({int(a), int(b)} == {i, j} for a, b in pairs)


@pytest.fixture
def originals(tmp_path):
    paths = []
    for i in range(12):
        p = tmp_path / f"orig_{i:02d}.png"
        Image.fromarray(sem_like(i, 128)).save(p)
        paths.append(p)
    return paths


def test_distinct_images_are_never_paired(originals):
    _, pairs = audit(originals, ["c"] * len(originals))
    assert all(len(p) == 0 for p in pairs.values()), pairs


def test_exact_copy_found_by_bytes_pixels_and_phash(originals, tmp_path):
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(originals[0].read_bytes())
    _, pairs = audit(originals + [copy], ["c"] * 13)
    for det in ("sha256", "pixels", "phash"):
        assert linked(pairs[det], 0, 12), det


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_reencoded_copy_found_by_pixels(originals, tmp_path, fmt):
    copy = tmp_path / f"other.{fmt.lower()}"
    Image.open(originals[1]).save(copy, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    _, pairs = audit(originals + [copy], ["c"] * 13)
    assert not linked(pairs["sha256"], 1, 12)
    assert linked(pairs["pixels"], 1, 12) and linked(pairs["phash"], 1, 12)


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.5, 2.0])
def test_resized_copy_found_by_phash(originals, tmp_path, scale):
    im = Image.open(originals[2])
    copy = tmp_path / "resized.png"
    im.resize((int(128 * scale),) * 2, Image.Resampling.BICUBIC).save(copy)
    _, pairs = audit(originals + [copy], ["c"] * 13)
    assert linked(pairs["phash"], 2, 12)


def test_brightness_shifted_and_jpeg_copies_found_by_phash(originals, tmp_path):
    im = Image.open(originals[3])
    ImageEnhance.Brightness(im).enhance(1.15).save(tmp_path / "bright.png")
    im.save(tmp_path / "lossy.jpg", quality=60)
    _, pairs = audit(originals + [tmp_path / "bright.png", tmp_path / "lossy.jpg"], ["c"] * 14)
    assert linked(pairs["phash"], 3, 12) and linked(pairs["phash"], 3, 13)


def test_augmented_and_copied_names_join_their_original():
    paths = ["d/a/x.png", "d/a/x_aug1.png", "d/a/x_aug4.png", "d/a/x (1).png", "d/a/x copy.png",
             "d/a/y-1.png", "d/a/y.png", "d/a/z-1.png", "d/a/z-2.png", "d/b/x.png"]
    keys = leakage.name_keys(paths, ["a"] * 9 + ["b"])
    assert len(set(keys[:5])) == 1
    assert keys[5] == keys[6]  # y-1 joins y because y exists
    assert keys[7] != keys[8]  # z-1 and z-2 are numbered originals
    assert keys[9] != keys[0]  # the same name in another class is another image


def test_hamming_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    h[50:60] = h[0] ^ (np.uint64(1) << rng.integers(0, 63, 10).astype(np.uint64))
    got = {tuple(p) for p in leakage.hamming_pairs(h, 6, block=64)}
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if bin(int(h[i]) ^ int(h[j])).count("1") <= 6}
    assert got == want and len(want) >= 55
    cross = {tuple(p) for p in leakage.hamming_pairs(h[:100], 6, h[100:], block=32)}
    assert cross == {(i, j - 100) for i, j in want if i < 100 <= j}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=60, max_size=200), st.integers(0, 2**16))
def test_split_keeps_every_group_whole(group_of, seed):
    groups = np.asarray(group_of)
    labels = np.asarray([f"c{g % 3}" for g in groups])  # a group carries one label
    if pd.Series(groups).groupby(labels).nunique().min() < 3 or len(set(labels)) < 3:
        with pytest.raises(DataError):
            leakage.split_groups(labels, groups, val_ratio=0.15, test_ratio=0.15, seed=seed)
        return
    split = leakage.split_groups(labels, groups, val_ratio=0.15, test_ratio=0.15, seed=seed)
    per_group = pd.Series(split).groupby(groups).nunique()
    assert (per_group == 1).all()
    assert set(split) == {"train", "val", "test"}


def test_split_is_deterministic_and_near_the_ratios():
    labels = np.repeat(["a", "b", "c", "d"], 100)
    groups = np.arange(400) // 2
    s1 = leakage.split_groups(labels, groups, val_ratio=0.15, test_ratio=0.15, seed=3)
    s2 = leakage.split_groups(labels, groups, val_ratio=0.15, test_ratio=0.15, seed=3)
    assert (s1 == s2).all()
    share = pd.Series(s1).value_counts(normalize=True)
    assert abs(share["test"] - 0.15) < 0.03 and abs(share["val"] - 0.15) < 0.03
    for cls in "abcd":
        assert set(s1[labels == cls]) == {"train", "val", "test"}


def test_too_few_images_to_split_names_the_class():
    labels = np.array(["a"] * 10 + ["b"] * 2)
    with pytest.raises(DataError, match="class 'b' has 2 group"):
        leakage.split_groups(labels, np.arange(12), val_ratio=0.15, test_ratio=0.15, seed=0)


def test_planted_duplicate_groups_stay_in_one_split_and_recheck_is_clean(tmp_path):
    paths, classes = [], []
    for k, cls in enumerate(["a", "b", "c"]):
        for i in range(10):
            p = tmp_path / f"{cls}_{i}.png"
            Image.fromarray(sem_like(100 * k + i, 96)).save(p)
            paths.append(p)
            classes.append(cls)
            if i < 3:  # a copy and an augmented copy of the first three per class
                (tmp_path / f"{cls}_{i}_copy_of.png").write_bytes(p.read_bytes())
                paths.append(tmp_path / f"{cls}_{i}_copy_of.png")
                classes.append(cls)
                Image.fromarray(sem_like(100 * k + i, 96)).resize((120, 120)).save(tmp_path / f"{cls}_{i}_aug1.png")
                paths.append(tmp_path / f"{cls}_{i}_aug1.png")
                classes.append(cls)
    df, pairs = audit(paths, classes)
    df["group"] = leakage.group_ids(len(df), pairs)
    assert df["group"].nunique() == 30
    df["split"] = leakage.split_groups(df["class"], df["group"], val_ratio=0.2, test_ratio=0.2, seed=1)
    assert (df.groupby("group")["split"].nunique() == 1).all()
    assert leakage.cross_split_matches(df, 6, 6).empty
    # moving one copy to another split is caught, naming both files
    i = df.index[df["path"].str.endswith("a_0_copy_of.png")][0]
    df.loc[i, "split"] = "test" if df.loc[i, "split"] != "test" else "train"
    m = leakage.cross_split_matches(df, 6, 6)
    assert set(m["detector"]) >= {"sha256", "pixels", "phash"}
    assert m["file_a"].str.endswith("a_0_copy_of.png").any() or m["file_b"].str.endswith("a_0_copy_of.png").any()
    assert leakage.overlap_table(m).to_numpy().sum() == len(m)


def test_drop_leaks_keeps_the_training_copy():
    df = pd.DataFrame({"path": ["a", "b", "c", "d"], "split": ["train", "test", "val", "test"]})
    matches = pd.DataFrame({"detector": ["sha256", "phash"], "split_a": ["train", "val"], "file_a": ["a", "c"],
                            "split_b": ["test", "test"], "file_b": ["b", "d"]})
    assert leakage.drop_leaks(df, matches)["path"].tolist() == ["b", "d"]


@pytest.mark.parametrize("name", ["val", "test"])
def test_carved_split_takes_whole_groups_from_train_only(name):
    labels = np.repeat(["a", "b"], 40)
    other = "test" if name == "val" else "val"
    df = pd.DataFrame({"class": labels, "group": np.arange(80) // 2,
                       "split": np.where((np.arange(80) // 2) % 5 == 0, other, "train")})
    split = leakage.carve(df, name, 0.2, seed=0)
    assert set(split[df["split"] == other]) == {other}
    assert (pd.Series(split).groupby(df["group"]).nunique() == 1).all()
    assert 0.1 < (split == name).mean() < 0.3


def test_carving_a_small_train_split_holds_out_at_least_one_group_per_fold():
    # 6 training images per class and a 15 % share: more folds than images per class would
    # make stratified group k-fold refuse; the held-out share grows instead
    df = pd.DataFrame({"class": np.repeat(["a", "b", "c"], 6), "group": np.arange(18), "split": "train"})
    split = leakage.carve(df, "test", 0.15, seed=0)
    assert 0 < (split == "test").sum() < 18 and set(split) == {"train", "test"}


def test_nearest_hamming_matches_brute_force():
    rng = np.random.default_rng(1)
    h = rng.integers(0, 2**63, 50, dtype=np.int64).astype(np.uint64)
    want = [min(bin(int(h[i]) ^ int(h[j])).count("1") for j in range(50) if j != i) for i in range(50)]
    assert leakage.nearest_hamming(h, cells=7 * len(h)).tolist() == want  # blocks of 7 rows
    assert leakage.nearest_hamming(h, cells=1).tolist() == want  # one row at a time
    assert leakage.nearest_hamming(h[:1]).tolist() == [64]


def test_dhash_pairs_need_phash_confirmation():
    # three images with one dHash: the second's pHash is 9 bits away (past phash_threshold 6,
    # within twice it), the third's is 60 bits away (a distinct pattern of the same pitch)
    df = pd.DataFrame({"phash": np.array([0, 0x1FF, 0xFFFFFFFFFFFFFFF0], np.uint64),
                       "dhash": np.zeros(3, np.uint64)})
    assert leakage.hamming_pairs(df["phash"].to_numpy(np.uint64), 6).tolist() == []
    assert leakage.dhash_pairs(df, 6, 6).tolist() == [[0, 1]]
    across = leakage.dhash_pairs(df.iloc[:1], 6, 6, df.iloc[1:])
    assert across.tolist() == [[0, 0]]


def leaky_presplit(tmp_path):
    """A pre-split tree (train / val / test) whose test split holds a copy of a training image."""
    from PIL import Image

    from conftest import sem_like

    root = tmp_path / "d"
    for s, split in enumerate(("train", "val", "test")):
        for k, cls in enumerate(("bridge", "vias")):
            (root / split / cls).mkdir(parents=True)
            for i in range(4 if split == "train" else 2):
                Image.fromarray(sem_like(1000 * s + 100 * k + i, 64)).save(root / split / cls / f"{cls}_{s}{i}.png")
    leaked = root / "test" / "vias" / "copy.png"
    leaked.write_bytes((root / "train" / "vias" / "vias_00.png").read_bytes())
    files, _ = data.list_images(root, ["bridge", "vias"])
    df, _ = leakage.audit(files, 6, 6, workers=1)
    return df, str(leaked)


@pytest.mark.parametrize("on_leak", ["fail", "drop", "report"])
def test_make_split_applies_on_leak_to_a_given_split(tmp_path, on_leak):
    df, leaked = leaky_presplit(tmp_path)
    result = leakage.make_split(df, val_ratio=0.15, test_ratio=0.15, seed=0, on_leak=on_leak, phash_threshold=6,
                                dhash_threshold=6)
    assert result.presplit and len(result.leaks) >= 1 and result.carved == []
    if on_leak == "drop":
        assert result.dropped["path"].tolist() == [leaked] and leaked not in set(result.df["path"])
        assert len(result.remaining) == 0
        leakage.check(result, on_leak)
    elif on_leak == "report":
        assert leaked in set(result.df["path"]) and len(result.remaining) >= 1
        leakage.check(result, on_leak)  # reported in the notebook, not raised
    else:
        with pytest.raises(leakage.LeakageError, match="copy.png"):
            leakage.check(result, on_leak)


def test_make_split_of_unsplit_data_keeps_groups_whole(image_tree):
    root, classes = image_tree(n=8)
    files, _ = data.list_images(root, classes)
    df, _ = leakage.audit(files, 6, 6, workers=1)
    result = leakage.make_split(df, val_ratio=0.15, test_ratio=0.15, seed=0, on_leak="fail", phash_threshold=6,
                                dhash_threshold=6)
    assert not result.presplit and set(result.df["split"]) == {"train", "val", "test"}
    assert len(result.remaining) == 0 and result.conflicts.empty


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from("abcde")), max_size=40))
def test_equal_pairs_links_each_repeat_to_the_first_of_its_key(keys):
    expected = []
    first = {}
    for i, k in enumerate(keys):
        if k is None:
            continue  # a missing key links nothing
        if k in first:
            expected.append([first[k], i])
        else:
            first[k] = i
    got = leakage.equal_pairs(keys)
    assert sorted(map(list, got.reshape(-1, 2).tolist())) == sorted(expected)


def test_label_conflicts_are_the_groups_with_several_classes():
    df = pd.DataFrame({"group": [0, 0, 1, 1, 2], "class": ["a", "b", "a", "a", "c"], "path": list("vwxyz")})
    assert leakage.label_conflicts(df)["path"].tolist() == ["v", "w"]
    assert leakage.label_conflicts(df.iloc[2:])["path"].tolist() == []


def test_read_inventory_reads_only_the_audit_columns(tmp_path):
    path = tmp_path / "inventory.csv"
    pd.DataFrame({c: [1] for c in leakage.INVENTORY_COLUMNS + ["mean", "reason"]}).to_csv(path, index=False)
    assert list(leakage.read_inventory(path).columns) == leakage.INVENTORY_COLUMNS


def test_fingerprints_keep_every_hash_bit_across_chunks(tmp_path):
    # brightness rising or falling to the right: every dHash bit the same, 0 for one (below 2**63) and
    # 1 for the other. Chunks of one file each must not turn the hash column into floats.
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    paths = []
    for name, img in (("up", ramp), ("down", ramp[:, ::-1]), ("up2", ramp.T)):
        Image.fromarray(np.ascontiguousarray(img)).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    one = [leakage.fingerprint(p) for p in paths]
    assert {int(one[0]["dhash"]), int(one[1]["dhash"])} == {0, 2**64 - 1}
    got = leakage.fingerprints(paths, workers=1, chunk=1)
    assert got["dhash"].dtype == np.uint64 and got["phash"].dtype == np.uint64
    assert [int(v) for v in got["dhash"]] == [int(f["dhash"]) for f in one]
    assert [int(v) for v in got["phash"]] == [int(f["phash"]) for f in one]


def test_split_csv_holds_every_hash_as_hex_whatever_the_write_chunk(image_tree, tmp_path):
    root, classes = image_tree(n=8)
    (root / "bridge" / "bridge_001.png").rename(root / "bridge" / "bridge_000-1.png")  # joins bridge_000
    (root / "vias" / "vias_002.png").rename(root / "vias" / "vias_002-1.png")  # a numbered original
    files, _ = data.list_images(root, classes)
    df, _ = leakage.audit(files.assign(width=64, height=64), 6, 6, workers=1)
    result = leakage.make_split(df, val_ratio=0.15, test_ratio=0.15, seed=0, on_leak="fail", phash_threshold=6,
                                dhash_threshold=6)
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    leakage.save_split(result, tmp_path / "one")
    leakage.save_split(result, tmp_path / "many", chunk=3)  # 3 rows a chunk: one header, every row once
    assert (tmp_path / "one" / "split.csv").read_bytes() == (tmp_path / "many" / "split.csv").read_bytes()
    split = pd.read_csv(tmp_path / "many" / "split.csv")
    assert len(split) == len(result.df) and split["path"].tolist() == result.df["path"].tolist()
    for path, digest in zip(split["path"], split["sha256"]):
        assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    # the audit holds name keys as codes; split.csv gets the keys themselves back
    assert split["name_key"].tolist() == leakage.name_keys(split["path"], split["class"])
    assert "bridge/bridge_000" in set(split["name_key"]) and "vias/vias_002-1" in set(split["name_key"])
    keys = dict(zip(split["path"].map(lambda p: Path(p).name), split["name_key"]))
    assert keys["bridge_000.png"] == keys["bridge_000-1.png"] == "bridge/bridge_000"
    assert split["pixels"].str.fullmatch("[0-9a-f]{64}").all() and split["phash"].str.fullmatch("[0-9a-f]{16}").all()
