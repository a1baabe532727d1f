"""Latency, throughput, size and compute of a model in each of its forms, measured side by side.

Engines (PyTorch eager FP32, ONNX Runtime FP32, ONNX Runtime INT8) are timed on the same
inputs in one run, taking turns in blocks of calls, so a change of machine load during the run
falls on all of them alike. The load average is recorded before and after:
on a shared machine it says how far the figures can be trusted.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    """What the figures were measured on."""
    import onnxruntime as ort
    import torch

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "torch_threads": torch.get_num_threads(),
            "onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()]}


def threads_to_use(threads: int) -> int:
    """0 means every core the process may run on."""
    if threads < 0:
        raise ValueError(f"threads must be 0 (all cores) or positive, got {threads}")
    return threads or len(os.sched_getaffinity(0))


def latency(engines: dict[str, Callable[[np.ndarray], object]], inputs: dict[int, np.ndarray], *, runs: int = 50,
            warmup: int = 5, blocks: int = 5) -> list[dict]:
    """Time every engine on every input batch: `runs` timed calls each, after warm-up.

    The runs are split into `blocks`; the engines take turns block by block (each block opens
    with one untimed call), so a change of machine load during the run falls on every engine,
    while calls within a block run back to back, as they do in use (ONNX Runtime's threads
    spin for a while after a call; interleaving single calls would charge that to the next
    engine). Returns one row per (engine, batch): p50 / p95 / mean latency in ms and images
    per second (batch size over the p50 latency).
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    blocks = max(1, min(blocks, runs))
    rows = []
    for batch, x in inputs.items():
        for fn in engines.values():
            for _ in range(warmup):
                fn(x)
        times = {name: [] for name in engines}
        for b in range(blocks):
            n = runs // blocks + (b < runs % blocks)
            for name, fn in engines.items():
                fn(x)
                for _ in range(n):
                    t = time.perf_counter()
                    fn(x)
                    times[name].append((time.perf_counter() - t) * 1000)
        for name, ms in times.items():
            ms = np.asarray(ms)
            p50 = float(np.percentile(ms, 50))
            rows.append({"engine": name, "batch": int(batch), "runs": runs, "p50_ms": p50,
                         "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
                         "images_per_s": float(batch * 1000 / p50)})
    return rows


def torch_engine(model, threads: int):
    """A callable running the PyTorch model eagerly (FP32, inference mode) with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    model = model.eval().cpu()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def ort_engine(sess):
    def run(x: np.ndarray):
        return sess.run(["logits"], {"input": x})

    return run


def compute(model, size: int) -> dict:
    """Parameter count and multiply-adds of one image, counted by torch's FlopCounterMode
    (a multiply-add is two FLOPs for convolutions and linear layers)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval().cpu()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size))
    flops = counter.get_total_flops()
    return {"parameters": int(sum(p.numel() for p in model.parameters())), "macs": int(flops // 2),
            "flops": int(flops), "input": [1, 3, size, size]}


def sizes(files: dict[str, str | Path]) -> dict[str, int]:
    """Bytes on disk of each named file."""
    return {name: Path(f).stat().st_size for name, f in files.items()}


def pareto_front(cost, value) -> np.ndarray:
    """Boolean mask of the points no other point beats: none costs no more and scores at least as
    well while being strictly better in one of the two (lower cost is better, higher value is better)."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    keep = np.ones(len(cost), bool)
    for i in range(len(cost)):
        better = (cost <= cost[i]) & (value >= value[i]) & ((cost < cost[i]) | (value > value[i]))
        keep[i] = not better.any()
    return keep
