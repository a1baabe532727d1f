"""Classification metrics as fabs read them: per-class recall (capture rate) first, escapes apart."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from lib.decision import CLEAN


def macro_recall(y_true, y_pred, n_classes: int) -> float:
    """Mean recall over the classes present in y_true."""
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))
    support = cm.sum(1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean()) if present.any() else 0.0


def per_class_table(y_true, y_pred, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, plus macro and weighted averages."""
    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    table = pd.DataFrame({"precision": p, "recall": r, "f1": f, "support": s}, index=list(classes))
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        table.loc[f"{avg} avg"] = [ap, ar, af, int(s.sum())]
    table["support"] = table["support"].astype(int)
    table.index.name = "class"
    return table


def confusion(y_true, y_pred, classes: list[str], normalize: bool = False) -> pd.DataFrame:
    """Confusion matrix, rows = true class, columns = predicted; row-normalised on request."""
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(len(classes))).astype(float)
    if normalize:
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    df = pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted"))
    return df if normalize else df.astype(int)


def defect_vs_clean(y_true, y_pred, classes: list[str], clean: str = CLEAN) -> dict:
    """Miss rate (defect images predicted clean, the costly escape) and false-alarm rate
    (clean images predicted as any defect), with the counts behind them."""
    if clean not in classes:
        return {"miss_rate": None, "false_alarm_rate": None, "missed": 0, "defects": 0,
                "false_alarms": 0, "cleans": 0}
    c = classes.index(clean)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    defect = y_true != c
    missed = int(((y_pred == c) & defect).sum())
    alarms = int(((y_pred != c) & ~defect).sum())
    n_def, n_clean = int(defect.sum()), int((~defect).sum())
    return {"miss_rate": missed / n_def if n_def else None, "false_alarm_rate": alarms / n_clean if n_clean else None,
            "missed": missed, "defects": n_def, "false_alarms": alarms, "cleans": n_clean}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy), sensible for the tiny per-class counts of SEM
    test sets; (nan, nan) when there is nothing to count."""
    if n == 0:
        return (float("nan"), float("nan"))
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def coverage_curve(y_true, y_pred, confidence) -> pd.DataFrame:
    """Accuracy on the images the model keeps when the least confident go to human review."""
    order = np.argsort(-np.asarray(confidence))
    correct = (np.asarray(y_true) == np.asarray(y_pred))[order]
    kept = np.arange(1, len(order) + 1)
    return pd.DataFrame({"coverage": kept / len(order), "accuracy": np.cumsum(correct) / kept,
                         "threshold": np.asarray(confidence)[order]})
