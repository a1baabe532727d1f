"""Confidence that means what it says, the review threshold a fab runs at, and honest intervals.

- Temperature scaling (Guo et al., 2017): one scalar T fitted on the validation split by
  minimising the negative log-likelihood of softmax(logits / T); the argmax, and so every
  recall figure, is unchanged (the `clean` guard reads the network's own softmax, T = 1, so T does
  not move its decisions either). The export stage bakes T into the ONNX graph.
- Expected calibration error (ECE) over equal-width confidence bins, and the table behind a
  reliability diagram.
- The operating point: the lowest confidence threshold whose auto-classified validation images
  (confidence at or above it) meet the accuracy and miss-rate targets; images below it go to a
  human. Coverage is the share auto-classified.
- Bootstrap intervals (scipy.stats.bootstrap, percentile, images resampled with their labels)
  for the headline figures, and paired bootstrap intervals for differences on the same images.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import log_softmax, softmax

from lib.decision import CLEAN, decided_confidence

BINS = 10


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds=(0.1, 20.0)) -> float:
    """The temperature T minimising the validation NLL of softmax(logits / T) (bounded search on log T)."""
    from scipy.optimize import minimize_scalar

    logits, y = np.asarray(logits, np.float64), np.asarray(y)
    if len(y) == 0:
        raise ValueError("temperature scaling needs at least one validation image")

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def temperature_interval(logits: np.ndarray, y: np.ndarray, groups=None, *, resamples: int = 400, level: float = 0.95,
                         bounds=(0.1, 20.0), seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the fitted temperature, resampling whole groups (near-duplicate
    copies of one original move together; each image is its own group when `groups` is None). A
    resample with no image wrong has no finite fit and counts at the lower bound."""
    logits, y = np.asarray(logits, np.float64), np.asarray(y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    members = list(pd.Series(np.arange(len(y))).groupby(groups, dropna=False).apply(np.asarray))
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(resamples):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        wrong = (logits[pick].argmax(1) != y[pick]).any()
        fits.append(fit_temperature(logits[pick], y[pick], bounds) if wrong else bounds[0])
    a = (1 - level) / 2
    low, high = np.quantile(fits, [a, 1 - a])
    return float(low), float(high)


def calibrate(logits: np.ndarray, y: np.ndarray, groups=None, *, bounds=(0.1, 20.0), resamples: int = 400,
              seed: int = 0) -> dict:
    """`fit_temperature` where the validation split can support it: {"temperature", "fitted", "reason",
    "fitted_value", "interval"}.

    T stays 1 (uncalibrated), and `reason` says why, when
    - there are no validation images, or none wrong (the NLL keeps falling as T shrinks);
    - the fit lands on a bound;
    - the 95% bootstrap interval of the fit (`temperature_interval`, resampling `groups`, e.g. an
      original and its augmented copies) contains 1: a split of a few dozen originals cannot tell
      that temperature from no change, and applying it moved test ECE either way."""
    y = np.asarray(y)
    none = {"temperature": 1.0, "fitted": False, "fitted_value": None, "interval": None}
    if len(y) == 0:
        return {**none, "reason": "no validation images: confidences are not calibrated"}
    if (np.asarray(logits).argmax(1) == y).all():
        return {**none, "reason": f"every one of the {len(y)} validation images is right, so the fit has nothing to "
                                  f"learn from (the NLL falls without limit as T shrinks): confidences are not calibrated"}
    n_groups = len(y) if groups is None else len(pd.unique(pd.Series(np.asarray(groups))))
    if n_groups < 2:
        return {**none, "reason": "the validation split is one group of near-duplicates: no interval, so "
                                  "confidences are not calibrated"}
    t = fit_temperature(logits, y, bounds)
    if not bounds[0] * 1.02 < t < bounds[1] / 1.02:
        return {**none, "fitted_value": t,
                "reason": f"the fit reached its bound (T = {t:.3g}, bounds {bounds}): confidences are not calibrated"}
    low, high = temperature_interval(logits, y, groups, resamples=resamples, bounds=bounds, seed=seed)
    out = {"temperature": t, "fitted": True, "reason": "", "fitted_value": t, "interval": [low, high]}
    if low <= 1.0 <= high:
        out.update(temperature=1.0, fitted=False,
                   reason=f"the validation split ({n_groups} independent images or groups) cannot tell the fitted T = {t:.2f} "
                          f"from 1 (95% bootstrap interval {low:.2f}-{high:.2f}): confidences are left as trained")
    return out


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, np.float64) / temperature, axis=1)


