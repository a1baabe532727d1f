"""ONNX Runtime: one way to open a model and run it, shared by export checks, INT8 selection, the
latency benchmark and `lib.predict`. Imports no torch, so an edge device needs only onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for the model at path (`threads` intra-op threads; 0 or None: its default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run(sess, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for input x [N, 3, H, W], in batches."""
    outs = [sess.run(["logits"], {"input": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
