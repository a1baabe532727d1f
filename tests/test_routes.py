"""The README's own-data routes, end to end through `make all`, at small size.

Each route runs the five stages to reports, the index and a bundle that `lib.predict` uses, on a user
folder the tests build (mixed-case class folders, JPEG / TIFF / 16-bit / RGBA files, a notes file,
one unreadable image), and checks byte for byte that the folder is exactly as it was:

- presplit_example: the recommended route, `params/own_dataset.example.yaml` copied and pointed at a
  pre-split folder (train / validate / test), as the README tells a user to;
- unsplit_default: a folder with one sub-folder per class given by a data-only overlay, so the base
  parameters' default (EfficientNet-Lite0, recipe partial) runs on it, for two short epochs;
- presplit_no_test: a pre-split folder without test/ (the test split is carved out of train by group),
  `recipe: lpft` for one short epoch, scored and exported as the average of 8 views (`test_views`),
  with keys set in an overlay that every stage's record, the checkpoint and the model card must show.

The synthetic smoke route is tests/test_pipeline.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT, ROUTES, make
from userdata import CLASSES, snapshot, user_folder

STAGES = ["01_eda", "02_leakage_audit", "03_training", "04_evaluation", "05_export"]
SMALL = ROOT / "tests" / "params" / "small.yaml"


def own_overlay(tmp, data_dir, extra: str = ""):
    """What the README asks of a user: copy the example and set data_dir."""
    text = (ROOT / "params" / "own_dataset.example.yaml").read_text()
    lines = [f"data_dir: {data_dir}" if line.startswith("data_dir:") else line for line in text.splitlines()]
    out = tmp / "own_dataset.yaml"
    out.write_text("\n".join(lines) + "\n" + extra)
    return out


def run_route(tmp, params: list, data):
    before = snapshot(data)
    args = ["PARAMS=" + " ".join(map(str, params)), f"BUILD={tmp / 'build'}", f"REPORTS={tmp / 'reports'}"]
    out = make("all", *args)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return {"tmp": tmp, "build": tmp / "build", "reports": tmp / "reports", "data": data, "before": before,
            "after": snapshot(data), "args": args, "out": out,
            "params": json.loads((tmp / "build" / "export" / "params.json").read_text())}


@pytest.fixture(scope="module")
def presplit_example(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("presplit_example")
    data = user_folder(tmp / "my-sem")
    return run_route(tmp, [own_overlay(tmp, data), SMALL], data)


@pytest.fixture(scope="module")
def unsplit_default(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unsplit_default")
    data = user_folder(tmp / "my-sem", splits=())
    short = tmp / "short.yaml"
    short.write_text("epochs: 2\ncache_views: 2\n")
    only_data = tmp / "data_only.yaml"
    only_data.write_text(f"data_dir: {data}\n")
    return run_route(tmp, [SMALL, short, only_data], data)


# keys a user sets in an overlay that no stage but one declares: every record must still show them
PROVENANCE = {"probe_c": 0.37, "quality_blur": 17.5, "int8_max_miss_rise": 0.02}


@pytest.fixture(scope="module")
def presplit_no_test(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("presplit_no_test")
    data = user_folder(tmp / "my-sem", splits=("train", "validate"), per_split={"train": 6, "validate": 2})
    extra = "".join(f"{k}: {v}\n" for k, v in PROVENANCE.items())
    lpft = tmp / "lpft.yaml"
    lpft.write_text("recipe: lpft\nepochs: 1\nfreeze_blocks: 10\nbatch_size: 16\ntest_views: 8\n")
    return run_route(tmp, [own_overlay(tmp, data, extra), SMALL, lpft], data)


@pytest.fixture(params=ROUTES)
def route(request):
    """Every route's run; a test of one route only takes it with `on_route`. Either way the route's name is in
    the test's id, which is how `make test` keeps each route's tests on one worker (conftest.xdist_group)."""
    return request.getfixturevalue(request.param)


def on_route(name: str):
    return pytest.mark.parametrize("route", [name], indirect=True)


def test_user_folder_is_unchanged_byte_for_byte(route):
    assert route["after"] == route["before"]


def test_five_reports_index_and_a_bundle(route):
    for name in STAGES + ["index"]:
        assert (route["reports"] / f"{name}.html").stat().st_size > 1000, name
    bundle = json.loads((route["build"] / "export" / "bundle.json").read_text())
    assert {"model.onnx", "model.int8.onnx", "labels.json", "preprocessing.json"} <= set(bundle["files"])


def test_predict_runs_on_the_bundle_and_reproduces_the_evaluation(route, tmp_path):
    evaluated = pd.read_csv(route["build"] / "eval" / "predictions.csv")
    out = tmp_path / "rows.csv"
    run = subprocess.run([sys.executable, "-m", "lib.predict", str(route["build"] / "export" / "model.onnx"),
                          str(route["data"]), "--out", str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    rows = pd.read_csv(out).set_index("file")
    assert run.returncode == 1 and "broken.png" in rows.index[rows["error"].notna()][0]  # the one unreadable file
    assert rows["predicted"].notna().sum() == len(rows) - 1
    got = rows.loc[evaluated["path"], "predicted"].tolist()
    assert got == evaluated["predicted"].tolist()


def test_every_json_written_is_strict(route):
    from lib.io import read_json

    files = list(route["build"].rglob("*.json"))
    assert len(files) > 10
    for f in files:
        read_json(f)  # NaN or Infinity would raise


@on_route("presplit_example")
def test_recommended_route_used_what_it_asked_for(route):
    build = route["build"]
    summary = json.loads((build / "train" / "summary.json").read_text())
    assert summary["arch"] == "efficientnet_lite0" and summary["recipe"] == "partial"
    assert summary["weights"]["source"] == "imagenet"
    split = pd.read_csv(build / "split" / "split.csv")
    assert set(split["class"]) == set(CLASSES) and set(split["split"]) == {"train", "val", "test"}
    assert not split["path"].str.endswith("broken.png").any()
    eda = (route["reports"] / "01_eda.html").read_text()
    assert "broken.png" in eda and "cannot identify image file" in eda
    assert "<code>Vias</code> → <code>vias</code>" in eda  # the capitalised folder, matched
    for stage in ("eda", "split", "train", "eval", "export"):
        record = json.loads((build / stage / "params.json").read_text())
        assert record["data_dir"] == str(route["data"]) and record["arch"] == "efficientnet_lite0"
        assert record["image_size"] == 64 and record["recipe"] == "partial"


@on_route("presplit_example")
def test_the_clean_guard_reaches_the_bundle_and_lib_predict_decides_as_the_evaluation(route):
    """The example's `clean_guard` is the rule of the evaluation, the export and the bundle, and the
    prediction command, which undoes the folded temperature for it, calls the evaluation's classes."""
    build, guard = route["build"], route["params"]["clean_guard"]
    assert guard > 0
    metrics = json.loads((build / "eval" / "metrics.json").read_text())
    bundle = json.loads((build / "export" / "bundle.json").read_text())
    assert metrics["clean_guard"] == bundle["clean_guard"] == guard
    assert bundle["temperature"] == metrics["temperature"]
    assert metrics["missed_by_argmax"] >= metrics["missed"]
    evaluated = pd.read_csv(build / "eval" / "predictions.csv")
    out = route["tmp"] / "guarded_rows.csv"
    run = subprocess.run([sys.executable, "-m", "lib.predict", str(build / "export" / "model.onnx"), *evaluated["path"],
                          "--out", str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = pd.read_csv(out)
    assert rows["predicted"].tolist() == evaluated["predicted"].tolist()
    assert (rows["confidence"] - evaluated["confidence"]).abs().max() < 1e-4
    assert f"only at a softmax probability of {guard:g} or more" in (route["reports"] / "04_evaluation.html").read_text()


@on_route("unsplit_default")
def test_unsplit_route_runs_the_default_recipe(route):
    summary = json.loads((route["build"] / "train" / "summary.json").read_text())
    assert summary["arch"] == "efficientnet_lite0" and summary["weights"]["source"] == "imagenet"
    assert summary["recipe"] == "partial" and summary["epochs_run"] == 2 and summary["probe_floor"] is not None
    assert any("BatchNorm statistics" in note for note in summary["notes"])  # bn_adapt, on by default
    assert "BatchNorm statistics of the 6 trained blocks were re-estimated" in (
        route["reports"] / "03_training.html").read_text()
    split = pd.read_csv(route["build"] / "split" / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    assert "Training curves, read" in (route["reports"] / "04_evaluation.html").read_text()


@on_route("presplit_no_test")
def test_lpft_fine_tuned_for_one_epoch(route):
    summary = json.loads((route["build"] / "train" / "summary.json").read_text())
    assert summary["recipe"] == "lpft" and summary["epochs_run"] == 1 and summary["probe_floor"] is not None


@on_route("presplit_no_test")
def test_missing_test_folder_is_carved_out_of_train(route):
    split = pd.read_csv(route["build"] / "split" / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    groups = split.groupby("group")["split"].nunique()
    assert (groups == 1).all()
    given = {p: "val" if "/validate/" in p else "train" for p in split["path"]}
    assert all(given[p] == "train" for p in split.loc[split["split"] == "test", "path"])
    assert "No test folder given" in (route["reports"] / "02_leakage_audit.html").read_text()


@on_route("presplit_no_test")
def test_the_view_average_is_what_was_evaluated_and_what_ships(route):
    import onnx

    build = route["build"]
    assert json.loads((build / "eval" / "metrics.json").read_text())["test_views"] == 8
    assert json.loads((build / "export" / "bundle.json").read_text())["test_views"] == 8
    assert "scored as the softmax average of 8 views" in (route["reports"] / "04_evaluation.html").read_text()
    assert "scores each image as 8 views" in (build / "export" / "model_card.md").read_text()
    for name in ("model.onnx", "model.int8.onnx"):
        ops = [n.op_type for n in onnx.load(str(build / "export" / name)).graph.node]
        assert ops.count("Gemm") == 1 and {"Softmax", "Log"} <= set(ops), name
    # lib.predict on model.onnx giving the evaluation's predictions is checked for every route above


@on_route("presplit_no_test")
def test_an_overlay_value_reaches_every_record_the_checkpoint_and_the_model_card(route):
    import torch

    build = route["build"]
    for stage in ("eda", "split", "train", "eval", "export"):
        record = json.loads((build / stage / "params.json").read_text())
        for key, value in PROVENANCE.items():
            assert record[key] == value, (stage, key)
        assert record["data_dir"] == str(route["data"])
    ckpt = torch.load(build / "train" / "model.pt", weights_only=True)
    assert {k: ckpt["params"][k] for k in PROVENANCE} == PROVENANCE
    card = (build / "export" / "model_card.md").read_text()
    for key, value in PROVENANCE.items():
        assert f"| `{key}` | `{value}` |" in card
    # the record is itself a parameter file that reproduces the run's settings
    from lib import params

    assert params.resolve(build / "export" / "params.json") == json.loads((build / "export" / "params.json").read_text())


def test_int8_gate_is_recall_first_and_shown_beside_test(route):
    exp = json.loads((route["build"] / "export" / "export.json").read_text())
    int8 = exp["int8"]
    assert int8["chosen_on"] == "val"
    for key in ("macro_recall_drop", "miss_rate_rise", "test_macro_recall_drop", "test_miss_rate_rise", "max_miss_rise"):
        assert key in int8
    fit = int8["macro_recall_drop"] <= int8["max_recall_drop"] + 1e-9 and (
        int8["miss_rate_rise"] is None or int8["miss_rate_rise"] <= int8["max_miss_rise"] + 1e-9)
    assert int8["fit"] == fit
    html = (route["reports"] / "05_export.html").read_text()
    assert "recall-first gate" in html and "miss-rate rise" in html
