"""Safe writes: strict JSON, folders the project owns, staged stage outputs, `make clean`."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from lib import io
from lib.io import MARKER, OwnershipError


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_json_is_strict_nan_and_infinity_become_null(tmp_path):
    obj = {"a": float("nan"), "b": [1.5, float("inf"), -math.inf], "c": np.float32(0.25), "d": np.int64(3),
           "e": np.array([[1, 2]]), "f": pd.NA, "g": (1, "x"), "h": np.float64("nan"), "i": True}
    io.write_json_atomic(tmp_path / "x.json", obj)
    back = io.read_json(tmp_path / "x.json")
    assert back == {"a": None, "b": [1.5, None, None], "c": 0.25, "d": 3, "e": [[1, 2]], "f": None, "g": [1, "x"],
                    "h": None, "i": True}
    (tmp_path / "bad.json").write_text('{"a": NaN}')
    with pytest.raises(ValueError, match="not strict JSON: NaN"):
        io.read_json(tmp_path / "bad.json")
    with pytest.raises(TypeError, match="not JSON data"):
        io.dumps({"x": object()})


def test_claim_creates_marks_an_empty_folder_and_refuses_a_used_one(tmp_path):
    new = io.claim(tmp_path / "a" / "build", "build folder")
    assert io.marker(new)["what"] == "build folder"
    empty = tmp_path / "empty"
    (empty).mkdir()
    (empty / ".gitkeep").write_text("")
    io.claim(empty, "reports folder")
    assert io.marker(empty) is not None
    used = tmp_path / "mine"
    used.mkdir()
    (used / "thesis.tex").write_text("years of work")
    with pytest.raises(OwnershipError, match=f"{used} \\(build folder\\) already holds files the project did not "
                                             f"create \\(thesis.tex\\)"):
        io.claim(used, "build folder")
    assert tree(used) == {"thesis.tex": b"years of work"} and not (used / MARKER).exists()


def test_a_forged_or_broken_marker_is_not_ownership(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"owner": "someone else"}))
    (tmp_path / "x").write_text("x")
    assert io.marker(tmp_path) is None
    with pytest.raises(OwnershipError):
        io.claim(tmp_path, "build folder")


def test_replace_folder_swaps_whole_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "out"

    def fill(n):
        def f(folder):
            (folder / "a.txt").write_text(str(n))
            return {"n": n}
        return f

    io.replace_folder(target, fill(1), "thing")
    assert io.marker(target)["files"] == ["a.txt"] and io.marker(target)["n"] == 1

    def broken(folder):
        (folder / "a.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        io.replace_folder(target, broken, "thing")
    assert (target / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
    io.replace_folder(target, fill(2), "thing")
    assert (target / "a.txt").read_text() == "2"
    with pytest.raises(OwnershipError, match="the project's thing, not a other thing"):
        io.replace_folder(target, fill(3), "other thing")


def test_replace_folder_never_touches_a_symlink_or_foreign_content(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.png").write_bytes(b"1")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OwnershipError, match="symbolic link"):
        io.replace_folder(link, lambda f: None, "thing")
    with pytest.raises(OwnershipError, match="holds files the project did not create"):
        io.replace_folder(real, lambda f: None, "thing")
    assert tree(real) == {"keep.png": b"1"} and link.is_symlink()


def test_a_stage_is_committed_whole_and_a_killed_stage_leaves_the_last_complete_one(tmp_path):
    build = tmp_path / "build"
    out = io.stage_folder(build, "train")
    (out / "model.pt").write_text("run 1")
    assert not (build / "train").exists()  # nothing under the final name until the stage completes
    assert io.commit(out) == build / "train"
    assert (build / "train" / "model.pt").read_text() == "run 1"
    killed = io.stage_folder(build, "train")
    (killed / "model.pt").write_text("half of run 2")  # ... and the process dies here
    assert (build / "train" / "model.pt").read_text() == "run 1"
    again = io.stage_folder(build, "train")  # the rerun sweeps the killed run's leftovers
    assert not killed.exists()
    (again / "model.pt").write_text("run 2")
    io.commit(again)
    assert (build / "train" / "model.pt").read_text() == "run 2"
    assert sorted(p.name for p in build.iterdir()) == [MARKER, "train"]


def test_clean_removes_only_what_the_project_made(tmp_path):
    build = io.claim(tmp_path / "build", "build folder")
    (build / "dataset.json").write_text("{}")
    io.claim(build / "params", "parameter files")
    (build / "params" / "all.yaml").write_text("a: 1")
    out = io.stage_folder(build, "eval")
    (out / "metrics.json").write_text("{}")
    io.commit(out)
    reports = io.claim(tmp_path / "reports", "reports folder")
    for name in ("01_eda.html", "index.html", "sweep.html", "my_notes.html"):
        (reports / name).write_text("r")
    data = tmp_path / "data"
    io.replace_folder(data / "synthetic", lambda f: (f / "a.png").write_bytes(b"p") and None, "synthetic dataset")
    (data / "my-sem" / "vias").mkdir(parents=True)
    (data / "my-sem" / "vias" / "v.png").write_bytes(b"user")
    removed = io.clean(build, reports, data)
    assert not build.exists() and not (data / "synthetic").exists()
    assert sorted(p.name for p in reports.iterdir()) == [MARKER, "my_notes.html"]  # a file the project did not write
    assert tree(data) == {"my-sem/vias/v.png": b"user", MARKER: (data / MARKER).read_bytes()}
    assert str(reports / "01_eda.html") in removed and str(data / "synthetic") in removed
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a").write_text("a")
    assert io.main(["clean", "--build", str(mine)]) == 2
    assert (mine / "a").read_text() == "a"


def test_a_container_keeps_what_is_not_the_projects(tmp_path):
    build = io.claim(tmp_path / "build", "build folder")
    io.claim(build / "notebooks", "executed notebooks")
    (build / "notes.txt").write_text("someone's")
    io.remove_owned(build)
    assert sorted(p.name for p in build.iterdir()) == [MARKER, "notes.txt"]


def test_a_nested_build_folder_makes_its_parent_the_projects(tmp_path):
    """BUILD=build/own first, then BUILD=build: the parent made for the first is the project's."""
    io.claim(tmp_path / "build" / "own", "build folder")
    assert io.marker(tmp_path / "build")["what"] == "parent folder"
    io.claim(tmp_path / "build", "build folder")  # not refused
    assert io.marker(tmp_path / "build")["what"] == "build folder"
    assert tmp_path.exists() and io.marker(tmp_path) is None  # an existing ancestor is not taken over


def test_claim_accepts_a_folder_another_process_is_claiming(tmp_path):
    # torchrun ranks claim the same new cache folder at once: one may find the other's marker
    # still being written (an atomic write's temporary file) and must not call it a stranger's
    racing = tmp_path / "cache"
    racing.mkdir()
    (racing / f".{MARKER}.k2j4x9.tmp").write_text("{")
    assert io.claim(racing, "decoded-image cache") == racing.absolute()
    assert io.marker(racing)["what"] == "decoded-image cache"
    stranger = tmp_path / "theirs"
    stranger.mkdir()
    (stranger / f".{MARKER}.k2j4x9.tmp").write_text("{")
    (stranger / "notes.txt").write_text("x")
    with pytest.raises(OwnershipError, match="notes.txt"):
        io.claim(stranger, "decoded-image cache")

