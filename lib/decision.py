"""The decision rule: from a network's class probabilities to the class a fab acts on.

Numpy only, so that `lib.predict` on an edge device needs nothing more.
"""

from __future__ import annotations

import numpy as np

CLEAN = "clean"


def decide(prob, classes: list[str], clean_guard: float = 0.0, clean: str = CLEAN) -> np.ndarray:
    """Class decisions from probabilities [N, C] under the recall-first `clean` guard: the most
    probable class, except that `clean` is called only when its own probability is at least
    `clean_guard`; below that the most probable other (defect) class is called instead. 0 (or a
    class list without `clean`) is the plain argmax. A missed defect costs more than a false alarm,
    so an image the network thinks only probably clean is sent on as its likeliest defect."""
    prob = np.asarray(prob)
    if not 0.0 <= clean_guard < 1.0:
        raise ValueError(f"clean_guard must be in [0, 1), got {clean_guard}")
    pred = prob.argmax(1)
    if clean_guard <= 0.0 or clean not in classes or prob.shape[1] < 2 or not len(prob):
        return pred
    c = classes.index(clean)
    weak = (pred == c) & (prob[:, c] < clean_guard)
    if weak.any():
        pred[weak] = np.delete(prob[weak], c, axis=1).argmax(1)
        pred[weak] += pred[weak] >= c  # back to the full class list's index
    return pred


def decided_confidence(prob, pred) -> np.ndarray:
    """The probability of each decided class (the confidence the review threshold reads)."""
    prob = np.asarray(prob)
    return prob[np.arange(len(prob)), np.asarray(pred, dtype=int)]
