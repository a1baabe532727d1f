"""ONNX export gates: dynamic batch, checker, parity with PyTorch; label files."""

import json
import pickle

import numpy as np
import onnx
import pytest
import torch

from lib import engine, export, model as net, runtime


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    m = net.build_model(5).eval()
    # non-trivial BatchNorm statistics, so parity tests more than the identity
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    path = export.export_onnx(m, tmp_path_factory.mktemp("onnx") / "m.onnx", size=64, opset=18)
    return m, path


def test_graph_signature_and_opset(exported):
    _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 64]
    assert not list(path.parent.glob("*.data")), "the model must be one self-contained file"


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_onnx_runtime_matches_pytorch(exported, batch):
    m, path = exported
    x = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
    p = export.parity(engine.logits(m, x), runtime.run(runtime.session(path), x, batch_size=8))
    assert p["argmax_agreement"] == 1.0
    assert p["max_abs_logit_diff"] < 1e-3


def test_parity_reports_disagreements():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0]])
    p = export.parity(a, b)
    assert p["disagreements"] == 1 and p["argmax_agreement"] == 0.5 and p["max_abs_logit_diff"] == 1.0


def test_old_opset_is_refused(exported):
    with pytest.raises(ValueError, match="opset"):
        export.export_onnx(exported[0], "unused.onnx", size=64, opset=16)


def test_label_files_round_trip(tmp_path):
    classes = sorted(["bridge", "clean", "CMP(scratch)", "vias"])
    export.write_labels(tmp_path, classes)
    assert json.loads((tmp_path / "labels.json").read_text()) == classes
    enc = pickle.loads((tmp_path / "label_encoder.pkl").read_bytes())
    assert list(enc.inverse_transform([0, 3])) == [classes[0], classes[3]]
    with pytest.raises(ValueError, match="LabelEncoder order"):
        export.write_labels(tmp_path, ["b", "a"])


def test_bundle_manifest_lists_every_file_with_its_digest(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"abc")
    (tmp_path / "labels.json").write_text("[]")
    (tmp_path / ".model.onnx.123.tmp").write_bytes(b"half-written")
    export.write_bundle_manifest(tmp_path, review_threshold=0.4, int8_fit=False)
    manifest = json.loads((tmp_path / "bundle.json").read_text())
    assert manifest["review_threshold"] == 0.4 and manifest["int8_fit"] is False
    assert set(manifest["files"]) == {"model.onnx", "labels.json"}
    assert manifest["files"]["model.onnx"] == {
        "bytes": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}


def test_model_card_says_when_int8_is_not_fit_and_lists_every_parameter():
    import pandas as pd

    run = {"arch": "mobilenet_v2", "width": 0.5, "image_size": 64, "probe_c": 0.37}
    card = export.model_card(
        title="t", date="2030-01-01", dataset={"root": "d", "synthetic": True, "fingerprint": {"files": 3, "sha256": "f00"}},
        params=run, trained_with=run | {"probe_c": 0.5}, weights={"source": "none", "detail": "random"},
        classes=["a", "b"], metrics=pd.DataFrame({"macro recall": [0.9, 0.8]}, index=["FP32", "INT8"]),
        int8={"fit": False, "reasons": ["miss rate rises by 6.25 points (limit 1.00)"], "macro_recall_drop": 0.0,
              "miss_rate_rise": 0.0625, "max_recall_drop": 0.01, "max_miss_rise": 0.01, "setting": "U8S8 MinMax",
              "calibration_images": 4, "chosen_on": "val"},
        latency=pd.DataFrame({"p50_ms": [1.0]}), compute={"parameters": 10, "macs": 2e6}, sizes={"model.onnx": 1e6},
        machine={"cpu": "x"})
    assert "**NOT FIT for use** (miss rate rises by 6.25 points" in card
    assert "f00" in card and "2030-01-01" in card and "| FP32 | 0.9 |" in card
    assert "corrected for the weights' rounding" not in card  # no bias correction recorded, none claimed
    assert "| `probe_c` | `0.37` |" in card and "trained with other values of: `probe_c` = `0.5`" in card


def test_sweep_notebook_is_stripped_and_reads_only_known_keys():
    import nbformat
    import papermill

    from conftest import ROOT
    from lib import params

    path = ROOT / "notebooks" / "sweep.ipynb"
    assert set(papermill.inspect_notebook(str(path))) <= set(params.SCHEMA)
    for cell in nbformat.read(str(path), as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_model_card_states_the_operating_point_rule_it_was_chosen_by():
    point = {"threshold": 0.91, "target_accuracy": 0.99, "max_miss_rate": 0.005, "met": True, "extra_errors": 1}
    test = {"auto": 141, "images": 180, "coverage": 0.783, "auto_accuracy": 0.993, "auto_errors": 1,
            "auto_miss_rate": 0.0, "auto_missed": 0, "auto_defects": 136}
    ev = {"test_images": 180, "intervals": [], "temperature": 1.5, "temperature_fitted": True,
          "ece": {"before": {"test": 0.02}, "after": {"test": 0.04}},
          "operating_point": {"validation": point, "test": test}}
    card = export._card_confidence(ev)
    assert "accuracy 0.99 (counting 1 more wrong image than validation shows) with a miss" in card
    assert "141 of 180 images auto-classified" in card
    plain = export._card_confidence(ev | {"operating_point": {"validation": point | {"extra_errors": 0}, "test": test}})
    assert "counting" not in plain and "accuracy 0.99 with a miss" in plain


@pytest.mark.parametrize("views", [4, 8])
def test_a_view_averaged_model_exports_with_parity_and_one_copy_of_the_network(exported, tmp_path, views):
    m, single = exported
    wrapped = net.with_views(m, views)
    path = export.export_onnx(wrapped, tmp_path / "v.onnx", size=64, opset=18)
    x = np.random.default_rng(views).normal(size=(3, 3, 64, 64)).astype(np.float32)
    p = export.parity(engine.logits(wrapped, x), runtime.run(runtime.session(path), x))
    assert p["argmax_agreement"] == 1.0 and p["max_abs_logit_diff"] < 1e-3
    convs = [sum(n.op_type == "Conv" for n in onnx.load(str(f)).graph.node) for f in (single, path)]
    assert convs[0] == convs[1]  # the views go through the network as one batch
    assert path.stat().st_size < 1.1 * single.stat().st_size
