"""ONNX export with gates (explicit exporter, dynamic batch, full checker, parity with PyTorch) and the
bundle's descriptive files (labels, bundle.json manifest, model card)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from lib.io import atomic_path, file_digest, write_json_atomic


def export_onnx(model: torch.nn.Module, path: str | Path, *, size: int, opset: int = 18) -> Path:
    """Export `model` to one self-contained ONNX file with the torch.export-based exporter.

    Input `input` float32 [batch, 3, size, size] with a dynamic batch axis; output `logits`.
    The file is checked with onnx.checker (full check) before it replaces `path`.
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be 17 or newer, got {opset}")
    model = model.eval().cpu()
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx_path = tmp.with_suffix(".onnx")
        try:
            torch.onnx.export(
                model, (example,), str(onnx_path), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes={"x": {0: batch}}, opset_version=opset, external_data=False, optimize=True,
            )
            proto = onnx.load(str(onnx_path))
            onnx.checker.check_model(proto, full_check=True)
            onnx_path.replace(tmp)
        finally:
            onnx_path.unlink(missing_ok=True)
    return path


class ExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch model; the message says on how many images."""


def graph_summary(path: str | Path):
    """The exported graph at a glance: file size, opset, input and output signatures, node count."""
    import onnx
    import pandas as pd

    proto = onnx.load(str(path))

    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    return pd.DataFrame({
        "file": [Path(path).name], "bytes": [Path(path).stat().st_size], "opset": [proto.opset_import[0].version],
        "input": [f"{proto.graph.input[0].name} {dims(proto.graph.input[0])}"],
        "output": [f"{proto.graph.output[0].name} {dims(proto.graph.output[0])}"],
        "nodes": [len(proto.graph.node)], "onnx.checker": ["passed (full_check=True)"],
    }).T.rename(columns={0: ""})


def check_parity(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> dict:
    """`parity`, raising ExportError unless ONNX Runtime picks the same class as PyTorch on every image."""
    par = parity(torch_logits, onnx_logits)
    if par["argmax_agreement"] < 1.0:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch on {par['disagreements']} of {par['images']} images")
    return par


def parity(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> dict:
    """How closely ONNX Runtime reproduces PyTorch on the same inputs."""
    diff = np.abs(torch_logits - onnx_logits)
    agree = torch_logits.argmax(1) == onnx_logits.argmax(1)
    return {"images": int(len(diff)), "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
            "argmax_agreement": float(agree.mean()) if len(agree) else 1.0,
            "disagreements": int((~agree).sum())}


def write_labels(folder: str | Path, classes: list[str]) -> dict[str, Path]:
    """labels.json (index -> class) and a fitted scikit-learn LabelEncoder pickle.

    LabelEncoder sorts its classes, so the network's output order is the encoder's order:
    classes are written here in the encoder's (sorted) order, and training uses the same.
    """
    from sklearn.preprocessing import LabelEncoder

    enc = LabelEncoder().fit(classes)
    if list(enc.classes_) != list(classes):
        raise ValueError(f"class order {classes} differs from LabelEncoder order {list(enc.classes_)}")
    folder = Path(folder)
    labels = write_json_atomic(folder / "labels.json", list(classes))
    with atomic_path(folder / "label_encoder.pkl") as tmp:
        tmp.write_bytes(pickle.dumps(enc))
    return {"labels": labels, "encoder": folder / "label_encoder.pkl"}


def markdown_table(df) -> str:
    """A pandas DataFrame as a GitHub Markdown table (index included), floats to 4 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    frame = df.reset_index()
    head = "| " + " | ".join(map(cell, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_bundle(folder: str | Path, *, labels: list[str], spec: dict, summary: dict, card: str,
                 review_threshold: float, int8_fit: bool, extra: dict) -> Path:
    """Everything beside the two models: labels.json (and the LabelEncoder pickle), preprocessing.json,
    export.json, model_card.md, then bundle.json, which lists them all with their digests."""
    from lib.io import write_text_atomic

    folder = Path(folder)
    write_labels(folder, labels)
    write_json_atomic(folder / "preprocessing.json", spec)
    write_json_atomic(folder / "export.json", summary)
    write_text_atomic(folder / "model_card.md", card)
    return write_bundle_manifest(folder, review_threshold=review_threshold, int8_fit=int8_fit, extra=extra)


def write_bundle_manifest(folder: str | Path, *, review_threshold: float, int8_fit: bool, extra: dict | None = None) -> Path:
    """bundle.json: every file of the bundle with its size and sha256, the default review threshold
    and whether the INT8 model is fit for use (read by lib.predict, which checks the digests)."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name != "bundle.json"}
    manifest = {"review_threshold": review_threshold, "int8_fit": int8_fit, "files": files, **(extra or {})}
    return write_json_atomic(folder / "bundle.json", manifest)


def _card_confidence(ev: dict) -> str:
    """The model card's test intervals, calibration and operating point, from eval/metrics.json."""
    from lib.calibration import fmt

    n = ev.get("test_images", 0)
    rows = "\n".join(f"| {r['figure']} | {fmt(r['value'], r['low'], r['high'], n)} |" for r in ev.get("intervals", []))
    v, t = ev["operating_point"]["validation"], ev["operating_point"]["test"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    ece = ev["ece"]
    k = v.get("extra_errors", 0)
    margin = f" (counting {k} more wrong image{'s' if k > 1 else ''} than validation shows)" if k else ""
    calibrated = (f"Confidences are calibrated: temperature T = {ev['temperature']:.3f}, fitted on the validation split, "
                  f"is folded into the classifier." if ev.get("temperature_fitted", True) else
                  f"Confidences are **not** calibrated (T = 1): {ev.get('temperature_note', '')}.")
    guard = float(ev.get("clean_guard", 0.0))
    decision = (f"`clean` is called only when the network's own softmax (the logits times the temperature) gives it at "
                f"least **{guard:g}** (`clean_guard` in `bundle.json`, applied by `lib.predict`); below that the most "
                f"probable defect class is called, so a defect the model thinks only probably clean is not let through. "
                f"The figures below use this rule." if guard > 0 else "the most probable class (no `clean` guard).")
    return f"""
### Test split ({n} images), FP32, with 95% intervals (bootstrap; Wilson where a count never varies)
Decision: {decision}

| figure | value [95% interval] |
|---|---|
{rows}

### Confidence and review
- {calibrated} Test ECE {ece['before']['test']:.3f} before, {ece['after']['test']:.3f} after.
- Review threshold (in `bundle.json`, used by `lib.predict`): **{v['threshold']:.4f}**, the lowest calibrated
  confidence at which the auto-classified validation images reach accuracy {v['target_accuracy']}{margin} with a miss
  rate of at most {v['max_miss_rate']} ({'met' if v['met'] else 'NOT met: every image goes to review'}), chosen with the FP32
  model; `model.int8.onnx` uses the same threshold.
- At that threshold on test: {t['auto']} of {t['images']} images auto-classified (coverage {pct(t['coverage'])}),
  accuracy {pct(t['auto_accuracy'])} among them ({t['auto_errors']} errors), miss rate
  {pct(t.get('auto_miss_rate'))} ({t.get('auto_missed', 0)} of {t.get('auto_defects', 0)} auto-classified defect images).
"""


def model_card(*, title: str, date: str, dataset: dict, params: dict, trained_with: dict, weights: dict,
               classes: list[str], metrics, int8: dict, latency, compute: dict, sizes: dict, machine: dict,
               evaluated: dict | None = None) -> str:
    """The bundle's model card (Markdown): what the model is, what it was trained on, how well it does
    and how fast it runs, with the date and every parameter of the run. `metrics` and `latency` are
    DataFrames; `params` is the export run's full resolved set, `trained_with` the checkpoint's;
    `evaluated` the evaluation stage's record (intervals, calibration, operating point)."""
    fp = dataset.get("fingerprint", {})
    confidence = _card_confidence(evaluated) if evaluated else ""

    def points(v):
        return "n/a" if v is None else f"{100 * v:.2f}"

    bc = int8.get("bias_correction")
    bias_note = (f"; biases of {bc['corrected']} of {bc['convolutions']} convolutions corrected for the weights' rounding"
                 if bc else "")
    verdict = ("fit for use" if int8["fit"] else "**NOT FIT for use** (" + "; ".join(int8["reasons"]) +
               "); deploy model.onnx (FP32) instead")
    param_rows = "\n".join(f"| `{k}` | `{params[k]}` |" for k in sorted(params))
    differ = sorted(k for k in trained_with if k in params and trained_with[k] != params[k])
    differ_note = ("" if not differ else "\n\nThe checkpoint was trained with other values of: " +
                   ", ".join(f"`{k}` = `{trained_with[k]}`" for k in differ) + " (keys the training stage does not read).")
    size_rows = "\n".join(f"| {k} | {v / 1e6:.2f} MB |" for k, v in sizes.items())
    source = ("the embedded synthetic SEM dataset, rendered by lib/synthetic.py" if dataset.get("synthetic")
              else "user data")
    views = (evaluated or {}).get("test_views", 1)
    views_note = ("" if views == 1 else f" The graph scores each image as {views} views (mirror images"
                  f"{' and quarter turns' if views == 8 else ' and the half turn'}) in one batch and outputs the log of "
                  f"their averaged softmax probabilities (`test_views`), so it costs {views} network passes per image.")
    return f"""# {title}

Date: {date}

## Model
- Architecture: `{trained_with.get('arch')}` (width {trained_with.get('width')}); input `input`, float32
  [N, 3, {trained_with.get('image_size')}, {trained_with.get('image_size')}]; output `logits` [N, {len(classes)}], already divided by the calibration temperature (softmax gives the calibrated confidence).{views_note}
- Classes, in output order: {', '.join(f'`{c}`' for c in classes)} (`labels.json`; `label_encoder.pkl` only for
  older scripts that unpickle it).
- Preprocessing: `preprocessing.json` (the definition in `lib/preprocess.py`; `python -m lib.predict` applies it).
- Parameters: {compute['parameters']:,}; multiply-adds per image (all its views): {compute['macs'] / 1e6:.1f} M (counted by
  torch's FlopCounterMode).
- Initial weights: `{weights.get('source')}`: {weights.get('detail')}{f" (sha256 {weights['sha256']})" if weights.get('sha256') else ''}

## Files
| file | size |
|---|---|
{size_rows}

`model.int8.onnx`: static INT8 (ONNX Runtime QDQ, per-channel weights{bias_note}), setting `{int8['setting']}`,
calibrated on {int8['calibration_images']} training images, chosen on the {int8['chosen_on']} split. On that split its
macro recall drops by {points(int8['macro_recall_drop'])} points (limit {points(int8['max_recall_drop'])}) and its miss
rate rises by {points(int8['miss_rate_rise'])} points (limit {points(int8['max_miss_rise'])}): the INT8 model is {verdict}.

## Data
- Dataset: {source} in `{dataset.get('root', dataset.get('data_dir'))}`, {fp.get('files', '?')} files, fingerprint sha256
  `{fp.get('sha256', '?')}` (relative path, size and mtime of every file).

## Metrics
FP32 and INT8 on the validation and test splits (one image moves these figures by 1/N: read them with the intervals
below):

{markdown_table(metrics)}
{confidence}
## Latency (ms per call; images/s from the p50)
{markdown_table(latency)}

Measured on {machine.get('cpu')} ({machine.get('cpu_count')} cores), {machine.get('threads')} threads, onnxruntime
{machine.get('onnxruntime')}, torch {machine.get('torch')}; load average (1, 5, 15 min) before
{machine.get('load_average_before')} and after {machine.get('load_average_after')}: figures taken while other work
runs on the machine are slower than on an idle one.

## Parameters of the run
Every parameter as resolved for this run (`params/base.yaml`, the overlays and command-line settings); the same
set is in `params.json`, which works as a parameter file to run it again.{differ_note}

| key | value |
|---|---|
{param_rows}
"""
