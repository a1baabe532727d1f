"""Classify image files with an exported bundle.

    python -m lib.predict build/export/model.int8.onnx wafer_42.png scans/ "lot7/**/*.tif" --out predictions.csv

PATHs are files, folders (searched recursively for image files) or glob patterns (`**`
crosses folders). The bundle is the model's folder, written by the export stage: `bundle.json`
lists every file with its sha256 (the model, `labels.json` and `preprocessing.json` are checked
against it before anything runs, and a mismatch is refused), the default review threshold, the
`clean` guard (`clean` is called only when the network's own softmax, the logits times the
temperature, gives it at least that, otherwise the most probable defect class; `lib.decision.decide`) and whether the INT8 model is fit; `labels.json` gives the class order (the source of truth;
nothing is unpickled) and `preprocessing.json` the input size, resize policy and alpha
background, applied by the one definition of preprocessing in `lib.preprocess`. Images are decoded
in parallel worker processes and classified in batches.

Each file becomes one row: file, predicted class, confidence (the probability of the class
predicted), top-3, `review` (confidence below the threshold) and error. A file that cannot be read becomes a row with its error, and
the run goes on; the exit status is 1 when any file failed, 2 when the bundle or the options
are wrong.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from scipy.special import softmax

from lib import runtime
from lib.decision import decide
from lib.preprocess import IMAGE_EXTENSIONS, load_gray, normalize

DEFAULT_THRESHOLD = 0.5
TOP_K = 3


class BundleError(ValueError):
    """The model's folder is not a usable bundle; the message names the file."""


