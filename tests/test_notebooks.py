"""The notebooks outside `make all`: a 2-fold, one-configuration run of the cross-validation report
(`make cv`), the width-sweep report on finished widths, and the shape every notebook keeps."""

from __future__ import annotations

import json
import shutil

import nbformat
import pytest

from conftest import ROOT, make
from userdata import snapshot, user_folder

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.unit
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_cells_are_short_and_plumbing_is_tagged(path):
    """Notebooks read as parameters, load, call, show, explain: no code cell over 25 lines, one
    parameters cell, and the validation / loading cell tagged to stay out of the report."""
    nb = nbformat.read(str(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tags = [c.metadata.get("tags", []) for c in code]
    assert sum("parameters" in t for t in tags) == 1
    assert "hide" in tags[1] and "params.collect(globals())" in code[1].source
    for c, t in zip(code, tags):
        if "parameters" not in t:
            assert len(c.source.splitlines()) <= 25, (path.name, c.source[:80])


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    data = user_folder(tmp / "my-sem", splits=())
    overlay = tmp / "cv.yaml"
    overlay.write_text("cv_folds: 2\ncv_repeats: 2\ncv_configs: ['arch:efficientnet_lite0 weights:imagenet recipe:probe "
                       "image_size:64', 'arch:efficientnet_lite0 weights:imagenet recipe:probe image_size:64 probe_c:0.05 "
                       "test_views:4']\n")
    before = snapshot(data)
    args = [f"DATA={data}", f"PARAMS={overlay}", f"BUILD={tmp / 'build'}", f"REPORTS={tmp / 'reports'}"]
    first = make("cv", *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = make("cv", *args)
    return tmp, data, before, first, second


def test_cross_validation_report_runs_two_folds_and_leaves_the_data_alone(cv_run):
    tmp, data, before, first, _ = cv_run
    assert snapshot(data) == before
    record = json.loads((tmp / "build" / "cv" / "cv.json").read_text())
    assert record["folds"] == 2 and record["repeats"] == 2 and len(record["configs"]) == 2
    config, other = record["configs"]
    assert config["weights"] == "imagenet" and config["recipe"] == "probe" and len(config["folds"]) == 4
    assert [f["repeat"] for f in config["folds"]] == [1, 1, 2, 2]
    assert set(config["shifts"]) and 0 <= config["macro_recall_mean"] <= 1
    assert config["vs_reference_points"] is None and record["reference"] == config["config"]
    paired = other["vs_reference_points"]
    assert paired["low"] <= paired["difference (points)"] <= paired["high"] and 0 <= paired["p"] <= 1
    assert paired["folds better"] + paired["folds worse"] <= 4
    assert isinstance(record["label_issues"], list)
    html = (tmp / "reports" / "06_cross_validation.html").read_text()
    for text in ("no duplicate group crosses folds", "Robustness to shift", "2 fold assignments", "vs reference",
                 "worst fold", "Label-issue audit", "images flagged"):
        assert text in html, text
    assert ">reference</th>" in html and ">probe_c:0.05 test_views:4</th>" in html  # rows named by what they change
    # the reference is also scored view-averaged; the other is scored only as its 4-view average, shifts included
    assert {"macro recall (flips)", "macro recall (flips and quarter turns)"} <= set(config["folds"][0])
    assert "macro recall (flips)" not in other["folds"][0] and set(other["shifts"])
    assert "Test-time averaging over flips and quarter turns" in html
    assert "Configurations averaged" in html
    (average,) = record["probability_averages"]  # the two configurations averaged, on the same 4 folds
    assert average["averaged"] == "reference + probe_c:0.05 test_views:4" and 0 <= average["worst fold"] <= 1
    groups = (tmp / "build" / "cv" / "groups.csv").read_text().splitlines()[0]
    assert groups.endswith("fold r1,fold r2")


def test_cross_validation_results_are_plain_json_reused_only_for_the_same_code(cv_run):
    tmp, _, _, first, second = cv_run
    from lib import cv
    from lib.io import read_json

    cached = list((tmp / "build" / "cv" / "results").glob("*.json"))
    assert len(cached) == 2
    record = read_json(cached[0])
    assert record["code_version"] == cv.code_version() and record["result"]["config"].startswith("arch:")
    executed = tmp / "build" / "notebooks" / "06_cross_validation.ipynb"
    outputs = "".join(o.get("text", "") for c in nbformat.read(str(executed), as_version=4).cells
                      for o in c.get("outputs", []))
    assert "reused" in outputs  # the second run read the first one's result back
    assert not list((tmp / "build" / "cv" / "results").glob("*.pkl"))


@pytest.mark.parametrize("widths", [("1.0", "0.5")])
def test_sweep_report_gathers_finished_widths(smoke_run, tmp_path, widths):
    """The sweep notebook on two widths (the smoke run's outputs, relabelled), one unfinished."""
    from lib import io, notebooks

    build = smoke_run[0] / "build"
    for w in widths + ("0.35",):
        io.claim(tmp_path / "build" / "sweep" / f"w{w}", "build folder")
    for w in widths:
        for stage, name in (("eval", "metrics.json"), ("export", "export.json")):
            (tmp_path / "build" / "sweep" / f"w{w}" / stage).mkdir(exist_ok=True)
            record = json.loads((build / stage / name).read_text())
            if stage == "export":
                record["width"] = float(w)
            (tmp_path / "build" / "sweep" / f"w{w}" / stage / name).write_text(json.dumps(record))
    params = tmp_path / "p.yaml"
    params.write_text(f"build_dir: {tmp_path / 'build'}\n")
    assert notebooks.main([str(ROOT / "notebooks" / "sweep.ipynb"), "--params", str(params), "--executed",
                           str(tmp_path / "nb" / "sweep.ipynb"), "--html", str(tmp_path / "reports" / "sweep.html")]) == 0
    sweep = json.loads((tmp_path / "build" / "sweep" / "sweep.json").read_text())
    assert len(sweep["models"]) == 4 and sweep["missing"] == ["w0.35"]
    assert sweep["frontier"]["size MB"]
    assert "Unfinished widths" in (tmp_path / "reports" / "sweep.html").read_text()
    shutil.rmtree(tmp_path / "build")
