"""ONNX export gates: dynamic batch, checker, parity with PyTorch; label files."""

import json
import pickle

import numpy as np
import onnx
import pytest
import torch

from lib import export, model as net


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
    p = export.parity(export.run_torch(m, x), export.run_onnx(export.session(path), x, batch_size=8))
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
