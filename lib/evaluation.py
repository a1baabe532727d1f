"""Evaluation: a trained model on the test split, read as fabs read a classifier.

Per-class recall (capture rate) with Wilson intervals, precision (purity), F1, the confusion
matrix, the miss rate (defects called `clean`, the costly escape) and false-alarm rate, accuracy
against coverage when the least confident images go to review, and macro recall under each
named shift. `evaluate` computes it all once; the evaluation notebook shows it and `metrics`
gives the record written to `eval/metrics.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import softmax

from lib import decision, engine, metrics, shifts
from lib.data import Part
from lib.preprocess import normalize

COVERAGE_POINTS = (0.5, 0.8, 0.9, 0.95, 1.0)


@dataclass
class Evaluation:
    labels: list[str]
    part: Part  # the test rows, their decoded images and labels
    prob: np.ndarray  # softmax probabilities [N, C] of logits / temperature (calibrated when T was fitted)
    logits: np.ndarray  # the network's raw logits [N, C]
    temperature: float  # 1.0: uncalibrated
    table: pd.DataFrame  # per class and averaged: precision, recall, f1, support, recall_low, recall_high
    counts: pd.DataFrame  # confusion matrix, rows true, columns predicted
    normalized: pd.DataFrame  # the same, row-normalised (the diagonal is each class's recall)
    escapes: dict  # miss and false-alarm rates with their counts, the miss rate's 95% interval, argmax misses
    coverage: pd.DataFrame  # accuracy on the kept images for every share kept
    robustness: pd.DataFrame  # macro recall, accuracy and miss rate under each named shift
    clean_guard: float = 0.0  # `lib.decision.decide` on the network's own softmax (T = 1)

    @property
    def y_true(self) -> np.ndarray:
        return self.part.y

    @property
    def y_pred(self) -> np.ndarray:
        return decision.decide(softmax(self.logits.astype(np.float64), axis=1), self.labels, self.clean_guard)

    @property
    def confidence(self) -> np.ndarray:
        return decision.decided_confidence(self.prob, self.y_pred)

    @property
    def accuracy(self) -> float:
        return float((self.y_true == self.y_pred).mean())

    @property
    def macro_recall(self) -> float:
        return float(self.table.loc["macro avg", "recall"])

    def coverage_points(self) -> pd.DataFrame:
        """The coverage curve at a few shares kept (half, 80 %, 90 %, 95 %, all)."""
        c = self.coverage
        return pd.DataFrame([c.iloc[max(0, int(np.ceil(k * len(c))) - 1)] for k in COVERAGE_POINTS]
                            ).reset_index(drop=True)

    def wrong(self, limit: int) -> np.ndarray:
        """Positions of misclassified images, most confident first, at most `limit`."""
        wrong = np.flatnonzero(self.y_true != self.y_pred)
        return wrong[np.argsort(-self.confidence[wrong])][:limit]

    def predictions(self) -> pd.DataFrame:
        return self.part.rows[["path", "class"]].assign(predicted=[self.labels[i] for i in self.y_pred],
                                                        confidence=self.confidence)

    def metrics(self, ckpt: dict, extra: dict | None = None) -> dict:
        """The record of `eval/metrics.json` (`extra`: calibration, operating point, intervals)."""
        t, labels = self.table, self.labels
        return {"test_images": int(len(self.y_true)), "accuracy": self.accuracy, "macro_recall": self.macro_recall,
                "macro_precision": float(t.loc["macro avg", "precision"]), "macro_f1": float(t.loc["macro avg", "f1"]),
                "weighted_f1": float(t.loc["weighted avg", "f1"]),
                "per_class": {c: {k: float(t.loc[c, k]) for k in ("precision", "recall", "f1")}
                              | {"support": int(t.loc[c, "support"])} for c in labels},
                "confusion": self.counts.values.tolist(), "classes": labels,
                **{k: v for k, v in self.escapes.items() if not k.startswith("miss_rate_ci")},
                "weights": ckpt["weights"]["source"], "checkpoint_epoch": ckpt["epoch"],
                "arch": ckpt.get("arch", "mobilenet_v2"), "recipe": ckpt.get("recipe", "ft"),
                "shifts": self.robustness.reset_index().to_dict(orient="records"), **(extra or {})}


def evaluate(model, part: Part, labels: list[str], *, device="cpu", seed: int = 0,
             temperature: float = 1.0, clean_guard: float = 0.0) -> Evaluation:
    """Score `model` on a decoded split (`lib.data.load_part`): every figure of the evaluation report.
    Confidences are softmax(logits / temperature), that of the class decided. Decisions are
    `lib.decision.decide` on the network's own softmax (temperature 1, where `make cv` measures the
    guard): the most probable class, with `clean` called only at `clean_guard` or above."""
    logits = engine.logits(model, normalize(part.gray), device=device)
    prob = softmax(logits.astype(np.float64) / temperature, axis=1)
    y_true, y_pred = part.y, decision.decide(softmax(logits.astype(np.float64), axis=1), labels, clean_guard)
    table = metrics.per_class_table(y_true, y_pred, labels)
    n = len(labels)
    ci = [metrics.wilson_interval(int(round(r * s)), int(s)) for r, s in zip(table["recall"][:n], table["support"][:n])]
    table["recall_low"] = [lo for lo, _ in ci] + [np.nan, np.nan]
    table["recall_high"] = [hi for _, hi in ci] + [np.nan, np.nan]
    escapes = metrics.defect_vs_clean(y_true, y_pred, labels)
    escapes["miss_rate_ci"] = metrics.wilson_interval(escapes["missed"], escapes["defects"])
    if escapes["miss_rate"] is not None:  # what the guard changed: the misses of the most probable class alone
        escapes["missed_by_argmax"] = metrics.defect_vs_clean(y_true, prob.argmax(1), labels)["missed"]

    def predict(gray):
        shifted = engine.logits(model, normalize(gray), device=device).astype(np.float64)
        return decision.decide(softmax(shifted, axis=1), labels, clean_guard)

    return Evaluation(labels=labels, part=part, prob=prob, logits=logits, temperature=float(temperature), table=table,
                      counts=metrics.confusion(y_true, y_pred, labels),
                      normalized=metrics.confusion(y_true, y_pred, labels, normalize=True), escapes=escapes,
                      coverage=metrics.coverage_curve(y_true, y_pred, decision.decided_confidence(prob, y_pred)),
                      robustness=shifts.robustness(predict, part.gray, y_true, labels, seed=seed),
                      clean_guard=float(clean_guard))
