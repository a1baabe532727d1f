"""Benchmark: peak memory of the data stages and the training stage against the number of images.

    .venv/bin/python tests/benchmarks/bench_scale.py [--images 1200 50000] [--views 2] [--epochs 1]
                                                     [--stages data eda audit train]

For each count, generates that many distinct SEM-like images at the embedded set's 224 px (lines
at a random pitch and angle, blotches and noise, `tests/conftest.sem_like`; 8 class folders) under
build/bench/scale/<n>/images, then runs `make data`, `make eda`, `make audit` and `make train`
on them, one after the other, with an overlay (data_dir there, `epochs`, `cache_views`) over
params/base.yaml into build/bench/scale/<n>/build. Each stage is timed by `/usr/bin/time`: its
peak memory is the largest resident set of any process of the stage (the notebook kernel, or a
decoding worker), the figure `reports/index.html` shows per stage.

Peak memory does not depend on the number of epochs or on `cache_views` (the trunk activations
of every view go to disk, `lib.cache`); both are lowered so that 50,000 images train in minutes,
and are the same at every count. Writes build/bench/scale.json and prints each stage's peak and
wall time per count, and the ratio of the largest count's peak to the smallest's (target ≤ 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import sem_like  # noqa: E402

from lib import io, params  # noqa: E402

STAGES = ("data", "eda", "audit", "train")
NOTEBOOK = {"eda": "01_eda", "audit": "02_leakage_audit", "train": "03_training"}  # `data` always runs
SIZE = 224


def _render(job: tuple[str, int, str]) -> None:
    folder, seed, name = job
    Image.fromarray(sem_like(seed, SIZE)).save(Path(folder) / name, compress_level=1)


def run_stage(stage: str, overlay: Path, build: Path, reports: Path) -> dict:
    # -W: the stage runs even when up to date (a rerun would otherwise time make doing nothing);
    # the stages it needs were brought up to date before it
    again = [f"-Wnotebooks/{NOTEBOOK[stage]}.ipynb"] if stage in NOTEBOOK else []
    cmd = ["/usr/bin/time", "-f", "TIME %M %e", "make", "--no-print-directory", *again, stage,
           f"PARAMS=params/base.yaml {overlay}", f"BUILD={build}", f"REPORTS={reports}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""})
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("TIME ")]
    if done.returncode or not line:
        raise SystemExit(f"make {stage} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    kib, seconds = line[-1].split()[1:]
    return {"stage": stage, "peak_mib": round(int(kib) / 1024), "seconds": round(float(seconds), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[1200, 50000])
    ap.add_argument("--views", type=int, default=2, help="cache_views for every count")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="the stages to run (each after the ones before it are up to date)")
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "scale.json"))
    args = ap.parse_args()
    P = params.read_file(params.BASE)
    bench = io.claim(ROOT / "build" / "bench", "benchmarks")
    results = []
    for n in args.images:
        base = io.claim(bench / "scale" / str(n), "scale benchmark")
        images = base / "images"
        if not (images / "generated.json").is_file() or io.read_json(images / "generated.json")["images"] != n:
            generate_fresh(images, n, P["classes"])
        overlay = base / "overlay.yaml"
        io.write_text_atomic(overlay, f"data_dir: {images}\nepochs: {args.epochs}\ncache_views: {args.views}\n"
                                      f"patience: {args.epochs}\n")
        for stage in args.stages:
            r = {"images": n, **run_stage(stage, overlay, base / "build", base / "reports")}
            print(json.dumps(r), flush=True)
            results.append(r)
    lo, hi = min(args.images), max(args.images)
    table = {r["stage"]: {} for r in results}
    for r in results:
        table[r["stage"]][r["images"]] = r
    ratios = {s: round(t[hi]["peak_mib"] / t[lo]["peak_mib"], 2) for s, t in table.items() if lo in t and hi in t}
    print(f"\n{'stage':8} " + " ".join(f"{n:>14}" for n in sorted(set(args.images))) + "   peak ratio")
    for s, t in table.items():
        print(f"{s:8} " + " ".join(f"{t[n]['peak_mib']:>6} MiB {t[n]['seconds']:>5.0f}s" for n in sorted(t))
              + f"   {ratios.get(s, float('nan')):.2f}")
    io.write_json_atomic(args.out, {"views": args.views, "epochs": args.epochs, "cpu_count": os.cpu_count(),
                                    "load_average": os.getloadavg(), "rows": results, "peak_ratio": ratios})


def generate_fresh(folder: Path, n: int, classes: list[str]) -> None:
    """Render n images into folder (a folder this benchmark made, or a new one)."""
    if folder.exists():
        if io.marker(folder) is None:
            raise SystemExit(f"{folder} exists and is not this benchmark's: remove it or choose another build folder")
        import shutil

        shutil.rmtree(folder)
    root = io.claim(folder, "scale benchmark images")
    for c in classes:
        (root / c).mkdir()
    jobs = [(str(root / classes[i % len(classes)]), 7_000_000 + i, f"img_{i:06d}.png") for i in range(n)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(_render, jobs, chunksize=256))
    io.write_json_atomic(root / "generated.json", {"images": n, "size": SIZE})


if __name__ == "__main__":
    main()
