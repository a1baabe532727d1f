"""Planted copies are found by the audit, and distinct synthetic images are never paired."""

import pandas as pd
import pytest

from lib import leakage, params, plant, synthetic


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("plant") / "data"
    manifest = synthetic.render_dataset(root, n_per_class=10, size=160, workers=2)
    planted = plant.plant_copies(root, manifest, n_per_kind=4, seed=0)
    files = pd.concat([manifest["path"], planted["copy"]]).map(lambda p: str(root / p)).tolist()
    classes = pd.concat([manifest["class"], planted["original"].map(dict(zip(manifest["path"], manifest["class"])))])
    base = params.read_file(params.BASE)
    df = pd.DataFrame({"path": files, "class": classes.tolist()})
    df = pd.concat([df, leakage.fingerprints(df["path"], workers=2)], axis=1)
    df["name_key"] = leakage.name_keys(df["path"], df["class"])
    pairs = leakage.find_pairs(df, base["phash_threshold"], base["dhash_threshold"])
    df["group"] = leakage.group_ids(len(df), pairs)
    return root, planted, df, pairs


def test_planting_writes_every_kind_with_its_record(audited):
    root, planted, _, _ = audited
    assert sorted(planted["kind"].unique()) == sorted(plant.KINDS)
    assert (planted.groupby("kind").size() == 4).all()
    assert all((root / c).is_file() for c in planted["copy"])
    assert pd.read_csv(root / "planted.csv").equals(planted)
    assert planted["original"].is_unique


def test_exact_reencoded_resized_and_brightness_copies_are_grouped(audited):
    root, planted, df, pairs = audited
    detection, false_pairs = plant.score(df, pairs, planted, root)
    rate = detection.set_index("kind")["detection rate"]
    for kind in ("exact", "reencoded", "resized", "brightness", "augmented"):
        assert rate[kind] == 1.0, detection
    assert false_pairs["false pairs (distinct images)"].sum() == 0, false_pairs


def test_score_counts_a_false_pair():
    df = pd.DataFrame({"path": ["/r/a.png", "/r/b.png", "/r/c.png"], "group": [0, 0, 1]})
    planted = pd.DataFrame({"copy": ["c.png"], "original": ["a.png"], "kind": ["exact"], "detail": [""]})
    pairs = {"sha256": [[0, 1]], "phash": [[0, 2]]}
    detection, false_pairs = plant.score(df, {k: pd.DataFrame(v).to_numpy() for k, v in pairs.items()}, planted, "/r")
    assert false_pairs.set_index("detector")["false pairs (distinct images)"].to_dict() == {"sha256": 1, "phash": 0}
    assert detection["found by phash"].tolist() == [1] and detection["detection rate"].tolist() == [0.0]