def reliability(prob: np.ndarray, y: np.ndarray, bins: int = BINS) -> pd.DataFrame:
    """Per equal-width confidence bin: images, mean confidence, accuracy (empty bins left out)."""
    conf, correct = prob.max(1), prob.argmax(1) == np.asarray(y)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    rows = [{"bin low": b / bins, "bin high": (b + 1) / bins, "images": int((idx == b).sum()),
             "confidence": float(conf[idx == b].mean()), "accuracy": float(correct[idx == b].mean())}
            for b in range(bins) if (idx == b).any()]
    return pd.DataFrame(rows, columns=["bin low", "bin high", "images", "confidence", "accuracy"])


def ece(prob: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the image-weighted mean |accuracy - confidence| over the bins."""
    t = reliability(prob, y, bins)
    return float((t["images"] * (t["accuracy"] - t["confidence"]).abs()).sum() / max(1, t["images"].sum()))


def decisions(prob: np.ndarray, pred: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, predicted class) of every image: the classes decided (`pred`, from
    `lib.decision.decide`; default the most probable class) and their probabilities in `prob`, which
    the review threshold reads."""
    pred = prob.argmax(1) if pred is None else np.asarray(pred, dtype=int)
    return decided_confidence(prob, pred), pred


def auto_figures(prob: np.ndarray, y: np.ndarray, classes: list[str], threshold: float,
                 pred: np.ndarray | None = None) -> dict:
    """What happens at a threshold: coverage, and accuracy and miss rate among the auto-classified
    images (the miss rate counts auto-classified defect images called `clean`); `pred`: the classes
    decided, when not the most probable (`decisions`)."""
    y = np.asarray(y)
    conf, pred = decisions(prob, pred)
    auto = conf >= threshold
    out = {"threshold": float(threshold), "images": int(len(y)), "auto": int(auto.sum()),
           "coverage": float(auto.mean()) if len(y) else 0.0,
           "auto_accuracy": float((pred[auto] == y[auto]).mean()) if auto.any() else None,
           "auto_errors": int((pred[auto] != y[auto]).sum())}
    if CLEAN in classes:
        c = classes.index(CLEAN)
        defect = auto & (y != c)
        out.update(auto_defects=int(defect.sum()), auto_missed=int((defect & (pred == c)).sum()),
                   auto_miss_rate=float((pred[defect] == c).mean()) if defect.any() else None)
    return out


def choose_threshold(prob: np.ndarray, y: np.ndarray, classes: list[str], *, target_accuracy: float,
                     max_miss_rate: float, extra_errors: int = 0, pred: np.ndarray | None = None) -> dict:
    """The operating point: the lowest threshold (the most images auto-classified) at which the
    auto-classified images reach `target_accuracy` and a miss rate of at most `max_miss_rate`.

    With `extra_errors` = k, the accuracy that must reach the target counts k more wrong images than
    validation shows, (right) / (auto + k): with k = 1 this is the add-one estimate (errors + 1) /
    (auto + 1) of the error rate on the next image, so a threshold that only just reaches 99% on 150
    validation images (one error) is not taken; the unmargined accuracy is reported as it is.

    Candidates are the images' own confidences, less 1e-6 so that the same image scored in float32
    elsewhere (ONNX Runtime) stays on the same side; when none qualifies, the threshold is just
    above 1, which no confidence reaches: every image goes to review, and `met` says so."""
    if extra_errors < 0:
        raise ValueError(f"extra_errors must be 0 or more, got {extra_errors}")
    targets = {"target_accuracy": target_accuracy, "max_miss_rate": max_miss_rate, "extra_errors": int(extra_errors)}
    if len(y) == 0:  # nothing to choose on: the prediction command's default, and say so
        from lib.predict import DEFAULT_THRESHOLD

        return {"threshold": DEFAULT_THRESHOLD, "images": 0, "auto": 0, "coverage": 0.0, "auto_accuracy": None,
                "auto_errors": 0, "met": False, **targets,
                "reason": "no validation images: the threshold is the prediction command's default"}
    conf, pred = decisions(prob, pred)
    for c in np.unique(conf):  # ascending: the first that qualifies keeps the most images
        f = auto_figures(prob, y, classes, float(c) - 1e-6, pred)
        margined = (f["auto"] - f["auto_errors"]) / (f["auto"] + extra_errors)
        if margined >= target_accuracy and (f.get("auto_miss_rate") or 0.0) <= max_miss_rate:
            return {**f, "met": True, **targets}
    return {**auto_figures(prob, y, classes, float(np.nextafter(1.0, 2.0)), pred), "met": False, **targets}


def unmet_note(point: dict, images: int) -> str:
    """Why a `choose_threshold` point was not met, for the evaluation report: the targets, and the fewest
    error-free auto-classified validation images that could meet the accuracy target once the added
    errors are counted ((n) / (n + k) >= target), against the validation images there are."""
    target, k = point["target_accuracy"], point.get("extra_errors", 0)
    added = f"{k} more error{'s' if k > 1 else ''} counted"
    text = (f"**No threshold meets the targets on validation** (accuracy {target:.1%} of the auto-classified images"
            f"{f' with {added}' if k else ''}, miss rate at most "
            f"{point['max_miss_rate']:.1%}): every image goes to review until the model improves.")
    if k and target < 1:
        need = math.ceil(target * k / (1 - target) - 1e-9)
        text += (f" With {added}, {target:.1%} needs at least {need} auto-classified "
                 f"validation images without an error; validation has {images}"
                 + (", so a larger validation split is needed first." if images < need else
                    ", and at no threshold did the auto-classified ones reach the targets."))
    return text


def point_table(points: dict[str, dict]) -> pd.DataFrame:
    """Operating-point figures side by side ({column: auto_figures(...)}), formatted for reading."""
    rows = [("threshold", "threshold", "{:.4f}"), ("images", "images", "{:d}"), ("auto-classified", "auto", "{:d}"),
            ("coverage", "coverage", "{:.1%}"), ("accuracy of the auto-classified", "auto_accuracy", "{:.1%}"),
            ("errors among them", "auto_errors", "{:d}"), ("auto-classified defect images", "auto_defects", "{:d}"),
            ("of which called clean", "auto_missed", "{:d}"), ("miss rate of the auto-classified", "auto_miss_rate",
                                                               "{:.1%}")]
    table = {}
    for column, f in points.items():
        table[column] = {name: ("n/a" if f.get(key) is None else form.format(f[key])) for name, key, form in rows
                         if key in f}
    return pd.DataFrame(table)


def per_class_at(prob: np.ndarray, y: np.ndarray, classes: list[str], threshold: float,
                 pred: np.ndarray | None = None) -> pd.DataFrame:
    """Per class at the operating point: images, auto-classified, capture rate (recall) and purity
    (precision) among the auto-classified, beside recall and precision over all images (`pred`: the
    classes decided, when not the most probable)."""
    y = np.asarray(y)
    conf, pred = decisions(prob, pred)
    auto = conf >= threshold
    rows = []
    for c, name in enumerate(classes):
        true_c, auto_c = y == c, auto & (y == c)
        called, called_all = auto & (pred == c), pred == c
        rows.append({"class": name, "images": int(true_c.sum()), "auto-classified": int(auto_c.sum()),
                     "capture rate (auto)": float((pred[auto_c] == c).mean()) if auto_c.any() else np.nan,
                     "purity (auto)": float((y[called] == c).mean()) if called.any() else np.nan,
                     "recall (all)": float((pred[true_c] == c).mean()) if true_c.any() else np.nan,
                     "precision (all)": float((y[called_all] == c).mean()) if called_all.any() else np.nan})
    return pd.DataFrame(rows).set_index("class")


def headline(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro recall, miss rate and false-alarm rate of predictions (NaN when undefined)."""
    from lib.metrics import defect_vs_clean, macro_recall

    y, pred = np.asarray(y), np.asarray(pred)
    out = {"accuracy": float((y == pred).mean()), "macro recall": macro_recall(y, pred, len(classes))}
    if CLEAN in classes:
        e = defect_vs_clean(y, pred, classes)
        out["miss rate"] = np.nan if e["miss_rate"] is None else e["miss_rate"]
        out["false-alarm rate"] = np.nan if e["false_alarm_rate"] is None else e["false_alarm_rate"]
    return out


def _counts(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    """(successes, trials) behind each headline figure that is a proportion."""
    from lib.metrics import defect_vs_clean

    out = {"accuracy": (int((y == pred).sum()), len(y))}
    if CLEAN in classes:
        e = defect_vs_clean(y, pred, classes)
        out["miss rate"] = (e["missed"], e["defects"])
        out["false-alarm rate"] = (e["false_alarms"], e["cleans"])
    return out


def _headline_batch(y: np.ndarray, pred: np.ndarray, classes: list[str], i: np.ndarray) -> dict:
    """`headline` of every resample at once: `i` holds one resample of image indices per row [..., n]."""
    yb, pb = y[i], pred[i]
    support = np.stack([(yb == c).sum(-1) for c in range(len(classes))], -1)
    hits = np.stack([((yb == c) & (pb == c)).sum(-1) for c in range(len(classes))], -1)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": (yb == pb).mean(-1),
               "macro recall": np.where(present, hits / np.maximum(support, 1), 0).sum(-1) / present.sum(-1)}
        if CLEAN in classes:
            c = classes.index(CLEAN)
            defect, called_clean = yb != c, pb == c
            out["miss rate"] = (called_clean & defect).sum(-1) / defect.sum(-1)
            out["false-alarm rate"] = (~called_clean & ~defect).sum(-1) / (~defect).sum(-1)
    return out


def bootstrap(y: np.ndarray, pred: np.ndarray, classes: list[str], *, resamples: int = 2000, level: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Each headline figure with its percentile bootstrap interval (images resampled with their
    labels, scipy.stats.bootstrap, every resample scored at once). When a proportion is the same in
    every resample (0 of n, n of n) the bootstrap interval collapses to a point; the Wilson interval
    of its count is given instead (`method` says which)."""
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap as sp_bootstrap

    from lib.metrics import wilson_interval

    y, pred = np.asarray(y), np.asarray(pred)
    point, counts = headline(y, pred, classes), _counts(y, pred, classes)
    rows = []
    for name, value in point.items():
        def stat(i, axis=-1, name=name):
            return _headline_batch(y, pred, classes, np.moveaxis(i, axis, -1).astype(int))[name]

        low = high = np.nan
        method = "bootstrap"
        if not np.isnan(value) and len(y) >= 2:
            with warnings.catch_warnings():  # a figure constant over resamples (e.g. 0 misses) is no error
                warnings.simplefilter("ignore", category=DegenerateDataWarning)
                ci = sp_bootstrap((np.arange(len(y)),), stat, n_resamples=resamples, confidence_level=level,
                                  method="percentile", vectorized=True, random_state=np.random.default_rng(seed))
            low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
        if name in counts and not np.isnan(value) and (np.isnan(low) or low == high):
            low, high = wilson_interval(*counts[name], confidence=level)
            method = "Wilson (the bootstrap interval collapses or is undefined for this count)"
        rows.append({"figure": name, "value": value, "low": low, "high": high, "method": method})
    return pd.DataFrame(rows).set_index("figure")


def paired_bootstrap(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, classes: list[str], *,
                     resamples: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Differences b - a of each headline figure on the same images, with paired percentile bootstrap
    intervals (one resample of images serves both), and the share of resamples on the other side of 0
    (a two-sided bootstrap p-value)."""
    y, a, b = np.asarray(y), np.asarray(pred_a), np.asarray(pred_b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(resamples, len(y)))
    point_a, point_b = headline(y, a, classes), headline(y, b, classes)
    batch_a, batch_b = _headline_batch(y, a, classes, idx), _headline_batch(y, b, classes, idx)  # all at once
    rows = []
    for k in point_a:
        d = np.asarray(batch_b[k] - batch_a[k], float)
        d = d[~np.isnan(d)]
        diff = point_b[k] - point_a[k]
        if len(d) == 0 or np.isnan(diff):
            rows.append({"figure": k, "difference": diff, "low": np.nan, "high": np.nan, "p": np.nan})
            continue
        lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
        p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())) if diff != 0 else 1.0
        rows.append({"figure": k, "difference": diff, "low": float(lo), "high": float(hi), "p": float(p)})
    return pd.DataFrame(rows).set_index("figure")


def records(table: pd.DataFrame) -> list[dict]:
    """A table's rows (index included) as plain dicts with None for NaN: strict JSON."""
    flat = table.reset_index()
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
            for row in flat.to_dict(orient="records")]


def decimals(n: int) -> int:
    """Decimals a proportion over n images supports: one image moves it by 1/n, so 2 decimals up to
    a few hundred images, 3 up to a few thousand."""
    return 2 if n < 1000 else 3 if n < 10000 else 4


def fmt(value: float, low: float, high: float, n: int, percent: bool = False) -> str:
    """'0.92 [0.88, 0.96]' (or '3.8 % [1.4, 7.2]'), rounded to what n images support."""
    if value is None or np.isnan(value):
        return "n/a"
    d = decimals(n)
    if low is None or high is None or np.isnan(low) or np.isnan(high):
        return f"{100 * value:.{max(0, d - 2)}f} %" if percent else f"{value:.{d}f}"
    if percent:
        d = max(0, d - 2)
        return f"{100 * value:.{d}f} % [{100 * low:.{d}f}, {100 * high:.{d}f}]"
    return f"{value:.{d}f} [{low:.{d}f}, {high:.{d}f}]"
