"""The `clean` guard (`lib.decision.decide`) and every place that decides with it: the evaluation's
operating point, the INT8 check, make cv's table and the exported bundle read by lib.predict."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from conftest import sem_like
from lib import calibration, cv, decision, export, params, predict, quantize

CLASSES = ["bridge", "clean", "vias"]
PROB = np.array([[0.30, 0.38, 0.32],   # clean by a hair: below a guard of 0.4 it becomes vias
                 [0.10, 0.80, 0.10],   # clearly clean: stays clean
                 [0.60, 0.35, 0.05],   # bridge either way
                 [0.34, 0.39, 0.27]])  # weak clean: becomes bridge


@pytest.mark.parametrize("order", [CLASSES, ["clean", "bridge", "vias"], ["bridge", "vias", "clean"]])
def test_a_weak_clean_becomes_the_likeliest_defect_whatever_the_class_order(order):
    prob = PROB[:, [CLASSES.index(c) for c in order]]
    assert [order[i] for i in decision.decide(prob, order)] == ["clean", "clean", "bridge", "clean"]
    assert [order[i] for i in decision.decide(prob, order, 0.4)] == ["vias", "clean", "bridge", "bridge"]
    picked = decision.decide(prob, order, 0.4)
    assert np.allclose(decision.decided_confidence(prob, picked), [0.32, 0.80, 0.60, 0.34])


def test_no_clean_class_or_no_guard_is_the_argmax_and_a_bad_guard_is_refused():
    assert list(decision.decide(PROB, ["a", "b", "c"], 0.9)) == list(PROB.argmax(1))
    assert list(decision.decide(PROB, CLASSES, 0.0)) == list(PROB.argmax(1))
    assert decision.decide(np.zeros((0, 3)), CLASSES, 0.4).shape == (0,)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="clean_guard must be in"):
            decision.decide(PROB, CLASSES, bad)


def test_the_operating_point_counts_misses_under_the_guard():
    y = np.array([2, 1, 0, 0])  # the first and last are defects the argmax calls clean
    guarded = decision.decide(PROB, CLASSES, 0.4)
    plain = calibration.auto_figures(PROB, y, CLASSES, 0.0)
    assert plain == calibration.auto_figures(PROB, y, CLASSES, 0.0, PROB.argmax(1))
    figures = calibration.auto_figures(PROB, y, CLASSES, 0.0, guarded)
    assert (plain["auto_missed"], figures["auto_missed"]) == (2, 0)
    assert figures["auto_errors"] == 0
    # the guarded confidence is that of the class called: 0.32 for the first image, so a threshold of
    # 0.33 sends it to review, where the argmax's 0.38 would have let it through (as clean)
    assert calibration.auto_figures(PROB, y, CLASSES, 0.33, guarded)["auto"] == 3
    assert calibration.auto_figures(PROB, y, CLASSES, 0.33)["auto"] == 4
    table = calibration.per_class_at(PROB, y, CLASSES, 0.0, guarded)
    assert table.loc["bridge", "recall (all)"] == 1.0 and table.loc["clean", "precision (all)"] == 1.0
    assert calibration.per_class_at(PROB, y, CLASSES, 0.0).loc["bridge", "recall (all)"] == 0.5
    point = calibration.choose_threshold(PROB, y, CLASSES, target_accuracy=0.99, max_miss_rate=0.0, pred=guarded)
    assert point["met"] and point["auto"] == 4
    # by the argmax alone the two weak cleans are misses: only the two confident images can be auto-classified
    assert calibration.choose_threshold(PROB, y, CLASSES, target_accuracy=0.99, max_miss_rate=0.0)["auto"] == 2


def test_the_int8_check_decides_like_the_bundle():
    y = np.array([2, 1, 0, 0])
    logits = np.log(PROB)
    assert quantize.scores(y, logits, CLASSES)["miss_rate"] == pytest.approx(2 / 3)
    guarded = quantize.scores(y, logits, CLASSES, clean_guard=0.4)
    assert guarded["miss_rate"] == 0.0 and guarded["macro_recall"] == 1.0
    # exported logits are divided by T: the guard reads softmax(logits x T), the network's own softmax
    assert list(quantize.decided(logits / 0.5, CLASSES, 0.4, temperature=0.5)) == [2, 1, 0, 0]
    assert list(quantize.decided(logits / 0.5, CLASSES, 0.4)) == [1, 1, 0, 1]  # read at T: sharper, clean passes
    # agreement is of the classes decided: the same argmax, but INT8 lifts a weak clean over the guard
    int8 = np.log(np.array([[0.30, 0.41, 0.29], *PROB[1:]]))
    assert quantize.fidelity(logits, int8)["agreement"] == 1.0
    assert quantize.fidelity(logits, int8, CLASSES, clean_guard=0.4)["agreement"] == 0.75


def test_cv_guard_table_rescores_out_of_fold_probabilities():
    rng = np.random.default_rng(0)
    prob = softmax(rng.normal(size=(40, 3)) + np.array([0.0, 1.0, 0.0]), axis=1)  # clean-leaning
    true = rng.integers(0, 3, 40)
    oof = pd.DataFrame({"fold": np.repeat([1, 2, 3, 4], 10), "index": np.arange(40), "true": true,
                        **{c: prob[:, i] for i, c in enumerate(CLASSES)}})
    cfg = cv.parse_config("recipe:probe clean_guard:0.4", params.read_file(params.BASE))
    r = cv.ConfigResult(config="a", weights="", recipe="probe", folds=pd.DataFrame(), per_class=pd.DataFrame(),
                        confusion=np.zeros((3, 3)), shifts=pd.DataFrame(), notes=[], seconds=0.0, oof=oof)
    t = cv.guard_table([r], [cfg], CLASSES, k=4).set_index("clean_guard")
    assert list(t.index) == [0.0, 0.3, 0.4, 0.5] and t.loc[0.4, "runs with"] == "yes"
    for g in t.index:
        pred = decision.decide(prob, CLASSES, g)
        assert t.loc[g, "defects called clean"] == ((pred == 1) & (true != 1)).sum()
        assert t.loc[g, "clean called a defect"] == ((pred != 1) & (true == 1)).sum()
    assert t.loc[0.0, "defects called clean"] >= t.loc[0.5, "defects called clean"]
    assert t.loc[0.4, "vs the guard it runs with, points [95%], p"] == "reference"
    assert cv.guard_table([r], [cfg], ["a", "b", "c"], k=4).empty


@pytest.fixture(scope="module")
def leaning(tmp_path_factory):
    """A bundle whose network favours `clean` (its classifier bias raised: about 0.26 / 0.43 / 0.32 for
    bridge / clean / vias on any image), review threshold 0.35, and images to classify with it."""
    import torch
    from PIL import Image

    from lib import model as net, preprocess

    folder = tmp_path_factory.mktemp("leaning")
    torch.manual_seed(0)
    m = net.build_model(3, arch="mobilenet_v2", image_size=32).eval()
    torch.nn.init.normal_(m.classifier[1].weight, 0, 0.01)
    with torch.no_grad():
        m.classifier[1].bias.copy_(torch.tensor([0.0, 0.5, 0.2]))
    export.export_onnx(m, folder / "model.onnx", size=32)
    export.write_labels(folder, CLASSES)
    (folder / "preprocessing.json").write_text(json.dumps(preprocess.preprocessing_spec(32)))
    export.write_bundle_manifest(folder, review_threshold=0.35, int8_fit=True)
    files = []
    for i in range(4):
        files.append(folder.parent / f"{folder.name}_img_{i}.png")
        Image.fromarray(sem_like(i, 48)).save(files[-1])
    return folder / "model.onnx", [(str(f), "") for f in files]


def with_guard(model, folder, guard, **extra):
    """A copy of the bundle whose bundle.json carries `clean_guard` (and `extra`)."""
    shutil.copytree(model.parent, folder)
    export.write_bundle_manifest(folder, review_threshold=0.35, int8_fit=True, extra={"clean_guard": guard, **extra})
    return folder / model.name


def test_lib_predict_applies_the_bundles_guard(leaning, tmp_path):
    model, items = leaning
    plain = predict.predict(predict.Bundle.load(model), items, workers=0)
    b = predict.Bundle.load(with_guard(model, tmp_path / "guarded", 0.5))
    assert b.clean_guard == 0.5
    guarded = predict.predict(b, items, workers=0)
    assert all(r["predicted"] == "clean" and not r["review"] for r in plain)  # the argmax, at 0.43
    for p, g in zip(plain, guarded):
        assert p["top3"] == g["top3"]
        assert g["predicted"] == "vias" and g["confidence"] == pytest.approx(dict(g["top3"])["vias"])
        assert g["review"]  # 0.32 for vias: below the threshold, so a human looks
    # a bundle whose logits were divided by T = 2 gives these same logits the own softmax of twice them
    # (about 0.19 / 0.52 / 0.29): clean clears the guard there
    b = predict.Bundle.load(with_guard(model, tmp_path / "tempered", 0.5, temperature=2))
    assert b.temperature == 2
    assert [r["predicted"] for r in predict.predict(b, items, workers=0)] == ["clean"] * len(items)


@pytest.mark.parametrize("bad", [1.0, -0.2, "0.4", True])
def test_a_bad_guard_in_the_bundle_is_refused_by_name(leaning, tmp_path, bad):
    model = with_guard(leaning[0], tmp_path / "b", bad)
    with pytest.raises(predict.BundleError, match=r"bundle.json: clean_guard must be a number in \[0, 1\)"):
        predict.Bundle.load(model)
    model = with_guard(leaning[0], tmp_path / "t", 0.4, temperature=0)
    with pytest.raises(predict.BundleError, match=r"bundle.json: temperature must be a positive number, got 0"):
        predict.Bundle.load(model)
