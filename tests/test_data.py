"""Dataset discovery: class folders by case and alias, nested files, pre-split trees, the label order.

Bad files and bad folders are tests/test_bad_input.py's (the README's bad-input table, row by row)."""

import pytest
from PIL import Image

from conftest import sem_like
from lib import data
from lib.data import DataError


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


def test_the_embedded_set_renders_anew_when_the_generator_code_changes(tmp_path, monkeypatch):
    """Same settings, other generator code: the rendering is stale and is replaced; same code: kept."""
    from lib import params, synthetic

    P = {**params.read_file(params.BASE), "synthetic_dir": str(tmp_path / "syn"), "synthetic_per_class": 1,
         "synthetic_size": 48, "synthetic_plant_copies": 0, "classes": ["clean", "vias"]}
    from lib import io

    data.prepare(P)
    made = io.marker(tmp_path / "syn")
    assert made["settings"]["generator"] == synthetic.source_hash()
    data.prepare(P)
    assert io.marker(tmp_path / "syn") == made  # same code and settings: kept
    monkeypatch.setattr(synthetic, "source_hash", lambda: "0" * 16)
    data.prepare(P)
    assert io.marker(tmp_path / "syn")["settings"]["generator"] == "0" * 16  # rendered anew
