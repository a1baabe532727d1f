"""Benchmark: render the default synthetic dataset (8 classes x 150, 224 px) with 2 workers.

    .venv/bin/python tests/benchmarks/bench_synthetic.py [--per-class 150] [--size 224] [--workers 2]

Prints wall time and images per second; the README quotes its figures.
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from lib import synthetic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        manifest = synthetic.render_dataset(Path(tmp) / "synthetic", n_per_class=args.per_class, size=args.size,
                                            workers=args.workers)
        seconds = time.perf_counter() - t
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    n = len(manifest)
    print(f"rendered {n} images of {args.size}x{args.size} px with {args.workers} workers in {seconds:.1f} s "
          f"({n / seconds:.1f} images/s) on {os.cpu_count()} cores of {cpu}")


if __name__ == "__main__":
    main()
