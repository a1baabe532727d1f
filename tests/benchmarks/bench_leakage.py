"""Benchmark the leakage audit's two costly steps.

    .venv/bin/python tests/benchmarks/bench_leakage.py [--hashes 100000] [--images 1200]

1. Near-duplicate search: all pairs within the default Hamming threshold among N random
   64-bit hashes (with a few planted near pairs, which must all be found).
2. Hashing throughput: fingerprint() (file SHA-256, pixel hash, pHash) over rendered 224-px
   synthetic PNGs with 2 worker processes.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lib import leakage, params, synthetic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hashes", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=1200)
    args = ap.parse_args()
    threshold = params.read_file(params.BASE)["phash_threshold"]

    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, args.hashes, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(
        0, 2, args.hashes).astype(np.uint64)
    planted = rng.choice(args.hashes, size=(100, 2), replace=False)
    for i, j in planted:  # j becomes i with `threshold` bits flipped
        bits = rng.choice(64, size=threshold, replace=False).astype(np.uint64)
        h[j] = h[i] ^ np.bitwise_or.reduce(np.uint64(1) << bits)
    t = time.perf_counter()
    pairs = leakage.hamming_pairs(h, threshold)
    seconds = time.perf_counter() - t
    found = {tuple(sorted(p)) for p in pairs.tolist()}
    hit = sum(tuple(sorted((int(i), int(j)))) in found for i, j in planted)
    print(f"near-duplicate search: {args.hashes:,} hashes, threshold {threshold}: {seconds:.1f} s, "
          f"{len(pairs)} pairs, planted pairs found {hit}/100")

    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(1, args.images // len(synthetic.CLASSES))
        manifest = synthetic.render_dataset(Path(tmp) / "s", n_per_class=per_class, size=224, workers=2)
        paths = [str(Path(tmp) / "s" / p) for p in manifest["path"]]
        t = time.perf_counter()
        leakage.fingerprints(paths, workers=2)
        seconds = time.perf_counter() - t
    print(f"hashing: {len(paths)} PNGs of 224 px in {seconds:.1f} s = {len(paths) / seconds:.0f} images/s "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
