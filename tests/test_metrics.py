"""Metrics against values computed by hand."""

import numpy as np
import pytest

from lib import metrics

CLASSES = ["bridge", "clean", "vias"]
#            true:  b  b  b  b  c  c  c  v  v  v
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 1])


def test_per_class_table_by_hand():
    t = metrics.per_class_table(Y_TRUE, Y_PRED, CLASSES)
    # bridge: 2 of 4 found; predicted bridge 3 times, 2 right
    assert t.loc["bridge", "recall"] == pytest.approx(2 / 4)
    assert t.loc["bridge", "precision"] == pytest.approx(2 / 3)
    assert t.loc["bridge", "f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # clean: 2 of 3; predicted clean 4 times, 2 right
    assert t.loc["clean", "recall"] == pytest.approx(2 / 3)
    assert t.loc["clean", "precision"] == pytest.approx(2 / 4)
    # vias: 2 of 3; predicted vias 3 times, 2 right
    assert t.loc["vias", "recall"] == pytest.approx(2 / 3)
    assert t.loc["macro avg", "recall"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert t.loc["weighted avg", "recall"] == pytest.approx(6 / 10)
    assert t.loc["macro avg", "support"] == 10
    assert metrics.macro_recall(Y_TRUE, Y_PRED, 3) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)


def test_confusion_counts_and_rows():
    c = metrics.confusion(Y_TRUE, Y_PRED, CLASSES)
    assert c.loc["bridge"].tolist() == [2, 1, 1]
    assert c.loc["clean"].tolist() == [1, 2, 0]
    assert c.loc["vias"].tolist() == [0, 1, 2]
    n = metrics.confusion(Y_TRUE, Y_PRED, CLASSES, normalize=True)
    assert n.loc["bridge"].tolist() == [0.5, 0.25, 0.25]
    assert np.allclose(n.sum(axis=1), 1)


def test_miss_and_false_alarm_rates_by_hand():
    d = metrics.defect_vs_clean(Y_TRUE, Y_PRED, CLASSES)
    # defects predicted clean: one bridge, one vias -> 2 of 7; clean predicted defect: 1 of 3
    assert (d["missed"], d["defects"], d["false_alarms"], d["cleans"]) == (2, 7, 1, 3)
    assert d["miss_rate"] == pytest.approx(2 / 7)
    assert d["false_alarm_rate"] == pytest.approx(1 / 3)
    assert metrics.defect_vs_clean(Y_TRUE, Y_PRED, ["a", "b", "c"])["miss_rate"] is None


def test_wilson_interval_known_values():
    lo, hi = metrics.wilson_interval(5, 5)
    assert lo == pytest.approx(0.5655, abs=1e-3) and hi == 1.0
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)


def test_coverage_curve_keeps_most_confident_first():
    curve = metrics.coverage_curve([0, 0, 1, 1], [0, 1, 1, 1], [0.9, 0.2, 0.8, 0.6])
    assert curve["accuracy"].tolist() == [1.0, 1.0, 1.0, 0.75]
    assert curve["coverage"].tolist() == [0.25, 0.5, 0.75, 1.0]