@dataclass
class Bundle:
    model: Path
    classes: list[str]
    size: int
    resize: str
    background: float
    review_threshold: float = DEFAULT_THRESHOLD
    extra: dict = field(default_factory=dict)
    clean_guard: float = 0.0  # `lib.decision.decide` on the network's own softmax (the logits x temperature)
    temperature: float = 1.0  # the calibration temperature the exported logits are divided by

    @classmethod
    def load(cls, model: str | Path) -> "Bundle":
        """Read bundle.json, labels.json and preprocessing.json beside the model file, after checking
        the model and those files against the sha256 digests bundle.json lists."""
        from lib.io import file_digest, read_json

        model = Path(model)
        if not model.is_file():
            raise BundleError(f"model file not found: {model}")
        folder = model.parent

        def read(name: str):
            f = folder / name
            if not f.is_file():
                raise BundleError(f"{f} is missing: the model's folder must hold the bundle written by the export "
                                  f"stage (bundle.json, labels.json, preprocessing.json)")
            try:
                return read_json(f)
            except ValueError as e:
                raise BundleError(f"{f} is not valid JSON: {e}") from None

        info = read("bundle.json")
        listed = info.get("files") if isinstance(info, dict) else None
        if not isinstance(listed, dict):
            raise BundleError(f"{folder / 'bundle.json'} lacks its list of files and digests")
        for name in (model.name, "labels.json", "preprocessing.json"):
            if name not in listed:
                raise BundleError(f"{folder / name} is not listed in {folder / 'bundle.json'}: not part of this bundle")
            if (folder / name).is_file() and file_digest(folder / name) != listed[name].get("sha256"):
                raise BundleError(f"{folder / name} does not match the sha256 in {folder / 'bundle.json'}: the file was "
                                  f"changed or replaced after export; refusing to use it (export again, or restore it)")
        labels, spec = read("labels.json"), read("preprocessing.json")
        if not isinstance(labels, list) or not all(isinstance(c, str) for c in labels) or len(labels) < 2:
            raise BundleError(f"{folder / 'labels.json'} must be a list of at least two class names")
        try:
            size = int(spec["shape"][2])
            resize, background = spec.get("resize", "stretch"), float(spec.get("alpha_background", 0.0))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BundleError(f"{folder / 'preprocessing.json'} lacks the input shape [N, 3, H, W] ({e!r})") from None
        guard, temperature = info.get("clean_guard", 0.0), info.get("temperature", 1.0)
        if isinstance(guard, bool) or not isinstance(guard, (int, float)) or not 0 <= guard < 1:
            raise BundleError(f"{folder / 'bundle.json'}: clean_guard must be a number in [0, 1), got {guard!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise BundleError(f"{folder / 'bundle.json'}: temperature must be a positive number, got {temperature!r}")
        return cls(model, labels, size, resize, background,
                   float(info.get("review_threshold", DEFAULT_THRESHOLD)), info, float(guard), float(temperature))

    @property
    def unfit_int8(self) -> bool:
        """The model is the INT8 file and the export's recall-first gate marked it not fit."""
        return self.model.name == "model.int8.onnx" and self.extra.get("int8_fit") is False


def expand(paths: list[str]) -> list[tuple[str, str]]:
    """Arguments -> (file, error) pairs, in argument order without duplicates.

    A folder gives its image files (recursively, sorted); a glob gives its matches (folders
    among them expanded); a name that is neither an existing path nor a matching pattern
    gives one row with an error.
    """
    out: dict[str, str] = {}

    def add_folder(folder: Path):
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                out.setdefault(str(p), "")

    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            add_folder(p)
        elif p.exists():
            out.setdefault(arg, "")
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                out.setdefault(arg, "no file matches this pattern")
            for m in matches:
                if Path(m).is_dir():
                    add_folder(Path(m))
                elif Path(m).is_file():
                    out.setdefault(m, "")
        else:
            out.setdefault(arg, "file not found")
    return list(out.items())


def decode(path: str, size: int, resize: str, background: float) -> tuple[np.ndarray | None, str]:
    """One file -> (grayscale array on 0-1, "") or (None, why it cannot be read)."""
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        return load_gray(path, size, resize=resize, background=background), ""
    except Exception as e:  # noqa: BLE001 - every decoder failure becomes a row, never a crash
        return None, f"{type(e).__name__}: {e}".strip()


def predict(bundle: Bundle, items: list[tuple[str, str]], *, threshold: float | None = None, batch_size: int = 32,
            workers: int | None = None, threads: int = 0) -> list[dict]:
    """Rows for (file, error) items: predicted class, confidence, top-3, review flag, error.

    Files are decoded by `workers` processes (default: one per core; 0 decodes in this
    process) while this process classifies the decoded ones in batches.
    """
    threshold = bundle.review_threshold if threshold is None else threshold
    sess = runtime.session(bundle.model, threads)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if len(items) > 64 else 0
    load = partial(decode, size=bundle.size, resize=bundle.resize, background=bundle.background)
    rows: list[dict] = []
    pending: list[tuple[dict, np.ndarray]] = []

    def flush():
        if not pending:
            return
        x = normalize(np.stack([g for _, g in pending])[:, None])
        logits = sess.run(None, {"input": x})[0].astype(np.float64)
        prob = softmax(logits, axis=1)  # calibrated: the logits carry the temperature
        top = np.argsort(-prob, axis=1)[:, :TOP_K]
        pred = (decide(softmax(logits * bundle.temperature, axis=1), bundle.classes, bundle.clean_guard)
                if bundle.clean_guard else top[:, 0])
        for (row, _), p, t, c in zip(pending, prob, top, pred):
            row.update(predicted=bundle.classes[c], confidence=float(p[c]),
                       top3=[(bundle.classes[i], float(p[i])) for i in t], review=bool(p[c] < threshold))
        pending.clear()

    readable = [f for f, err in items if not err]
    if workers and len(readable) > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        decoded = pool.map(load, readable, chunksize=max(1, min(32, len(readable) // (4 * workers))))
    else:
        pool, decoded = None, map(load, readable)
    try:
        for f, err in items:
            row = {"file": f, "predicted": None, "confidence": None, "top3": [], "review": True, "error": err}
            rows.append(row)
            if err:
                continue
            gray, row["error"] = next(decoded)
            if gray is not None:
                pending.append((row, gray))
                if len(pending) >= batch_size:
                    flush()
        flush()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows


def _top3_text(top3) -> str:
    return "; ".join(f"{c} {p:.3f}" for c, p in top3)


def to_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame([{**r, "top3": _top3_text(r["top3"])} for r in rows],
                        columns=["file", "predicted", "confidence", "top3", "review", "error"])


def write(rows: list[dict], out: str | Path) -> Path:
    """Rows to a CSV (top-3 as "class p; ...") or JSON file (top-3 as a list), by the file's extension."""
    from lib.io import write_json_atomic, write_text_atomic

    out = Path(out)
    if out.suffix.lower() == ".csv":
        return write_text_atomic(out, to_frame(rows).to_csv(index=False))
    if out.suffix.lower() == ".json":
        data = [{**r, "top3": [{"class": c, "probability": p} for c, p in r["top3"]]} for r in rows]
        return write_json_atomic(out, data)
    raise ValueError(f"--out must end in .csv or .json, got {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model file (.onnx) inside an export bundle folder")
    ap.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    ap.add_argument("--out", help="also write the rows to this .csv or .json file")
    ap.add_argument("--threshold", type=float, default=None,
                    help="flag for review below this confidence (default: the bundle's review_threshold)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call")
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core; 0: none)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    ap.add_argument("--quiet", action="store_true", help="print only the summary line, not the table")
    args = ap.parse_args(argv)
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json"):
        print(f"error: --out must end in .csv or .json, got {args.out}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        bundle = Bundle.load(args.model)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bundle.unfit_int8:
        print(f"warning: {bundle.model.parent / 'bundle.json'} marks the INT8 model not fit for use (it lost recall "
              f"against FP32 on validation); {bundle.model.parent / 'model.onnx'} is the model to deploy",
              file=sys.stderr)
    rows = predict(bundle, expand(args.paths), threshold=args.threshold, batch_size=args.batch_size,
                   workers=args.workers, threads=args.threads)
    failed = sum(bool(r["error"]) for r in rows)
    if not args.quiet:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.max_colwidth", 80, "display.width", 200):
            print(to_frame(rows).round({"confidence": 4}).astype(object).fillna("").to_string(index=False))
    if args.out:
        write(rows, args.out)
    review = sum(bool(r["review"]) and not r["error"] for r in rows)
    print(f"{len(rows)} files: {len(rows) - failed} classified ({review} below the review threshold), "
          f"{failed} failed" + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
