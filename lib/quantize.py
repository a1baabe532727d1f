"""INT8 static post-training quantisation with ONNX Runtime, and the search for the setting that loses least.

The FP32 model goes through `quant_pre_process` (shape inference, graph optimisation) once,
then `quantize_static` in QDQ format with per-channel weights (a depthwise convolution's
channels span very different ranges, which one scale per tensor would crush). Activations
are calibrated on training images decoded by the one preprocessing (`lib.data`).

What is searched, because it is what matters on x86 CPUs:

- activation type: S8S8 (int8 activations and weights) or U8S8 (uint8 activations, int8
  weights); without VNNI, U8S8 products can saturate in 16 bits;
- `reduce_range` (7-bit weights, which avoid that saturation);
- the calibration method: MinMax, Entropy or Percentile.

Each calibration method runs once (its ranges are cached) and serves the four type /
reduce_range variants.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lib.io import atomic_path

CALIBRATIONS = ("MinMax", "Entropy", "Percentile")


@dataclass(frozen=True)
class Setting:
    """One quantisation setting: activation type (S8 or U8; weights are always int8), 7-bit weights, calibration."""

    activation: str
    reduce_range: bool
    calibration: str

    @property
    def name(self) -> str:
        return f"{self.activation}S8{' reduce_range' if self.reduce_range else ''} {self.calibration}"


def grid(calibrations=CALIBRATIONS) -> list[Setting]:
    """Every combination of activation type, reduce_range and the given calibration methods."""
    unknown = [c for c in calibrations if c not in CALIBRATIONS]
    if unknown or not calibrations:
        raise ValueError(f"calibration methods must be a non-empty list of {list(CALIBRATIONS)}, got {list(calibrations)}")
    return [Setting(a, r, c) for c in calibrations for a in ("S8", "U8") for r in (False, True)]


def calibration_rows(split, n: int, seed: int):
    """n training rows of the split manifest, stratified by class (as even as the classes allow), reproducibly."""
    train = split[split["split"] == "train"]
    if train.empty:
        raise ValueError("the split manifest has no training rows to calibrate on")
    n = min(int(n), len(train))
    if n < 1:
        raise ValueError(f"calibration_images must be at least 1, got {n}")
    shuffled = train.sample(frac=1.0, random_state=seed)
    # round-robin over classes: the k-th image of every class before the (k+1)-th of any
    rank = shuffled.groupby("class").cumcount()
    return shuffled.assign(_rank=rank.to_numpy()).sort_values("_rank", kind="stable").head(n).drop(columns="_rank")


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol (get_next, rewind, len, set_range) over an input array.

    One image per batch by default: the histogram calibrators (Entropy, Percentile) stack the
    outputs of all batches, which fails on a shorter last batch."""

    def __init__(self, x: np.ndarray, batch_size: int = 1):
        self.x, self.batch_size = np.ascontiguousarray(x, np.float32), batch_size
        self.set_range(0, len(x))

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter([{"input": self.x[i : min(i + self.batch_size, self.end)]}
                         for i in range(self.start, self.end, self.batch_size)])

    def set_range(self, start_index: int, end_index: int):
        self.start, self.end = start_index, end_index
        self.rewind()

    def __len__(self):
        return len(self.x)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def preprocess(fp32: str | Path, out: str | Path) -> Path:
    """ONNX Runtime's quant_pre_process (shape inference and graph optimisation) into `out`."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_path(out) as tmp:
        onnx_tmp = tmp.with_suffix(".onnx")
        try:
            quant_pre_process(str(fp32), str(onnx_tmp), skip_symbolic_shape=False)
            onnx_tmp.replace(tmp)
        finally:
            onnx_tmp.unlink(missing_ok=True)
    return Path(out)


def quantize(prepared: str | Path, out: str | Path, calib_x: np.ndarray, setting: Setting, *,
             cache_dir: str | Path | None = None) -> Path:
    """Quantise a pre-processed FP32 model to INT8 QDQ with per-channel weights; write it to `out`.

    With `cache_dir`, the calibration ranges of each method are computed once and reused.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if setting.calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration method {setting.calibration!r}; choose one of {list(CALIBRATIONS)}")
    if setting.activation not in ("S8", "U8"):
        raise ValueError(f"activation type must be S8 or U8, got {setting.activation!r}")
    if len(calib_x) == 0:
        raise ValueError("no calibration images")
    cache = Path(cache_dir) / f"calibration_{setting.calibration}.json" if cache_dir else None
    with atomic_path(out) as tmp:
        onnx_tmp = tmp.with_suffix(".onnx")
        try:
            quantize_static(
                str(prepared), str(onnx_tmp), _Batches(calib_x), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=setting.reduce_range,
                activation_type=QuantType.QInt8 if setting.activation == "S8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, setting.calibration),
                calibration_cache_path=str(cache) if cache else None,
            )
            onnx_tmp.replace(tmp)
        finally:
            onnx_tmp.unlink(missing_ok=True)
    return Path(out)


def scores(y_true: np.ndarray, logits: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro recall and miss rate (defect images predicted clean) of logits against labels."""
    from lib.metrics import defect_vs_clean, macro_recall

    pred = logits.argmax(1)
    return {"accuracy": float((pred == y_true).mean()) if len(y_true) else float("nan"),
            "macro_recall": macro_recall(y_true, pred, len(classes)),
            "miss_rate": defect_vs_clean(y_true, pred, classes)["miss_rate"]}


def fidelity(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> dict:
    """How closely the INT8 model follows FP32: argmax agreement and logit error."""
    agree = fp32_logits.argmax(1) == int8_logits.argmax(1)
    diff = np.abs(fp32_logits - int8_logits)
    return {"agreement": float(agree.mean()) if len(agree) else 1.0, "disagreements": int((~agree).sum()),
            "mean_abs_logit_diff": float(diff.mean()) if diff.size else 0.0}


def search(prepared: str | Path, calib_x: np.ndarray, settings: list[Setting], evaluate, *,
           work_dir: str | Path | None = None):
    """Quantise with every setting and score each with `evaluate(path) -> dict` (flat).

    Returns (table rows as dicts, {setting name: model path}); models stay in work_dir.
    """
    work = Path(work_dir or tempfile.mkdtemp(prefix="quant."))
    rows, paths = [], {}
    for k, s in enumerate(settings):
        path = quantize(prepared, work / f"variant_{k:02d}.onnx", calib_x, s, cache_dir=work)
        rows.append({"setting": s.name, **asdict(s), **evaluate(path)})
        paths[s.name] = path
    return rows, paths


def choose(table, drop_col: str = "macro_recall_drop", agree_col: str = "agreement",
           speed_col: str | None = "batch1_p50_ms", err_col: str = "mean_abs_logit_diff"):
    """The setting that loses least: smallest macro-recall drop (a gain counts as no drop, since on a
    small split a gain is luck), then the highest argmax agreement with FP32; among settings equal
    on both, the fastest (when `speed_col` is given), then the smallest logit error.
    Returns the chosen row's index label."""
    keys = [table[drop_col].clip(lower=0).round(9), -table[agree_col].round(9)]
    if speed_col is not None:
        keys.append(table[speed_col])
    keys.append(table[err_col])
    order = np.lexsort(tuple(np.asarray(k, dtype=float) for k in reversed(keys)))
    return table.index[order[0]]
