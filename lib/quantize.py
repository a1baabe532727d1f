"""INT8 static post-training quantisation with ONNX Runtime, and the search for the setting that loses least.

The FP32 model goes through `quant_pre_process` (shape inference, graph optimisation) once,
then `quantize_static` in QDQ format with per-channel weights (a depthwise convolution's
channels span very different ranges, which one scale per tensor would crush); the linear
classifier stays FP32. Activations are calibrated on training images decoded by the one
preprocessing (`lib.preprocess`).

What is searched, because it is what matters on x86 CPUs:

- activation type: S8S8 (int8 activations and weights) or U8S8 (uint8 activations, int8
  weights); without VNNI, U8S8 products can saturate in 16 bits;
- `reduce_range` (7-bit weights, which avoid that saturation);
- the calibration method: MinMax, Entropy or Percentile.

Each calibration method runs once (its ranges are cached) and serves the four type /
reduce_range variants.

When no setting passes the gate, `select` keeps the leading convolutions of the best one in FP32,
one more at a time (`float_prefix`), until it passes or a limit is reached: on the default model
the activation rounding of the first layers (input normalisation, stem, first blocks at full
resolution) did most of the damage, and the FP32 prefix costs little time or size.

Before quantising, `bias_correct` can remove the mean shift that rounding the weights to int8
puts on every convolution's output (bias correction, Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", section 4.2, with each convolution's input
means measured on the calibration images).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lib.io import atomic_path

CALIBRATIONS = ("MinMax", "Entropy", "Percentile")
CALIBRATION_CHUNK = 10  # images per calibration pass: bounds the histogram calibrators' memory


@dataclass(frozen=True)
class Setting:
    """One quantisation setting: activation type (S8 or U8; weights are always int8), 7-bit weights, calibration,
    and how many leading convolutions stay FP32 (`float_prefix`)."""

    activation: str
    reduce_range: bool
    calibration: str
    float_convs: int = 0

    @property
    def name(self) -> str:
        fp32 = f", first {self.float_convs} conv{'s' if self.float_convs > 1 else ''} FP32" if self.float_convs else ""
        return f"{self.activation}S8{' reduce_range' if self.reduce_range else ''} {self.calibration}{fp32}"


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


def rounded_weight(w: np.ndarray, reduce_range: bool = False) -> np.ndarray:
    """A convolution weight as ONNX Runtime's symmetric per-output-channel int8 quantisation leaves it (dequantised):
    integers up to 127 in magnitude, or 64 with reduce_range, times one scale per output channel."""
    qmax = 64 if reduce_range else 127
    absmax = np.abs(w).reshape(w.shape[0], -1).max(1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).reshape((-1,) + (1,) * (w.ndim - 1))
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(w.dtype)


def input_means(model, tensors: list[str], x: np.ndarray, batch_size: int = 10) -> dict:
    """Per-channel means of named intermediate tensors (N, C, ...) of an FP32 model (onnx.ModelProto,
    left as it is) over the images x, accumulated batch by batch (nothing but the running sums is kept)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as named
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    sums, count = {}, 0
    for i in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[i : i + batch_size], np.float32)
        for name, value in zip(tensors, session.run(tensors, {feed: batch})):
            axes = (0,) + tuple(range(2, value.ndim))
            sums[name] = sums.get(name, 0.0) + value.astype(np.float64).sum(axis=axes) / np.prod(value.shape[2:])
        count += len(batch)
    return {name: total / count for name, total in sums.items()}


