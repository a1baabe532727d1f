"""Benchmark: where the training stage's time goes, and what each speed-up buys.

    .venv/bin/python tests/benchmarks/bench_training.py [--images 256] [--out build/bench/training.json]

On synthetic-like 224-px images decoded to the base parameters' input size, times (images per
second, the median of three timed passes after a warm-up):

- augmentation alone (the train preset on decoded grayscale images), one process;
- a whole-network training step (forward, backward, AdamW) of EfficientNet-Lite0 and MobileNetV2 at
  the base input size, with 1 and 2 threads, with and without channels_last, and compiled with
  torch.compile where it runs on this CPU;
- EfficientNet-Lite0 inference (eval mode, batch 32, channels_last, 2 threads), what evaluation,
  calibration and cross-validation run most;
- the `partial` recipe: caching the frozen trunk's activations (per view) and one training step of
  the top blocks on them, at the base freeze_blocks; then its training loop as the engine runs it
  (loader + step), with the activations in memory and on disk (`lib.cache`, the default since
  datasets may outgrow memory), and the loader alone.

`--partial-only` skips the whole-network rows (minutes).

Prints a table and writes it as JSON; the README quotes it. Figures taken while other work runs on
the machine are lower bounds: the load average is printed with them. So are the glibc malloc settings
in the environment (`make bench` runs under the Makefile's, which keep the heap) and the share of CPU
time spent in the kernel: run the script directly with `MALLOC_MMAP_MAX_=65536` (glibc's default) to
see what they buy on a machine where a page fault is dear.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import sem_like  # noqa: E402

from lib import engine, model as net, params, presets, recipes  # noqa: E402
from lib.io import claim, write_json_atomic  # noqa: E402
from lib.preprocess import fit_square, normalize  # noqa: E402


def rate(fn, n_images: int, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def step_fn(model, x, y, batch: int, fitted=None):
    fitted = fitted or model
    opt = torch.optim.AdamW([p for p in fitted.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def run():
        fitted.train()
        for i in range(0, len(x), batch):
            loss = loss_fn(fitted(x[i : i + batch]), y[i : i + batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def loop_fn(top, loader):
    """One epoch of the engine's loop over `loader`: batches to channels_last, forward, backward, AdamW."""
    opt = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def run():
        top.train()
        for xb, yb in loader:
            loss = loss_fn(top(xb.contiguous(memory_format=torch.channels_last)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "training.json"))
    ap.add_argument("--partial-only", action="store_true", help="only the partial recipe's rows")
    args = ap.parse_args()
    P = params.read_file(params.BASE)
    size, batch, n = P["image_size"], P["batch_size"], args.images
    gray = np.stack([fit_square(sem_like(i, 224).astype(np.float32) / 255, size) for i in range(n)])[:, None]
    y = torch.from_numpy(np.arange(n) % 8)
    rows = []
    augment = presets.augmentation(P)
    t = torch.from_numpy(gray)
    rows.append({"what": "augmentation (train preset), 1 process", "images/s": rate(lambda: [augment(g) for g in t], n)})
    x = normalize(t)
    for arch in () if args.partial_only else ("efficientnet_lite0", "mobilenet_v2"):
        for threads in (1, 2):
            for channels_last in (False, True):
                torch.set_num_threads(threads)
                model = net.build_model(8, arch=arch, image_size=size)
                xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                rows.append({"what": f"{arch} whole-network step, {threads} thread(s)"
                                     f"{', channels_last' if channels_last else ''}",
                             "images/s": rate(step_fn(model, xx, y, batch), n)})
        torch.set_num_threads(2)
        try:
            model = net.build_model(8, arch=arch, image_size=size).to(memory_format=torch.channels_last)
            compiled = torch.compile(model)
            rows.append({"what": f"{arch} whole-network step, 2 threads, channels_last, torch.compile",
                         "images/s": rate(step_fn(compiled, x.contiguous(memory_format=torch.channels_last), y, batch), n)})
        except Exception as e:  # noqa: BLE001 - report, do not fail: compile needs a C++ toolchain
            rows.append({"what": f"{arch} torch.compile", "images/s": None, "note": f"{type(e).__name__}: {e}"[:200]})
    torch.set_num_threads(2)
    model = net.build_model(8, arch="efficientnet_lite0", image_size=size).to(memory_format=torch.channels_last).eval()
    xx = x.contiguous(memory_format=torch.channels_last)

    def infer():
        with torch.no_grad():
            for i in range(0, len(xx), 32):
                model(xx[i : i + 32])
    rows.append({"what": "efficientnet_lite0 inference, batch 32, 2 threads, channels_last", "images/s": rate(infer, n)})
    # the partial recipe: trunk activations cached once per view, then the top blocks alone
    k = P["freeze_blocks"] or 12
    model = net.build_model(8, arch="efficientnet_lite0", image_size=size).to(memory_format=torch.channels_last)
    rows.append({"what": f"efficientnet_lite0 trunk caching (first {k} units), per view",
                 "images/s": rate(lambda: recipes.trunk_views(model, gray, k, 1), n)})
    acts = torch.from_numpy(recipes.trunk_views(model, gray, k, 1)[:, 0].astype(np.float32))
    top = net.Top(model, k)
    recipes.freeze(model, k)
    rows.append({"what": f"efficientnet_lite0 top-blocks step on cached activations (after unit {k})",
                 "images/s": rate(step_fn(model, acts.contiguous(memory_format=torch.channels_last), y, batch, top), n)})
    views, bench_dir = P["cache_views"], claim(Path(args.out).parent, "benchmarks")
    in_memory = recipes.trunk_views(model, gray, k, views, augment)
    with tempfile.TemporaryDirectory(dir=bench_dir) as tmp:
        on_disk = recipes.trunk_views(model, gray, k, views, augment, path=Path(tmp) / "acts.npy")
        rows.append({"what": f"efficientnet_lite0 trunk caching, per view, written to disk ({views} views)",
                     "images/s": rate(lambda: recipes.trunk_views(model, gray, k, views, augment,
                                                                  path=Path(tmp) / "again.npy"), n * views)})
        for where, acts in (("in memory", in_memory), ("on disk", on_disk)):
            loader = engine.make_loader(recipes.ViewDataset(acts, y.numpy()), batch_size=batch, train=True,
                                        generator=torch.Generator().manual_seed(0))
            rows.append({"what": f"partial training loop (loader + top-blocks step), activations {where}",
                         "images/s": rate(loop_fn(top, loader), n)})
            rows.append({"what": f"partial: the loader alone, activations {where}",
                         "images/s": rate(lambda: [None for _ in loader], n)})
    info = {"image_size": size, "batch_size": batch, "images": n, "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(), "rows": rows,
            "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    info["kernel_share_of_cpu_time"] = usage.ru_stime / max(usage.ru_utime + usage.ru_stime, 1e-9)
    for r in rows:
        shown = "-" if r["images/s"] is None else f"{r['images/s']:8.1f}"
        print(f"{shown} images/s  {r['what']}" + (f"  ({r['note']})" if r.get("note") else ""))
    print(f"input {size} px, batch {batch}, load average {info['load_average']}, malloc settings "
          f"{info['malloc_env'] or 'glibc defaults'}, {info['kernel_share_of_cpu_time']:.0%} of CPU time in the kernel")
    write_json_atomic(args.out, info)


if __name__ == "__main__":
    main()
