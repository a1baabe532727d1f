"""Calibration, the operating point and the intervals: what the evaluation report and the bundle rest on."""

import copy

import numpy as np
import pytest
import torch
from scipy.special import softmax

from lib import calibration, engine, export, model as net, runtime
from lib.predict import Bundle

CLASSES = ["bridge", "clean", "vias"]


def overconfident(n=6000, temperature=2.5, seed=0):
    """Labels drawn from softmax(z), logits reported as z * temperature: a model overconfident by T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 3))
    y = np.array([rng.choice(3, p=p) for p in softmax(z, axis=1)])
    return z * temperature, y


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_ece():
    logits, y = overconfident()
    t = calibration.fit_temperature(logits, y)
    assert t == pytest.approx(2.5, rel=0.1)
    before = calibration.ece(calibration.probabilities(logits), y)
    after = calibration.ece(calibration.probabilities(logits, t), y)
    assert after < 0.03 < before
    assert (calibration.probabilities(logits, t).argmax(1) == logits.argmax(1)).all()  # predictions unchanged


def test_temperature_stays_1_when_validation_cannot_support_a_fit():
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 6.0]])
    none_wrong = calibration.calibrate(logits, np.array([0, 1, 2]))
    assert none_wrong["temperature"] == 1.0 and not none_wrong["fitted"] and "every one of the 3" in none_wrong["reason"]
    empty = calibration.calibrate(np.zeros((0, 3)), np.zeros(0, int))
    assert empty["temperature"] == 1.0 and not empty["fitted"]
    point = calibration.choose_threshold(np.zeros((0, 3)), np.zeros(0, int), CLASSES, target_accuracy=0.99,
                                         max_miss_rate=0.0)
    assert not point["met"] and point["threshold"] == 0.5 and "no validation images" in point["reason"]
    logits, y = overconfident(n=600)
    fitted = calibration.calibrate(logits, y)
    assert fitted["fitted"] and fitted["temperature"] == pytest.approx(calibration.fit_temperature(logits, y))


def test_temperature_is_applied_only_when_its_group_bootstrap_interval_excludes_1():
    """Copies of one original move together in the bootstrap: 30 originals in 5 copies each cannot
    support a temperature that 150 independent images would."""
    logits, y = overconfident(n=30, temperature=1.3, seed=3)
    copies, y5 = np.repeat(logits, 5, axis=0), np.repeat(y, 5)
    groups = np.repeat(np.arange(30), 5)
    grouped = calibration.calibrate(copies, y5, groups)
    low, high = grouped["interval"]
    assert low <= 1.0 <= high and grouped["temperature"] == 1.0 and not grouped["fitted"]
    assert grouped["fitted_value"] == pytest.approx(calibration.fit_temperature(copies, y5))
    assert "30 independent" in grouped["reason"] and "cannot tell" in grouped["reason"]
    one = calibration.calibrate(copies, y5, np.zeros(150))
    assert not one["fitted"] and one["temperature"] == 1.0 and "one group" in one["reason"]
    as_if_independent = calibration.temperature_interval(copies, y5)
    assert as_if_independent[1] - as_if_independent[0] < 0.6 * (high - low)  # copies would fake precision
    logits, y = overconfident(n=600, temperature=2.5)
    strong = calibration.calibrate(logits, y, np.arange(600))
    assert strong["fitted"] and strong["interval"][0] > 1.0 and strong["temperature"] == strong["fitted_value"]


def test_reliability_bins_count_every_image_once():
    prob = softmax(np.random.default_rng(1).normal(0, 2, (500, 3)), axis=1)
    y = np.random.default_rng(2).integers(0, 3, 500)
    table = calibration.reliability(prob, y, bins=10)
    assert table["images"].sum() == 500
    assert ((table["confidence"] >= table["bin low"]) & (table["confidence"] <= table["bin high"])).all()
    assert calibration.ece(prob, y) == pytest.approx(
        (table["images"] * (table["accuracy"] - table["confidence"]).abs()).sum() / 500)


def test_operating_point_is_the_lowest_threshold_that_meets_the_targets():
    # confidence: 0.95..0.60; the 3 least confident images are wrong, and one of them is a defect called clean
    conf = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6])
    y = np.array([0, 2, 1, 0, 2, 0, 1, 2])
    pred = np.array([0, 2, 1, 0, 2, 1, 0, 0])  # position 5: bridge called clean (a miss)
    prob = np.full((8, 3), 0.0)
    prob[np.arange(8), pred] = conf
    for i in range(8):
        prob[i, [c for c in range(3) if c != pred[i]]] = (1 - conf[i]) / 2
    point = calibration.choose_threshold(prob, y, CLASSES, target_accuracy=0.99, max_miss_rate=0.0)
    assert point["met"] and point["threshold"] == pytest.approx(0.75, abs=2e-6) and point["auto"] == 5 and point["coverage"] == 5 / 8
    assert point["auto_accuracy"] == 1.0 and point["auto_missed"] == 0
    # a looser accuracy target lets in one wrong image, but not the miss
    loose = calibration.choose_threshold(prob, y, CLASSES, target_accuracy=0.8, max_miss_rate=0.0)
    assert loose["threshold"] == pytest.approx(0.75, abs=2e-6)
    looser = calibration.choose_threshold(prob, y, CLASSES, target_accuracy=0.7, max_miss_rate=0.5)
    assert looser["threshold"] == pytest.approx(0.65, abs=2e-6) and looser["auto"] == 7  # 5 of 7 right, 1 miss among 5 defects
    # no threshold can reach perfection when the most confident image is wrong: all go to review
    prob_bad = prob.copy()
    prob_bad[0] = [0.02, 0.96, 0.02]  # the most confident: bridge called clean
    none = calibration.choose_threshold(prob_bad, y, CLASSES, target_accuracy=0.99, max_miss_rate=0.0)
    assert not none["met"] and none["auto"] == 0 and none["coverage"] == 0.0 and none["threshold"] > 1.0
    at = calibration.auto_figures(prob, y, CLASSES, point["threshold"])
    assert at["auto"] == 5 and at["auto_errors"] == 0
    # one error added to the count: 5 right of 6 auto-classified (threshold 0.70) reads 5 / 7, short of 0.8;
    # 5 of 5 (0.75) reads 5 / 6 and qualifies; at 0.85 none does (4 right of 5 at 0.80, 3 of 4 at 0.85, ...)
    plain = calibration.choose_threshold(prob, y, CLASSES, target_accuracy=0.8, max_miss_rate=0.5)
    margined = calibration.choose_threshold(prob, y, CLASSES, target_accuracy=0.8, max_miss_rate=0.5, extra_errors=1)
    assert plain["threshold"] == pytest.approx(0.70, abs=2e-6) and plain["auto_accuracy"] == 5 / 6
    assert margined["threshold"] == pytest.approx(0.75, abs=2e-6) and margined["met"] and margined["extra_errors"] == 1
    assert margined["auto_accuracy"] == 1.0  # the figure reported is the plain one
    assert not calibration.choose_threshold(prob, y, CLASSES, target_accuracy=0.85, max_miss_rate=0.5,
                                            extra_errors=1)["met"]
    with pytest.raises(ValueError, match="extra_errors"):
        calibration.choose_threshold(prob, y, CLASSES, target_accuracy=0.8, max_miss_rate=0.5, extra_errors=-1)
    per_class = calibration.per_class_at(prob, y, CLASSES, point["threshold"])
    assert per_class.loc["bridge", "auto-classified"] == 2 and per_class.loc["bridge", "recall (all)"] == 2 / 3


def test_bootstrap_intervals_hold_the_figure_and_are_reproducible():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    pred = np.where(rng.random(120) < 0.85, y, rng.integers(0, 3, 120))
    a = calibration.bootstrap(y, pred, CLASSES, resamples=400, seed=1)
    b = calibration.bootstrap(y, pred, CLASSES, resamples=400, seed=1)
    assert a.equals(b)
    assert list(a.index) == ["accuracy", "macro recall", "miss rate", "false-alarm rate"]
    assert ((a["low"] <= a["value"]) & (a["value"] <= a["high"])).all()
    assert 0.05 < a.loc["accuracy", "high"] - a.loc["accuracy", "low"] < 0.25  # about ±1.96 sqrt(p(1-p)/n)
    perfect = calibration.bootstrap(y, y, CLASSES, resamples=200)
    # every resample has 0 misses: the bootstrap collapses, the Wilson interval of 0 of n stands in
    from lib.metrics import wilson_interval

    defects = int((y != 1).sum())
    assert perfect.loc["miss rate", "value"] == 0 and perfect.loc["miss rate", "low"] == 0
    assert perfect.loc["miss rate", "high"] == pytest.approx(wilson_interval(0, defects)[1]) and defects > 0
    assert perfect.loc["miss rate", "method"].startswith("Wilson") and a.loc["accuracy", "method"] == "bootstrap"
    assert calibration.fmt(0.9234, 0.88, 0.96, 180) == "0.92 [0.88, 0.96]"
    assert calibration.fmt(0.038, 0.01, 0.07, 156, percent=True) == "4 % [1, 7]"
    assert calibration.records(a)[0]["figure"] == "accuracy"


def test_bootstrap_scores_every_resample_as_headline_does():
    """The resamples are scored all at once; each row must equal `headline` of that resample, classes
    absent from a resample (and resamples without a defect or a clean image) included."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 9)
    pred = np.where(rng.random(9) < 0.6, y, rng.integers(0, 3, 9))
    i = rng.integers(0, 9, (300, 9))
    i[0], i[1] = np.flatnonzero(y == 1)[0], np.flatnonzero(y != 1)[0]  # only clean / no clean image
    batch = calibration._headline_batch(y, pred, CLASSES, i)
    for r in range(len(i)):
        one = calibration.headline(y[i[r]], pred[i[r]], CLASSES)
        assert {k: batch[k][r] for k in one} == pytest.approx(one, nan_ok=True), r


