"""GPU check: the CUDA training path end to end in a few minutes, and its throughput.

    .venv/bin/python tests/benchmarks/bench_gpu.py [--images-per-class 48] [--epochs 3] [--out build/bench/gpu.json]

On a machine with CUDA, through the training stage's own entry point (`lib.recipes.train_and_checkpoint`)
on synthetic SEM images rendered in memory and written to a scratch build folder:

- EfficientNet-Lite0 (ImageNet weights when they can be had, else random), recipe `ft` (every layer
  trains, so the GPU does the work), at 224 px: precision fp32 and the automatic mixed precision
  (bf16 where the GPU supports it, else fp16 with a gradient scaler), one process;
- with two or more GPUs, the same under torchrun with 2 processes (DistributedDataParallel, nccl, SyncBatchNorm).

For each: the precision, the training loop's images per second, the wall time and the best validation
macro recall (a sanity check that the run learned, not a quality figure: the set is tiny). `--device cpu`
runs the same script on the CPU as a dry run (fp32 and bf16, 1 and 2 gloo processes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lib import data, engine, params, recipes, synthetic  # noqa: E402
from lib.io import claim, write_json_atomic  # noqa: E402


def scratch_build(root: Path, per_class: int, size: int, classes: list[str]) -> Path:
    """Render per_class images of each class into root/images and write root/build/split/split.csv."""
    import pandas as pd
    from PIL import Image

    rows = []
    for cls in classes:
        for i in range(per_class):
            img, _ = synthetic.render_image(0, cls, i, size=size)
            path = root / "images" / cls / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            rows.append({"path": str(path), "class": cls, "split": "val" if i % 4 == 0 else "train",
                         "group": len(rows)})
    build = root / "build"
    (build / "split").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(build / "split" / "split.csv", index=False)
    return build


def one_run(P: dict, build: Path, name: str, device: str) -> dict:
    labels = data.label_order(P["classes"])
    split = data.load_split(build, labels)
    parts = {s: data.load_part(split, s, labels, P["image_size"]) for s in ("train", "val")}
    out = build / name
    out.mkdir()
    prepared = recipes.prepare(P, len(labels), build_dir=build)
    started = time.perf_counter()
    trained, _ = recipes.train_and_checkpoint(P, parts, labels, prepared, out / "model.pt",
                                              device=torch.device(device), generator=engine.seed_everything(0, False),
                                              build_dir=build)
    fit = trained.fit
    return {"run": name, "processes": P["nproc_per_node"], "precision": fit.precision,
            "images_per_second": round(fit.images_per_second, 1), "wall_seconds": round(time.perf_counter() - started, 1),
            "best_val_macro_recall": round(fit.best_val_macro_recall, 3), "weights": trained.weights["source"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images-per-class", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "gpu.json"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (or --device cpu for a dry run)")
        return 2
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    base = {**params.read_file(params.BASE), "arch": "efficientnet_lite0", "weights": "imagenet", "recipe": "ft",
            "image_size": 224 if args.device == "cuda" else 64, "epochs": args.epochs, "batch_size": 64,
            "weights_fallback": "none", "device": args.device, "deterministic": False, "patience": args.epochs}
    runs = [("fp32", {"precision": "fp32"}), ("amp", {"precision": "auto" if args.device == "cuda" else "bf16"})]
    if gpus >= 2:
        runs.append(("amp_2proc", {"precision": "auto" if args.device == "cuda" else "fp32", "nproc_per_node": 2,
                                   "sync_bn": args.device == "cuda"}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build = scratch_build(Path(tmp), args.images_per_class, 224, base["classes"])
        for name, over in runs:
            rows.append(one_run({**base, **over}, build, name, args.device))
            print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    out = Path(args.out)
    claim(out.parent, "benchmarks")
    write_json_atomic(out, {"device": device_name, "gpus": gpus if args.device == "cuda" else 0,
                            "torch": torch.__version__, "cuda": torch.version.cuda, "runs": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