def bias_correct(prepared: str | Path, calib_x: np.ndarray, targets: dict) -> dict:
    """For each {reduce_range: out} in `targets`, write to `out` the model with every convolution's
    bias corrected for its weights' int8 rounding (8-bit, or 7-bit with reduce_range).

    Rounding the weights W to Wq shifts a convolution's mean output by (Wq - W) . E[x]; subtracting
    that from the bias, with E[x] the per-channel input means over the calibration images (measured
    once, for every target), removes the shift (grouped and depthwise convolutions included; zero
    padding is ignored). Which weights ONNX Runtime will round, and how, is `rounded_weight`.
    Convolutions without a constant weight and bias are left as they are. Returns, per
    reduce_range, how many convolutions were corrected, of how many, and the mean absolute correction.
    """
    import onnx
    from onnx import numpy_helper

    if len(calib_x) == 0:
        raise ValueError("no calibration images")
    original = onnx.load(str(prepared))
    inits = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in original.graph.initializer}
    convs = [n for n in original.graph.node if n.op_type == "Conv"]
    fixable = [n for n in convs if len(n.input) > 2 and n.input[1] in inits and n.input[2] in inits]
    means = input_means(original, sorted({n.input[0] for n in fixable}), calib_x)
    done = {}
    for reduce_range, out in targets.items():
        model = onnx.ModelProto()
        model.CopyFrom(original)
        protos = {i.name: i for i in model.graph.initializer}
        shifts = []
        for node in fixable:
            w, b = inits[node.input[1]], inits[node.input[2]]
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            dw = (rounded_weight(w, reduce_range) - w).reshape(w.shape[0], w.shape[1], -1).sum(2)  # (Cout, Cin / groups)
            ex = means[node.input[0]].reshape(groups, w.shape[1])[np.arange(w.shape[0]) // (w.shape[0] // groups)]
            shift = (dw * ex).sum(1).astype(np.float32)
            protos[node.input[2]].CopyFrom(numpy_helper.from_array(b - shift, node.input[2]))
            shifts.append(np.abs(shift).mean())
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
        done[reduce_range] = {"corrected": len(fixable), "convolutions": len(convs),
                              "mean_abs_shift": float(np.mean(shifts)) if shifts else 0.0}
    return done


def classifier_nodes(model_path: str | Path) -> list[str]:
    """The last matrix product (the linear classifier) and every node after it that uses its result (a
    view-averaged model's softmax, mean and log): none of them is worth rounding to int8."""
    import onnx

    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    last = max((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), default=None)
    if last is None:
        return []
    tainted, names = set(nodes[last].output), [nodes[last].name]
    for n in nodes[last + 1:]:
        if tainted & set(n.input):
            tainted |= set(n.output)
            names.append(n.name)
    return names


def float_prefix(model_path: str | Path, n: int) -> list[str]:
    """The nodes that stay FP32 when the first n convolutions do: every node up to the n-th convolution
    (in the graph's topological order: the input normalisation, the stem, the first blocks) and the
    activation (Clip / Relu) that alone consumes its output, so that no int8 rounding falls between them."""
    import onnx

    if n < 0:
        raise ValueError(f"the number of FP32 convolutions must be 0 or more, got {n}")
    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    if n == 0:
        return []
    if n > len(convs):
        raise ValueError(f"{model_path}: {n} FP32 convolutions asked for, the graph has {len(convs)}")
    last = nodes[convs[n - 1]]
    names = [node.name for node in nodes[: convs[n - 1] + 1]]
    consumers = [node for node in nodes if last.output[0] in node.input]
    if len(consumers) == 1 and consumers[0].op_type in ("Clip", "Relu"):
        names.append(consumers[0].name)
    return names


def quantize(prepared: str | Path, out: str | Path, calib_x: np.ndarray, setting: Setting, *,
             cache_dir: str | Path | None = None) -> Path:
    """Quantise a pre-processed FP32 model to INT8 QDQ with per-channel weights; write it to `out`.

    The classifier stays FP32 (`classifier_nodes`; 10k weights for 8 classes): on the default model,
    quantising it too cost 7.9-9.5 points of test macro recall in every setting, keeping it 2.1-3.8.
    So do the setting's leading convolutions (`float_prefix`).

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
    # The histogram calibrators (Entropy, Percentile) keep every intermediate tensor of every image they
    # see: 100 images of EfficientNet-Lite0 at 160 px held 3.4 GiB. Fed in chunks (ONNX Runtime's
    # CalibStridedMinMax, which needs a chunk dividing the image count), they merge histograms per chunk.
    chunk = max(d for d in range(1, CALIBRATION_CHUNK + 1) if len(calib_x) % d == 0)
    with atomic_path(out) as tmp, contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress
        onnx_tmp = tmp.with_suffix(".onnx")
        try:
            quantize_static(
                str(prepared), str(onnx_tmp), _Batches(calib_x), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=setting.reduce_range,
                activation_type=QuantType.QInt8 if setting.activation == "S8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, setting.calibration),
                calibration_cache_path=str(cache) if cache else None,
                nodes_to_exclude=classifier_nodes(prepared) + float_prefix(prepared, setting.float_convs),
                extra_options={"CalibStridedMinMax": chunk},
            )
            onnx_tmp.replace(tmp)
        finally:
            onnx_tmp.unlink(missing_ok=True)
    return Path(out)


def decided(logits: np.ndarray, classes: list[str], clean_guard: float = 0.0, temperature: float = 1.0) -> np.ndarray:
    """The classes an exported model's logits decide, as `lib.predict` does: `lib.decision.decide` under
    `clean_guard` on the network's own softmax, softmax(logits x `temperature`) (the exported logits are
    already divided by the calibration temperature). Without a guard, the most probable class."""
    from scipy.special import softmax

    from lib.decision import decide

    logits = np.asarray(logits, np.float64)
    if not clean_guard:
        return logits.argmax(1)
    return decide(softmax(logits * temperature, axis=1), classes, clean_guard)


def scores(y_true: np.ndarray, logits: np.ndarray, classes: list[str], clean_guard: float = 0.0,
           temperature: float = 1.0) -> dict:
    """Accuracy, macro recall and miss rate (defect images predicted clean) of logits against labels,
    deciding as the bundle does (`decided`).

    None where a figure does not exist (no images; no `clean` class for the miss rate)."""
    from lib.metrics import defect_vs_clean, macro_recall

    pred = decided(logits, classes, clean_guard, temperature)
    return {"accuracy": float((pred == y_true).mean()) if len(y_true) else None,
            "macro_recall": macro_recall(y_true, pred, len(classes)) if len(y_true) else None,
            "miss_rate": defect_vs_clean(y_true, pred, classes)["miss_rate"]}


def fidelity(fp32_logits: np.ndarray, int8_logits: np.ndarray, classes: list[str] | None = None,
             clean_guard: float = 0.0, temperature: float = 1.0) -> dict:
    """How closely the INT8 model follows FP32: agreement of the classes decided (`decided`; without a
    guard, the argmax) and logit error."""
    agree = (decided(fp32_logits, classes or [], clean_guard, temperature)
             == decided(int8_logits, classes or [], clean_guard, temperature))
    diff = np.abs(fp32_logits - int8_logits)
    return {"agreement": float(agree.mean()) if len(agree) else 1.0, "disagreements": int((~agree).sum()),
            "mean_abs_logit_diff": float(diff.mean()) if diff.size else 0.0}


def losses(fp32: dict, int8: dict) -> dict:
    """INT8 against FP32 on one split: the macro-recall drop and the rise in miss rate (points as
    fractions; negative = INT8 did better; None when the figure does not exist)."""
    def diff(a, b):
        return None if a is None or b is None else a - b

    return {"macro_recall_drop": diff(fp32["macro_recall"], int8["macro_recall"]),
            "miss_rate_rise": diff(int8["miss_rate"], fp32["miss_rate"])}


def gate(loss: dict, *, max_recall_drop: float, max_miss_rise: float) -> dict:
    """Recall-first fitness of an INT8 model from its `losses` on the validation split: fit only when
    the macro-recall drop and the rise in miss rate both stay within their limits."""
    reasons = []
    drop, rise = loss["macro_recall_drop"], loss["miss_rate_rise"]
    if drop is not None and drop > max_recall_drop + 1e-9:
        reasons.append(f"macro recall drops by {100 * drop:.2f} points (limit {100 * max_recall_drop:.2f})")
    if rise is not None and rise > max_miss_rise + 1e-9:
        reasons.append(f"miss rate rises by {100 * rise:.2f} points (limit {100 * max_miss_rise:.2f})")
    return {"fit": not reasons, "reasons": reasons, "max_recall_drop": max_recall_drop, "max_miss_rise": max_miss_rise,
            **loss}


def search(prepared: str | Path | dict, calib_x: np.ndarray, settings: list[Setting], evaluate, *,
           work_dir: str | Path | None = None, then=None):
    """Quantise with every setting and score each with `evaluate(path) -> dict` (flat).

    `prepared` is the pre-processed FP32 model, or {reduce_range: model} when the model to quantise
    depends on it (`bias_correct`). `then(rows) -> Setting | None`, when given, is asked for one more
    setting each time the list runs out (the rows so far in hand), and the search ends at None.
    Returns (table rows as dicts, {setting name: model path}); models stay in work_dir.
    """
    work = Path(work_dir or tempfile.mkdtemp(prefix="quant."))
    models = prepared if isinstance(prepared, dict) else {False: prepared, True: prepared}
    rows, paths, queue = [], {}, list(settings)
    # Calibration ranges are shared by the settings of one search only: they belong to this model.
    with tempfile.TemporaryDirectory(prefix=".ranges-", dir=work) as ranges:
        while queue:
            s = queue.pop(0)
            path = quantize(models[s.reduce_range], work / f"variant_{len(rows):02d}.onnx", calib_x, s, cache_dir=ranges)
            rows.append({"setting": s.name, **asdict(s), **evaluate(path)})
            paths[s.name] = path
            if not queue and then is not None and (more := then(rows)) is not None:
                queue.append(more)
    return rows, paths


def escalate(max_float_convs: int):
    """`search`'s `then` for the FP32 prefix: while no setting is within the gate's limits (`fit`), the best
    setting without an FP32 prefix (`choose`) again with one more leading convolution in FP32, up to
    `max_float_convs`; None once a setting is fit or the limit is reached."""
    import pandas as pd

    def then(rows):
        table = pd.DataFrame(rows).set_index("setting")
        done = int(table["float_convs"].max())
        if table["fit"].any() or done >= max_float_convs:
            return None
        plain = table[table["float_convs"] == 0]
        best = plain.loc[choose(plain)]
        return Setting(best["activation"], bool(best["reduce_range"]), best["calibration"], done + 1)

    return then


def choose(table, drop_col: str = "macro_recall_drop", agree_col: str = "agreement",
           speed_col: str | None = "batch1_p50_ms", err_col: str = "mean_abs_logit_diff",
           fit_col: str | None = "fit", miss_col: str | None = "miss_rate_rise"):
    """The setting that loses least, recall first: settings within the gate's limits before the
    others, then the smallest rise in miss rate, then the smallest macro-recall drop (a gain counts
    as no loss, since on a small split a gain is luck), then the highest argmax agreement with FP32,
    then the smallest logit error to three decimals (S8S8 and U8S8 with the same ranges can differ
    in the fifth); the measured speed (when `speed_col` is given) breaks only the remaining ties,
    between settings that are equal in every figure that judges them.
    Returns the chosen row's index label."""
    def col(name):
        return np.asarray(table[name].astype(float).fillna(0.0), dtype=float)

    keys = []
    if fit_col is not None and fit_col in table:
        keys.append(~np.asarray(table[fit_col], dtype=bool))
    if miss_col is not None and miss_col in table:
        keys.append(np.clip(col(miss_col), 0, None).round(9))
    keys += [np.clip(col(drop_col), 0, None).round(9), -col(agree_col).round(9), col(err_col).round(3)]
    if speed_col is not None:
        keys.append(col(speed_col))
    order = np.lexsort(tuple(np.asarray(k, dtype=float) for k in reversed(keys)))
    return table.index[order[0]]


