"""INT8 quantisation (QDQ, per-channel, calibrated), the setting search, and the benchmark helpers."""

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from lib import benchmark, export, model as net, quantize, runtime

SIZE = 32


def _export(folder, arch, size):
    torch.manual_seed(0)
    m = net.build_model(4, arch=arch, image_size=size).eval()
    torch.nn.init.normal_(m.classifier[1].weight, 0, 1.0)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    path = export.export_onnx(m, folder / "m.onnx", size=size)
    return m, path, quantize.preprocess(path, folder / "m.prep.onnx")


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("q"), "mobilenet_v2", SIZE)


def inputs(n, size=SIZE, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def test_grid_covers_types_reduce_range_and_methods():
    settings = quantize.grid()
    assert len(settings) == 12 and len({s.name for s in settings}) == 12
    assert {s.activation for s in settings} == {"S8", "U8"} and {s.reduce_range for s in settings} == {True, False}
    assert quantize.Setting("U8", True, "Entropy").name == "U8S8 reduce_range Entropy"
    with pytest.raises(ValueError, match="calibration methods"):
        quantize.grid(["MinMax", "Magic"])


def test_calibration_rows_are_training_rows_spread_over_classes_and_reproducible():
    split = pd.DataFrame({"path": [f"f{i}" for i in range(40)], "class": ["a"] * 30 + ["b"] * 10,
                          "split": ["train"] * 20 + ["val"] * 10 + ["train"] * 10})
    rows = quantize.calibration_rows(split, 8, seed=1)
    assert len(rows) == 8 and set(rows["split"]) == {"train"}
    assert rows["class"].value_counts().to_dict() == {"a": 4, "b": 4}
    assert rows["path"].tolist() == quantize.calibration_rows(split, 8, seed=1)["path"].tolist()
    assert len(quantize.calibration_rows(split, 1000, seed=1)) == 30
    with pytest.raises(ValueError, match="no training rows"):
        quantize.calibration_rows(split[split["split"] == "val"], 8, seed=1)


def test_int8_model_is_qdq_per_channel_smaller_and_agrees(mobilenet, tmp_path):
    m, fp32, prepared = mobilenet
    q = quantize.quantize(prepared, tmp_path / "q.onnx", inputs(16), quantize.Setting("U8", True, "MinMax"),
                          cache_dir=tmp_path)
    proto = onnx.load(str(q))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {i.name: i for i in proto.graph.initializer}
    weight_scales = [inits[n.input[1]] for n in proto.graph.node
                     if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                     and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and n.input[1] in inits]
    assert any(len(s.dims) == 1 and s.dims[0] > 1 for s in weight_scales), "weights must be quantised per channel"
    assert q.stat().st_size < 0.4 * fp32.stat().st_size
    # the classifier stays FP32: its weight is a float initialiser, not dequantised from int8
    (head,) = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert quantize.classifier_nodes(prepared) == [head.name]
    assert inits[head.input[1]].data_type == onnx.TensorProto.FLOAT
    assert (tmp_path / "calibration_MinMax.json").is_file()  # calibration cached for the other variants
    x = inputs(32, seed=5)
    fid = quantize.fidelity(runtime.run(runtime.session(fp32), x), runtime.run(runtime.session(q), x))
    assert fid["agreement"] >= 0.9


@pytest.mark.parametrize(("activation", "images"), [("S8", 12), ("U8", 7)])
def test_every_calibration_method_quantises(mobilenet, tmp_path, activation, images):
    # calibrated in chunks that divide the image count: 12 images in two chunks of 6, 7 one at a time
    _, fp32, prepared = mobilenet
    for method in quantize.CALIBRATIONS:
        q = quantize.quantize(prepared, tmp_path / f"{method}.onnx", inputs(images),
                              quantize.Setting(activation, False, method), cache_dir=tmp_path)
        assert runtime.run(runtime.session(q), inputs(2)).shape == (2, 4)


def test_efficientnet_lite0_quantises(lite0_bundle, tmp_path):
    fp32 = lite0_bundle
    prepared = quantize.preprocess(fp32, tmp_path / "m.prep.onnx")
    q = quantize.quantize(prepared, tmp_path / "q.onnx", inputs(4, 64), quantize.Setting("S8", False, "MinMax"))
    x = inputs(8, 64, seed=3)
    assert quantize.fidelity(runtime.run(runtime.session(fp32), x),
                             runtime.run(runtime.session(q), x))["agreement"] >= 0.75


def test_search_scores_every_setting_and_choose_keeps_the_least_loss(mobilenet, tmp_path):
    _, _, prepared = mobilenet
    settings = quantize.grid(["MinMax"])
    rows, paths = quantize.search(prepared, inputs(4), settings, lambda p: {"bytes": p.stat().st_size},
                                  work_dir=tmp_path)
    assert [r["setting"] for r in rows] == [s.name for s in settings] and all(p.is_file() for p in paths.values())
    # the ranges belonged to that model: nothing is left for a later search (another model) to reuse
    assert not list(tmp_path.glob("**/calibration_*.json"))
    table = pd.DataFrame({"macro_recall_drop": [0.02, -0.05, 0.0, 0.0], "agreement": [1.0, 0.9, 0.95, 0.95],
                          "mean_abs_logit_diff": [0.0, 0.0, 0.2, 0.1], "batch1_p50_ms": [1.0, 1.0, 2.0, 2.0]},
                         index=["a", "b", "c", "d"])
    # b's gain counts as no drop; among no-drop settings c and d agree most, and d's logits are closer
    assert quantize.choose(table) == "d"
    table.loc["c", "batch1_p50_ms"] = 0.5  # a timing never outranks a closer, deterministic figure
    assert quantize.choose(table) == "d"
    table.loc["c", "mean_abs_logit_diff"] = 0.1  # exactly tied on every figure: the faster one
    assert quantize.choose(table) == "c"
    assert quantize.choose(table, speed_col=None) == "c"  # then the first
    table.loc["d", "mean_abs_logit_diff"] = 0.1 - 4e-5  # closer only in the fifth decimal: still the faster c
    assert quantize.choose(table) == "c"
    table.loc["d", "mean_abs_logit_diff"] = 0.099  # a thousandth closer: d, though slower
    assert quantize.choose(table) == "d"


def test_scores_and_fidelity():
    classes = ["bridge", "clean", "vias"]
    y = np.array([0, 1, 2, 2])
    logits = np.eye(3)[[0, 1, 1, 2]]
    s = quantize.scores(y, logits, classes)
    assert s["accuracy"] == 0.75 and s["macro_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert s["miss_rate"] == pytest.approx(1 / 3)
    f = quantize.fidelity(logits, np.eye(3)[[0, 1, 2, 2]])
    assert f["agreement"] == 0.75 and f["disagreements"] == 1


def test_compute_counts_parameters_and_multiply_adds():
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    c = benchmark.compute(tiny, 8)
    assert c["parameters"] == 3 * 4 * 9 + 144 * 2 + 2
    assert c["macs"] == 4 * 6 * 6 * 3 * 9 + 144 * 2
    mobile = benchmark.compute(net.build_model(8), 224)
    assert 290e6 < mobile["macs"] < 320e6  # MobileNetV2 1.0 at 224 px: about 300 M multiply-adds


def test_latency_rows_per_engine_and_batch():
    calls = []
    engines = {"a": lambda x: calls.append(("a", len(x))), "b": lambda x: calls.append(("b", len(x)))}
    rows = benchmark.latency(engines, {1: np.zeros((1, 1)), 8: np.zeros((8, 1))}, runs=6, warmup=1, blocks=3)
    assert [(r["engine"], r["batch"]) for r in rows] == [("a", 1), ("b", 1), ("a", 8), ("b", 8)]
    assert all(r["runs"] == 6 and r["p95_ms"] >= r["p50_ms"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert calls.count(("a", 8)) == 1 + 3 + 6  # warm-up, one untimed call per block, timed runs
    with pytest.raises(ValueError):
        benchmark.latency(engines, {1: np.zeros((1, 1))}, runs=0)


def test_bench_threads_0_takes_omp_num_threads_when_set_else_every_core(monkeypatch):
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert benchmark.threads_to_use(3) == 3 and benchmark.threads_to_use(0) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as make test's workers set it: each has one of the two cores
    assert benchmark.threads_to_use(0) == 1 and benchmark.threads_to_use(2) == 2  # a count asked for wins
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert benchmark.threads_to_use(0) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many'"):
        benchmark.threads_to_use(0)


def test_pareto_front_keeps_undominated_points():
    cost = [1.0, 2.0, 3.0, 2.5, 1.0]
    value = [0.5, 0.8, 0.9, 0.7, 0.4]
    assert benchmark.pareto_front(cost, value).tolist() == [True, True, True, False, False]


def _weights(path):
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return model, inits


@pytest.mark.parametrize("reduce_range", [False, True])
def test_rounded_weight_is_what_onnx_runtime_stores(mobilenet, tmp_path, reduce_range):
    _, _, prepared = mobilenet
    q = quantize.quantize(prepared, tmp_path / "q.onnx", inputs(4), quantize.Setting("S8", reduce_range, "MinMax"))
    float_model, float_w = _weights(prepared)
    qdq, q_inits = _weights(q)
    dequantised = {n.output[0]: q_inits[n.input[0]].astype(np.float32) * q_inits[n.input[1]].reshape(-1, 1, 1, 1)
                   for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_inits
                   and q_inits[n.input[0]].ndim == 4}
    convs = {n.name: n for n in qdq.graph.node if n.op_type == "Conv"}
    checked = 0
    for node in (n for n in float_model.graph.node if n.op_type == "Conv"):
        stored = dequantised[convs[node.name].input[1]]
        np.testing.assert_allclose(quantize.rounded_weight(float_w[node.input[1]], reduce_range), stored, rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked == 52  # every convolution of MobileNetV2


def test_bias_correction_removes_the_mean_shift_of_rounded_weights(mobilenet, tmp_path):
    _, _, prepared = mobilenet
    calib = inputs(16) + 0.5  # inputs with a mean, as normalised images have
    done = quantize.bias_correct(prepared, calib, {False: tmp_path / "bc.onnx"})[False]
    assert done["corrected"] == done["convolutions"] == 52 and done["mean_abs_shift"] > 0

    def rounded(path, out):  # the model with every convolution's weights as int8 rounding leaves them
        model, w = _weights(path)
        for node in (n for n in model.graph.node if n.op_type == "Conv"):
            init = next(i for i in model.graph.initializer if i.name == node.input[1])
            init.CopyFrom(onnx.numpy_helper.from_array(quantize.rounded_weight(w[node.input[1]]), node.input[1]))
        onnx.save(model, str(out))
        return runtime.run(runtime.session(out), calib)

    exact = runtime.run(runtime.session(prepared), calib)
    plain, corrected = rounded(prepared, tmp_path / "r.onnx"), rounded(tmp_path / "bc.onnx", tmp_path / "rbc.onnx")
    bias = lambda logits: np.abs((logits - exact).mean(0)).mean()  # noqa: E731  the systematic part of the error
    assert bias(corrected) < 0.5 * bias(plain)
    # the corrected model itself differs from the original only in its biases
    (_, a), (_, b) = _weights(prepared), _weights(tmp_path / "bc.onnx")
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert changed and all(a[k].ndim == 1 for k in changed)
    with pytest.raises(ValueError, match="no calibration images"):
        quantize.bias_correct(prepared, calib[:0], {False: tmp_path / "x.onnx"})
    assert not (tmp_path / "x.onnx").exists()


def test_float_prefix_is_everything_up_to_the_nth_convolution_and_its_activation(mobilenet):
    _, _, prepared = mobilenet
    nodes = list(onnx.load(str(prepared)).graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    assert quantize.float_prefix(prepared, 0) == []
    one = quantize.float_prefix(prepared, 1)
    assert one[: convs[0] + 1] == [n.name for n in nodes[: convs[0] + 1]]
    assert len(one) == convs[0] + 2 and nodes[convs[0] + 1].op_type in ("Clip", "Relu")  # the stem's ReLU6 with it
    three = quantize.float_prefix(prepared, 3)
    assert three[: len(one)] == one and sum(nodes[i].name in three for i in convs) == 3
    with pytest.raises(ValueError, match=f"the graph has {len(convs)}"):
        quantize.float_prefix(prepared, len(convs) + 1)
    with pytest.raises(ValueError, match="0 or more"):
        quantize.float_prefix(prepared, -1)


def test_a_float_prefix_leaves_the_first_convolution_and_the_input_unquantised(mobilenet, tmp_path):
    _, fp32, prepared = mobilenet
    setting = quantize.Setting("U8", False, "MinMax", float_convs=1)
    assert setting.name == "U8S8 MinMax, first 1 conv FP32"
    assert quantize.Setting("U8", False, "MinMax", float_convs=4).name == "U8S8 MinMax, first 4 convs FP32"

    def first_conv_and_input(path):
        graph = onnx.load(str(path)).graph
        inits = {i.name: i.data_type for i in graph.initializer}
        conv = next(n for n in graph.node if n.op_type == "Conv")
        input_quantised = any(n.op_type == "QuantizeLinear" and graph.input[0].name in n.input for n in graph.node)
        return inits.get(conv.input[1]), input_quantised

    plain = quantize.quantize(prepared, tmp_path / "plain.onnx", inputs(4), quantize.Setting("U8", False, "MinMax"))
    kept = quantize.quantize(prepared, tmp_path / "kept.onnx", inputs(4), setting)
    assert first_conv_and_input(plain) == (None, True)  # weight dequantised from an int8 initialiser, input rounded
    assert first_conv_and_input(kept) == (onnx.TensorProto.FLOAT, False)
    x = inputs(8, seed=2)
    assert runtime.run(runtime.session(kept), x).shape == (8, 4)


def test_search_escalates_the_float_prefix_only_until_a_setting_is_fit(mobilenet, tmp_path):
    _, _, prepared = mobilenet
    calls = []

    def evaluate(path):  # the third model (first 2 convolutions in FP32) is the first within the limits
        calls.append(path)
        return {"fit": len(calls) >= 3, "miss_rate_rise": 0.0, "macro_recall_drop": 0.05 / len(calls),
                "agreement": 0.9, "mean_abs_logit_diff": 0.1, "batch1_p50_ms": 1.0}

    settings = [quantize.Setting("S8", False, "MinMax")]
    rows, paths = quantize.search(prepared, inputs(4), settings, evaluate, work_dir=tmp_path,
                                  then=quantize.escalate(5))
    assert [r["float_convs"] for r in rows] == [0, 1, 2] and len(paths) == 3
    assert rows[-1]["setting"] == "S8S8 MinMax, first 2 convs FP32"
    table = pd.DataFrame(rows).set_index("setting")
    assert quantize.choose(table) == rows[-1]["setting"]
    assert "the first 1 to 2 convolutions in FP32" in quantize.escalation_note(table)
    assert quantize.escalation_note(table.iloc[:1]) == ""
    # the limit ends it, and a fit plain setting never starts it
    calls.clear()
    rows, _ = quantize.search(prepared, inputs(4), settings, evaluate, work_dir=tmp_path, then=quantize.escalate(1))
    assert [r["float_convs"] for r in rows] == [0, 1] and not any(r["fit"] for r in rows)
    assert quantize.escalate(5)([{"setting": "a", **vars(settings[0]), **evaluate(None)} | {"fit": True}]) is None


def test_a_view_averaged_graph_keeps_its_classifier_and_everything_after_it_fp32(tmp_path):
    torch.manual_seed(0)
    m = net.fold_temperature(net.with_views(net.build_model(4, image_size=SIZE).eval(), 8), 1.5)
    fp32 = export.export_onnx(m, tmp_path / "v.onnx", size=SIZE)
    prepared = quantize.preprocess(fp32, tmp_path / "v.prep.onnx")
    nodes = onnx.load(str(prepared)).graph.node
    kept = quantize.classifier_nodes(prepared)
    ops = [n.op_type for n in nodes if n.name in kept]
    assert ops[0] == "Gemm" and {"Softmax", "Log"} <= set(ops)
    assert not {"Conv", "Transpose"} & set(ops)  # nothing before the classifier: the views, the network
    q = quantize.quantize(prepared, tmp_path / "v.int8.onnx", inputs(8), quantize.Setting("U8", False, "MinMax"))
    x = inputs(6, seed=3)
    fp, i8 = runtime.run(runtime.session(fp32), x), runtime.run(runtime.session(q), x)
    assert fp.shape == i8.shape == (6, 4) and np.isfinite(i8).all()
    # the outputs are averaged log-probabilities over the temperature: the averages, kept FP32, sum to 1
    np.testing.assert_allclose(np.exp(1.5 * i8).sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(np.exp(1.5 * fp).sum(1), 1, atol=1e-4)