def test_paired_bootstrap_sees_a_real_difference_and_no_difference():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    a = np.where(rng.random(200) < 0.7, y, (y + 1) % 3)
    b = np.where(rng.random(200) < 0.5, y, a)  # b fixes about half of a's errors
    diff = calibration.paired_bootstrap(y, a, b, CLASSES, resamples=500)
    assert diff.loc["accuracy", "difference"] > 0.1 and diff.loc["accuracy", "low"] > 0 and diff.loc["accuracy", "p"] < 0.01
    same = calibration.paired_bootstrap(y, a, a, CLASSES, resamples=100)
    assert (same["difference"] == 0).all() and (same["p"] == 1).all()


def test_the_exported_graph_gives_the_calibrated_probabilities(tmp_path):
    torch.manual_seed(0)
    m = net.build_model(3, image_size=32).eval()
    torch.nn.init.normal_(m.classifier[1].weight, 0, 1.0)
    x = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    raw = engine.logits(m, x)
    t = 1.7
    calibrated = net.fold_temperature(copy.deepcopy(m), t)
    path = export.export_onnx(calibrated, tmp_path / "model.onnx", size=32)
    ort = softmax(runtime.run(runtime.session(path), x).astype(np.float64), axis=1)
    np.testing.assert_allclose(ort, calibration.probabilities(raw, t), atol=1e-5)
    np.testing.assert_allclose(softmax(engine.logits(calibrated, x).astype(np.float64), axis=1), ort, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        net.fold_temperature(m, 0.0)


def test_predict_flags_review_below_the_bundle_threshold(lite0_bundle, tmp_path):
    import shutil

    from conftest import sem_like
    from PIL import Image

    from lib import predict

    folder = tmp_path / "bundle"
    shutil.copytree(lite0_bundle.parent, folder)  # the shared bundle stays as it is
    model = folder / lite0_bundle.name
    files = []
    for i in range(6):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(sem_like(i, 48)).save(p)
        files.append((str(p), ""))
    rows = predict.predict(Bundle.load(model), files, workers=0)
    conf = sorted(r["confidence"] for r in rows)
    middle = (conf[2] + conf[3]) / 2
    export.write_bundle_manifest(folder, review_threshold=middle, int8_fit=True)
    flagged = predict.predict(Bundle.load(model), files, workers=0)
    assert Bundle.load(model).review_threshold == middle
    assert sum(r["review"] for r in flagged) == 3
    assert all(r["review"] == (r["confidence"] < middle) for r in flagged)


def test_unmet_note_names_the_targets_and_the_validation_images_they_need():
    point = {"target_accuracy": 0.99, "max_miss_rate": 0.005, "extra_errors": 1}
    note = calibration.unmet_note(point, 40)
    assert "99.0%" in note and "1 more error counted" in note and "0.5%" in note
    assert "at least 99 auto-classified validation images without an error; validation has 40, so a larger" in note
    enough = calibration.unmet_note(point, 180)
    assert "larger" not in enough and "validation has 180, and at no threshold did" in enough
    plain = calibration.unmet_note(point | {"extra_errors": 0}, 40)
    assert "more error" not in plain and "at least" not in plain
    assert "at least 3 " in calibration.unmet_note({"target_accuracy": 0.6, "max_miss_rate": 0.0, "extra_errors": 2}, 5)