def select(fp32_path: str | Path, calib_x: np.ndarray, settings: list[Setting], *, x_val: np.ndarray,
           y_val: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, classes: list[str], max_recall_drop: float,
           max_miss_rise: float, work_dir: str | Path, threads: int = 0, latency_runs: int = 20,
           bias_correction: bool = True, max_float_convs: int = 0, clean_guard: float = 0.0,
           temperature: float = 1.0):
    """Quantise the FP32 model with every setting, judge each on the validation split, keep the best.

    When no setting is within the gate's limits, the best one is tried again with its first 1, 2, ...
    convolutions in FP32 (`escalate`), up to `max_float_convs`, until one is.

    With `bias_correction`, each setting quantises the model whose biases `bias_correct` fitted to
    its weight rounding (8- or 7-bit); a calibration method's activation ranges are measured once,
    on the first setting's model, and serve the others.

    Each setting is scored against the FP32 model on validation (macro-recall drop, rise in miss
    rate, whether both are within the gate's limits, argmax agreement, logit error) and on test (the
    same, for the report only), with a quick batch-1 latency; decisions under `clean_guard` at the
    folded `temperature` (`decided`). `choose` picks on the validation
    columns. Returns (table indexed by setting, the kept setting's name, {setting: model path},
    {reduce_range: what `bias_correct` did} or {} without bias correction).
    """
    import pandas as pd

    from lib import benchmark, runtime

    from lib.io import claim

    work = claim(work_dir, "quantisation work")
    fp32 = runtime.session(fp32_path, threads)
    fp32_val, fp32_test = runtime.run(fp32, x_val), runtime.run(fp32, x_test)
    rule = {"clean_guard": clean_guard, "temperature": temperature}
    base_val, base_test = scores(y_val, fp32_val, classes, **rule), scores(y_test, fp32_test, classes, **rule)
    prepared = preprocess(fp32_path, work / "model.prep.onnx")
    models, corrections = prepared, {}
    if bias_correction:
        models = {rr: work / f"model.prep.bias{'7' if rr else '8'}.onnx" for rr in sorted({s.reduce_range for s in settings})}
        corrections = bias_correct(prepared, calib_x, models)

    def evaluate(path: Path) -> dict:
        s = runtime.session(path, threads)
        on_val, on_test = runtime.run(s, x_val), runtime.run(s, x_test)
        on_val_scores = scores(y_val, on_val, classes, **rule)
        val_loss = losses(base_val, on_val_scores)
        test_loss = losses(base_test, scores(y_test, on_test, classes, **rule))
        verdict = gate(val_loss, max_recall_drop=max_recall_drop, max_miss_rise=max_miss_rise)
        f_val, f_test = fidelity(fp32_val, on_val, classes, **rule), fidelity(fp32_test, on_test, classes, **rule)
        quick = benchmark.latency({"int8": benchmark.ort_engine(s)}, {1: x_test[:1]}, runs=max(5, latency_runs // 5))
        return {"macro_recall": on_val_scores["macro_recall"], **val_loss, "fit": verdict["fit"],
                "agreement": f_val["agreement"], "mean_abs_logit_diff": f_val["mean_abs_logit_diff"],
                "test_macro_recall_drop": test_loss["macro_recall_drop"], "test_miss_rate_rise": test_loss["miss_rate_rise"],
                "test_agreement": f_test["agreement"], "batch1_p50_ms": quick[0]["p50_ms"]}

    rows, variants = search(models, calib_x, settings, evaluate, work_dir=work, then=escalate(max_float_convs))
    table = pd.DataFrame(rows).set_index("setting")
    return table, choose(table), variants, corrections


def correction_note(corrections: dict) -> str:
    """One sentence on the bias correction of a search, for the export report."""
    if not corrections:
        return "Biases not corrected (`int8_bias_correction: false`)."
    c = corrections[min(corrections)]
    return (f"Before quantising, the biases of {c['corrected']} of {c['convolutions']} convolutions were corrected for "
            f"their weights' int8 rounding (mean absolute shift {c['mean_abs_shift']:.2g}; `bias_correct`).")


# How the selection table's columns read in the export report.
COLUMN_NAMES = {"float_convs": "leading convs in FP32", "macro_recall": "val macro recall",
                "macro_recall_drop": "val macro-recall drop", "miss_rate_rise": "val miss-rate rise",
                "fit": "within limits", "agreement": "val agreement with FP32",
                "mean_abs_logit_diff": "val mean abs logit diff", "test_macro_recall_drop": "test macro-recall drop",
                "test_miss_rate_rise": "test miss-rate rise", "test_agreement": "test agreement with FP32",
                "batch1_p50_ms": "batch-1 p50 (ms)"}


def points(v: float | None) -> str:
    """A fraction as signed points (0.0125 -> +1.25), or n/a."""
    return "n/a" if v is None else f"{100 * v:+.2f}"


def loss_table(verdict: dict, test_loss: dict):
    """INT8's macro-recall drop and miss-rate rise on validation (with the limits that decide) and on test."""
    import pandas as pd

    return pd.DataFrame({
        "macro-recall drop (points)": [points(verdict["macro_recall_drop"]), points(test_loss["macro_recall_drop"])],
        "miss-rate rise (points)": [points(verdict["miss_rate_rise"]), points(test_loss["miss_rate_rise"])],
        "limits": [f"{100 * verdict['max_recall_drop']:.2f} / {100 * verdict['max_miss_rise']:.2f}", "(reported only)"]},
        index=["val (decides)", "test"])


def judge(fp32_logits: dict, int8_logits: dict, y: dict, classes: list[str], *, max_recall_drop: float,
          max_miss_rise: float, clean_guard: float = 0.0, temperature: float = 1.0):
    """The kept INT8 model against FP32, recall first: figures on validation (where the gate decides) and
    on test (reported only). `fp32_logits`, `int8_logits` and `y` map "val" and "test" to logits / labels.

    Returns (table of accuracy, macro recall, miss rate and agreement per model and split, the gate's
    verdict on validation (`gate`), the losses on test). Decisions under `clean_guard` at the folded
    `temperature` (`decided`)."""
    import pandas as pd

    figures, agreement = {}, {}
    for split in ("val", "test"):
        rule = {"clean_guard": clean_guard, "temperature": temperature}
        figures[("FP32 (model.onnx)", split)] = scores(y[split], fp32_logits[split], classes, **rule)
        figures[("INT8 (model.int8.onnx)", split)] = scores(y[split], int8_logits[split], classes, **rule)
        agreement[split] = fidelity(fp32_logits[split], int8_logits[split], classes, **rule)
    table = pd.DataFrame(figures).T.rename_axis(["model", "split"])
    table["agreement with FP32"] = [1.0, agreement["val"]["agreement"], 1.0, agreement["test"]["agreement"]]
    verdict = gate(losses(figures[("FP32 (model.onnx)", "val")], figures[("INT8 (model.int8.onnx)", "val")]),
                   max_recall_drop=max_recall_drop, max_miss_rise=max_miss_rise)
    verdict |= {"validation": figures[("INT8 (model.int8.onnx)", "val")], "test": figures[("INT8 (model.int8.onnx)", "test")],
                "validation_agreement": agreement["val"], "agreement": agreement["test"]}
    test_loss = losses(figures[("FP32 (model.onnx)", "test")], figures[("INT8 (model.int8.onnx)", "test")])
    return table, verdict, test_loss


def escalation_note(table) -> str:
    """What the FP32-prefix rows of a `select` table are, for the export report ("" when there are none)."""
    n = int(table["float_convs"].max())
    if n == 0:
        return ""
    firsts = "the first convolution" if n == 1 else f"the first 1 to {n} convolutions"
    return f" (and {n} more with {firsts} in FP32: none of the plain ones was within the limits)"
