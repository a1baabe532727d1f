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
    """0 means what the environment allows: OMP_NUM_THREADS when it is set (the count PyTorch itself takes),
    else every core the process may run on. More threads than free cores is not merely slower: on 2 cores,
    one of them busy, MobileNetV2's PyTorch forward pass took 1.6 s with 2 threads against 12 ms with 1."""
    if threads < 0:
        raise ValueError(f"threads must be 0 (OMP_NUM_THREADS when set, else every core) or positive, got {threads}")
    if threads:
        return threads
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not given:
        return len(os.sched_getaffinity(0))
    first = given.split(",")[0].strip()  # a list gives the count per nesting level; the first is the outer one
    if not first.isdigit() or int(first) < 1:
        raise ValueError(f"OMP_NUM_THREADS={given!r} in the environment: expected a positive whole number of threads")
    return int(first)


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


ENGINES = ("PyTorch eager FP32", "ONNX Runtime FP32", "ONNX Runtime INT8")


def side_by_side(model, fp32_session, int8_session, x: np.ndarray, *, threads: int, runs: int) -> tuple[list[dict], dict]:
    """Latency of PyTorch eager FP32, ONNX Runtime FP32 and INT8 on the same images in one run:
    batch 1 (the first image) and batch 8 (the first eight, repeated when fewer), with the machine
    and its load average before and after. Returns (rows of `latency`, machine)."""
    engines = dict(zip(ENGINES, (torch_engine(model, threads), ort_engine(fp32_session), ort_engine(int8_session))))
    inputs = {1: x[:1], 8: x[np.arange(8) % len(x)]}
    before = [round(v, 2) for v in os.getloadavg()]
    rows = latency(engines, inputs, runs=runs, warmup=max(3, runs // 10))
    info = machine(threads) | {"load_average_before": before}
    info["load_average_after"] = info.pop("load_average_1_5_15")
    return rows, info


def ratios(rows: list[dict]) -> dict:
    """INT8 batch-1 latency as a fraction of ONNX Runtime FP32's and of PyTorch eager's."""
    p50 = {(r["engine"], r["batch"]): r["p50_ms"] for r in rows}
    return {"INT8 / ORT FP32, batch 1": p50[ENGINES[2], 1] / p50[ENGINES[1], 1],
            "INT8 / PyTorch eager, batch 1": p50[ENGINES[2], 1] / p50[ENGINES[0], 1]}


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


def sweep_table(sweep_dir: str | Path):
    """Every finished width under sweep_dir (w<width>/eval and export) as two models, FP32 and INT8:
    test macro recall, miss rate, size, batch-1 latency, batch-8 throughput, whether INT8 is fit.
    Returns (table indexed by model, unfinished width folders). Raises FileNotFoundError when none finished."""
    import pandas as pd

    from lib.io import read_json

    sweep_dir = Path(sweep_dir)
    rows, missing = [], []
    for folder in sorted(sweep_dir.glob("w*"), key=lambda p: -float(p.name[1:])):
        exp_file, met_file = folder / "export" / "export.json", folder / "eval" / "metrics.json"
        if not (exp_file.is_file() and met_file.is_file()):
            missing.append(folder.name)
            continue
        e, m = read_json(exp_file), read_json(met_file)
        p50 = {(r["engine"], r["batch"]): r["p50_ms"] for r in e["latency"]}
        common = {"width": e["width"], "parameters": e["compute"]["parameters"], "MMACs": e["compute"]["macs"] / 1e6,
                  "load average": e["machine"]["load_average_before"][0]}
        for fmt, engine, recall, miss, size, fit in (
                ("FP32", ENGINES[1], m["macro_recall"], m["miss_rate"], e["bytes"], True),
                ("INT8", ENGINES[2], e["int8"]["test"]["macro_recall"], e["int8"]["test"]["miss_rate"],
                 e["int8"]["bytes"], e["int8"]["fit"])):
            rows.append(common | {"format": fmt, "test macro recall": recall, "miss rate": miss, "size MB": size / 1e6,
                                  "batch-1 p50 ms": p50[(engine, 1)], "batch-8 images/s": 8000 / p50[(engine, 8)],
                                  "fit": fit})
    if not rows:
        raise FileNotFoundError(f"no finished width under {sweep_dir} (run `make sweep` first)")
    table = pd.DataFrame(rows)
    table["model"] = [f"w{w} {f}" for w, f in zip(table["width"], table["format"])]
    return table.set_index("model"), missing


def smallest_for_targets(table, targets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95)):
    """For each macro-recall target, the smallest and the fastest usable model that reaches it."""
    import pandas as pd

    usable = table[table["fit"]]
    rows = []
    for t in sorted({round(v, 2) for v in targets}):
        ok = usable[usable["test macro recall"] >= t]
        rows.append({"macro recall target": t,
                     "smallest file": ok["size MB"].idxmin() if len(ok) else "none reaches it",
                     "fastest (batch 1)": ok["batch-1 p50 ms"].idxmin() if len(ok) else "none reaches it"})
    return pd.DataFrame(rows).set_index("macro recall target")


def frontiers(table) -> dict[str, list[str]]:
    """The usable models no other beats on macro recall and on batch-1 latency, and on size."""
    usable = table[table["fit"]]
    return {col: usable[pareto_front(usable[col], usable["test macro recall"])].sort_values(col).index.tolist()
            for col in ("batch-1 p50 ms", "size MB")}
