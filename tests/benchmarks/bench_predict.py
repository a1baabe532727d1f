"""Benchmark `python -m lib.predict` end to end on a folder of images (decode included).

    .venv/bin/python tests/benchmarks/bench_predict.py [--images 1000] [--bundle build/export] [--model model.int8.onnx]

Writes --images 224-px 8-bit PNGs (textured, SEM-like) into a temporary folder, then times the
command as a user runs it (a fresh process: interpreter start, imports, session, decoding in
worker processes, batched inference, the CSV). With no exported bundle at --bundle, a bundle of
an untrained MobileNetV2 at the base parameters' image_size is made in the temporary folder
(speed does not depend on the weights). Prints images per second, with the load average: on a
shared machine the figure is a lower bound.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import sem_like  # noqa: E402

from lib import data, export, model as net, params, predict, preprocess  # noqa: E402


def make_bundle(folder: Path) -> Path:
    base = params.read_file(params.BASE)
    size, classes = base["image_size"], data.label_order(base["classes"])
    m = net.build_model(len(classes), image_size=size).eval()
    export.export_onnx(m, folder / "model.onnx", size=size)
    export.write_labels(folder, classes)
    (folder / "preprocessing.json").write_text(json.dumps(preprocess.preprocessing_spec(size)))
    export.write_bundle_manifest(folder, review_threshold=predict.DEFAULT_THRESHOLD, int8_fit=True)
    return folder / "model.onnx"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--bundle", default=str(ROOT / "build" / "export"))
    ap.add_argument("--model", default="model.int8.onnx", help="file name inside the bundle")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.bundle) / args.model
        if not model.is_file():
            print(f"{model} not found: benchmarking an untrained MobileNetV2 bundle instead")
            model = make_bundle(tmp / "bundle")
        folder = tmp / "images"
        for i in range(args.images):
            sub = folder / f"lot{i % 10}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sem_like(i, 224)).save(sub / f"img_{i:05d}.png")
        load = os.getloadavg()
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "lib.predict", str(model), str(folder), "--out",
                              str(tmp / "rows.csv"), "--quiet"], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if run.returncode != 0:
            raise SystemExit(f"lib.predict failed: {run.stderr}")
        rows = sum(1 for _ in open(tmp / "rows.csv")) - 1
        assert rows == args.images, (rows, args.images)
        print(f"lib.predict {model.name}: {rows} images (224-px PNG, nested folders) in {seconds:.2f} s = "
              f"{rows / seconds:.0f} images/s end to end on {len(os.sched_getaffinity(0))} cores "
              f"(target >= 100); load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
              f"after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
