"""Parameter files, the schema and the notebooks' parameters cells agree; bad keys are named."""

import ast
import json

import nbformat
import pytest
import yaml

from conftest import ROOT
from lib import io, params
from lib.params import ParamError

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def parameters_cell(nb_path):
    nb = nbformat.read(str(nb_path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: expected exactly one cell tagged parameters"
    values = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign), f"{nb_path.name}: parameters cell holds only assignments"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_ordered_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_eda", "02_leakage_audit", "03_training", "04_evaluation", "05_export",
                                           "06_cross_validation"]


def test_base_yaml_sets_every_schema_key_and_fits_the_schema():
    base = params.read_file(params.BASE)
    assert set(base) == set(params.SCHEMA)


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_defaults_match_base_yaml(nb_path):
    base = params.read_file(params.BASE)
    for key, value in parameters_cell(nb_path).items():
        assert key in params.SCHEMA, f"{nb_path.name}: {key} is not in the schema"
        assert value == base[key], f"{nb_path.name}: default of {key} ({value!r}) differs from base.yaml ({base[key]!r})"


def test_every_key_is_read_somewhere():
    used = set(params.DATA_KEYS)
    for nb_path in NOTEBOOKS:
        used |= set(parameters_cell(nb_path))
    assert set(params.SCHEMA) - used == set()


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs(nb_path):
    nb = nbformat.read(str(nb_path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{nb_path.name} holds outputs"


def test_overlays_fit_the_schema():
    for f in (ROOT / "params").glob("*.yaml"):
        params.read_file(f)


def test_unknown_key_is_named_with_its_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("epoch: 3\n")
    with pytest.raises(ParamError, match=r"unknown parameter 'epoch' \(in .*x.yaml\)"):
        params.resolve(f)


@pytest.mark.parametrize("text,key", [("epochs: ten\n", "epochs"), ("lr: true\n", "lr"), ("synthetic: 1\n", "synthetic"),
                                      ("classes: bridge\n", "classes"), ("device: gpu\n", "device"),
                                      ("seed: {a: 1}\n", "seed")])
def test_wrong_type_is_named(tmp_path, text, key):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(ParamError, match=f"'{key}'"):
        params.resolve(f)


BOUNDED = sorted(k for k, spec in params.SCHEMA.items() if spec.bounds())


def _outside(spec):
    """Values just outside each bound of a key's range, of the key's own type."""
    step = 1 if spec.type is int else 1e-3
    return [v for v in (None if spec.ge is None else spec.ge - step, spec.gt, None if spec.le is None else spec.le + step,
                        spec.lt) if v is not None]


@pytest.mark.parametrize("key", BOUNDED)
def test_a_value_out_of_its_range_is_named_with_its_file_and_the_range(tmp_path, key):
    spec = params.SCHEMA[key]
    f = tmp_path / "x.yaml"
    for value in _outside(spec):
        f.write_text(yaml.safe_dump({key: value}))
        with pytest.raises(ParamError, match=rf"parameter '{key}' \(in .*x.yaml\) must be {spec.bounds()}, got "):
            params.resolve(f)
    for value in (spec.ge, spec.le):  # closed bounds are admitted
        if value is not None:
            f.write_text(yaml.safe_dump({key: spec.type(value) if spec.type is int else value}))
            assert params.resolve(f)[key] == value


def test_every_numeric_key_that_counts_or_weighs_something_has_a_range():
    numeric = {k for k, spec in params.SCHEMA.items() if spec.type in (int, float, params._NUM) and not spec.choices}
    assert numeric - set(BOUNDED) == {"seed"}  # any integer seeds a generator


def test_ranges_are_worded_and_checked_at_every_entry_point():
    assert params.SCHEMA["dropout"].bounds() == "at least 0 and below 1"
    assert params.SCHEMA["lr"].bounds() == "above 0"
    with pytest.raises(ParamError, match=r"parameter 'batch_size' \(in overrides\) must be at least 1, got 0"):
        params.resolve(overrides={"batch_size": 0})
    with pytest.raises(ParamError, match=r"parameter 'cv_folds' \(in notebook parameters\) must be at least 2, got 1"):
        params.collect({"cv_folds": 1})
    with pytest.raises(ParamError, match=r"parameter 'nproc_per_node' \(in training parameters\) must be at least 1"):
        params.check_keys({"nproc_per_node": 0, "not a key": 1}, ["nproc_per_node", "epochs"])
    params.check_keys({"epochs": 3}, ["epochs", "nproc_per_node"])  # keys P lacks are not checked


def test_overlays_merge_in_order(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("epochs: 3\nlr: 0.1\n")
    b.write_text("epochs: 5\n")
    p = params.resolve(a, b, overrides={"seed": 7})
    assert (p["epochs"], p["lr"], p["seed"]) == (5, 0.1, 7)
    assert p["batch_size"] == params.read_file(params.BASE)["batch_size"]


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("lr: 1\n")
    assert params.resolve(f)["lr"] == 1


def test_collect_rejects_an_injected_unknown_key_and_fills_defaults():
    ns = {"epochs": 3, "epoch": 4}
    with pytest.raises(ParamError, match="unknown parameter 'epoch'"):
        params.collect(ns)
    with pytest.raises(ParamError, match="'epochs'"):
        params.collect({"epochs": "3"})
    resolved = params.collect({"epochs": 3, "json": json, "_hidden": 1})
    assert resolved["epochs"] == 3 and resolved["lr"] == params.read_file(params.BASE)["lr"]


def test_cli_writes_stage_subsets_only_when_changed(tmp_path):
    out, build = tmp_path / "p", tmp_path / "b"
    assert params.main([str(ROOT / "params" / "smoke.yaml"), "--set", f"build_dir={build}", "--out-dir", str(out)]) == 0
    stage = yaml.safe_load((out / "02_leakage_audit.yaml").read_text())
    assert set(stage) == set(parameters_cell(ROOT / "notebooks" / "02_leakage_audit.ipynb"))
    assert yaml.safe_load((out / "all.yaml").read_text())["build_dir"] == str(build)
    assert io.marker(build)["what"] == "build folder"  # the build folder is claimed before anything is written
    before = (out / "03_training.yaml").stat().st_mtime_ns
    params.main([str(ROOT / "params" / "smoke.yaml"), "--set", f"build_dir={build}", "--out-dir", str(out)])
    assert (out / "03_training.yaml").stat().st_mtime_ns == before


def test_cli_reports_a_bad_key_and_fails(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("batchsize: 8\n")
    assert params.main([str(f)]) == 2
    assert "unknown parameter 'batchsize'" in capsys.readouterr().err


def test_report_table_shows_the_meaning_of_each_key_as_text():
    P = params.read_file(params.BASE)
    html = params.table(P, ["data_dir", "arch"]).to_html()
    assert "&lt;class&gt;/*.png" in html and "<class>" not in html
    assert "efficientnet_lite0" in html and "embedded synthetic" in html
