"""ONNX export with gates: explicit exporter, dynamic batch, full checker, parity with PyTorch."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from lib.io import atomic_path, write_text_atomic


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


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for the model at path."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for input x [N, 3, H, W], in batches."""
    outs = [sess.run(["logits"], {"input": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


@torch.inference_mode()
def run_torch(model: torch.nn.Module, x: np.ndarray, batch_size: int = 64, device="cpu") -> np.ndarray:
    """Logits of a PyTorch model for input x [N, 3, H, W], in batches, on `device`."""
    model = model.eval().to(device)
    outs = [model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu().numpy()
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def parity(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> dict:
    """How closely ONNX Runtime reproduces PyTorch on the same inputs."""
    diff = np.abs(torch_logits - onnx_logits)
    agree = torch_logits.argmax(1) == onnx_logits.argmax(1)
    return {"images": int(len(diff)), "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
            "argmax_agreement": float(agree.mean()) if len(agree) else 1.0,
            "disagreements": int((~agree).sum())}


def latency(sess, x1: np.ndarray, runs: int = 50, warmup: int = 10) -> dict:
    """Batch-1 latency of an ONNX Runtime session (ms): warm-up, then p50/p95 over `runs`."""
    for _ in range(warmup):
        sess.run(["logits"], {"input": x1})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(["logits"], {"input": x1})
        times.append((time.perf_counter() - t) * 1000)
    t = np.asarray(times)
    return {"runs": runs, "p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95)),
            "mean_ms": float(t.mean()), "images_per_s": float(1000 / np.percentile(t, 50))}


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
    labels = write_text_atomic(folder / "labels.json", json.dumps(list(classes), indent=2) + "\n")
    with atomic_path(folder / "label_encoder.pkl") as tmp:
        tmp.write_bytes(pickle.dumps(enc))
    return {"labels": labels, "encoder": folder / "label_encoder.pkl"}
